"""firewalld for the e2e sandbox: the real daemon, with module unloading off.

`firewall-cmd --complete-reload` unloads every netfilter kernel module with
rmmod. Kernel modules are not namespaced, so inside a test sandbox that
would reach the host. This runs the installed /usr/sbin/firewalld with
rmmod pointed at /bin/true, in this process only; nothing else changes.
Used only inside the sandbox's mount and network namespaces.
"""

import runpy
import sys

import firewall.config as config

config.COMMANDS["rmmod"] = "/bin/true"
sys.argv = ["/usr/sbin/firewalld"] + sys.argv[1:]
runpy.run_path("/usr/sbin/firewalld", run_name="__main__")
