"""Re-create tests/fixtures/libvirt-<version>/ from a real libvirtd.

Runs the e2e sandbox (a private libvirtd in its own namespaces), installs a
recording hook for qemu and network events, drives the lifecycle vnethook
cares about and copies libvirt's own files at the moments they exist.

  /usr/bin/python3 tests/e2e/tools/capture_fixtures.py [OUTDIR]

Needs root. Deterministic names (domain web1, network vnhnet, bridge
vnhbr0, MACs 52:54:00:e2:00:0N), so re-running only changes UUIDs, times
and libvirt's own generated values.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sandbox import Sandbox, mac_for  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
MAC1, MAC2, MAC3, MAC4 = (mac_for(i) for i in (1, 2, 3, 4))


def libvirt_version() -> str:
    out = subprocess.run(["libvirtd", "--version"], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[-1]


def capture(outdir: str, backend: str, full: bool) -> list:
    """Drive one sandbox; returns the commands run, for the README."""
    os.makedirs(outdir, exist_ok=True)
    os.chmod(outdir, 0o777)  # hooks run as root, but keep it simple to inspect
    done = []
    work = tempfile.mkdtemp(prefix="vnh-capture-")
    hookdir = os.path.join(outdir, "hooks") if full else tempfile.mkdtemp(prefix="vnh-hooks-")
    os.makedirs(hookdir, exist_ok=True)
    try:
        with Sandbox(firewall_backend=backend, tmpdir=work) as sb:
            capture_hook = os.path.join(HERE, "capture-hook.py")
            for kind in ("qemu", "network"):
                sb.install_hook(f"{kind}.d/50-capture",
                                sb.hook_wrapper(["/usr/bin/python3", capture_hook, kind, hookdir]))
            sb.reload_libvirtd()

            def copy(src: str, name: str) -> None:
                shutil.copyfile(sb.path(src), os.path.join(outdir, name))

            sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24",
                              static_hosts=[(MAC2, "192.0.2.10", "web2")],
                              ipv6="2001:db8:1::/64", dnsmasq_options=())
            done.append("virsh net-define (192.0.2.0/24 + 2001:db8:1::/64, static host "
                        f"{MAC2}=192.0.2.10 web2) && virsh net-start vnhnet")
            copy("/run/libvirt/network/vnhnet.xml", f"run-network-vnhnet.{backend}.xml")
            if not full:
                return done
            sb.define_domain("web1", macs=[MAC1])
            sb.start("web1")
            done.append(f"virsh define web1 (one NIC {MAC1} on vnhnet) && virsh start web1")
            copy("/run/libvirt/qemu/web1.xml", "run-qemu-web1.xml")
            guest = sb.add_guest_netns("web1", MAC1)
            ip = guest.dhcp(hostname="web1")
            done.append(f"busybox udhcpc in the guest netns of {MAC1} (hostname web1) -> {ip}")
            copy("/var/lib/libvirt/dnsmasq/vnhbr0.status", "vnhbr0.status")
            copy("/var/lib/libvirt/dnsmasq/vnhbr0.macs", "vnhbr0.macs")
            copy("/var/lib/libvirt/dnsmasq/vnhnet.hostsfile", "vnhnet.hostsfile")

            sb.attach_interface("web1", MAC3)
            done.append(f"virsh attach-device web1 (NIC {MAC3} on vnhnet) --live")
            copy("/run/libvirt/qemu/web1.xml", "run-qemu-web1-2nics.xml")
            # No detach: unplugging needs the guest OS to acknowledge the ACPI
            # eject, and this firmware-only guest never does (libvirt keeps
            # the NIC "pending removal" and fires no port-deleted). Its
            # port-deleted comes at the domain's stop instead.
            sb.net_update_add_host(MAC4, "192.0.2.11", hostname="web4")
            done.append(f"virsh net-update vnhnet add ip-dhcp-host "
                        f"\"<host mac='{MAC4}' ip='192.0.2.11' name='web4'/>\" --live --config")
            copy("/var/lib/libvirt/dnsmasq/vnhnet.hostsfile", "vnhnet.hostsfile.updated")
            copy("/run/libvirt/network/vnhnet.xml", "run-network-vnhnet.updated.xml")

            sb.restart_libvirtd()
            done.append("libvirtd restart (SIGTERM, wait, start) with web1 running")

            sb.shutdown("web1")
            done.append("guest power-off (virsh qemu-monitor-command web1 --hmp quit)")
            sb.start("web1")
            sb.destroy("web1")
            done.append("virsh start web1 && virsh destroy web1")
            sb.net_destroy("vnhnet")
            done.append("virsh net-destroy vnhnet")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not full:
            shutil.rmtree(hookdir, ignore_errors=True)
    return done


def main(argv: list) -> int:
    version = libvirt_version()
    outdir = argv[0] if argv else os.path.join(REPO, "tests", "fixtures", "libvirt-" + ".".join(version.split(".")[:2]))
    if os.path.isdir(outdir):
        shutil.rmtree(outdir)
    done = capture(outdir, "nftables", full=True)
    done += ["(second sandbox) " + d for d in capture(outdir, "iptables", full=False)]
    with open(os.path.join(outdir, "CAPTURED.txt"), "w", encoding="utf-8") as f:
        f.write(f"libvirt {version}, captured {datetime.date.today().isoformat()} "
                f"by tests/e2e/tools/capture_fixtures.py\n")
        for d in done:
            f.write(f"- {d}\n")
    print(outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
