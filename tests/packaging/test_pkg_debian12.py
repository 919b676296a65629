"""The .deb on a stock Debian 12 host: apt install, then a real forward.

Most Debian 12 hypervisors run Debian's own libvirt 9.0. Here the package
is installed the README's way (`apt install ./vnethook_*_all.deb`) into a
Debian 12 root with that libvirt (tests/e2e/libvirt_root.py, through an
overlay of the sandbox's own, so the cached root stays clean), while that
root's libvirtd runs: the package's dependencies must resolve from what
Debian 12 has, its postinst must find and SIGHUP the running libvirtd (so
libvirt sees the hooks without a restart), and then the installed hooks,
the installed `vnethook` and the shipped default map (edited as an admin
would) publish a guest's port to an external client and take it away
again when the guest stops.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap

import pytest

E2E = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "e2e")
sys.path.insert(0, E2E)

from sandbox import COUNTERS, Sandbox, mac_for, missing_requirements  # noqa: E402
from vnethook_env import without_new_empty_base_chains  # noqa: E402

HOST_EXT = "198.51.100.1"


def test_apt_install_on_debian12_libvirt9_then_publish(vnethook_deb, tmp_path):
    why = missing_requirements()
    if why:
        pytest.skip(why)
    with Sandbox(distro="debian12", writable_root=True, tmpdir=str(tmp_path / "sb")) as sb:
        # postinst looks for /run/libvirtd.pid, as the Debian service writes it
        sb.run(["ln", "-s", "/run/libvirt/vnethook-sandbox/libvirtd.pid", "/run/libvirtd.pid"])
        sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
        mac = mac_for(0x71)
        sb.define_domain("web1", macs=[mac])
        g = sb.add_guest_netns("web1", mac)
        g.dhcp(hostname="web1")
        g.serve_tcp(80, "web1 on debian 12")
        ext = sb.add_external()
        before = COUNTERS.sub("", sb.ruleset())

        deb = os.path.join(sb.tmpdir, os.path.basename(vnethook_deb))
        shutil.copy(vnethook_deb, deb)
        pid = sb.libvirtd_pid()
        # no network in the sandbox: every dependency must already be there
        # or apt fails, so this also checks the Depends against Debian 12
        cp = sb.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", deb],
                    env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300, check=False)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert f"sent SIGHUP to libvirtd ({pid})" in cp.stdout, cp.stdout
        assert sb.libvirtd_pid() == pid, "libvirtd was restarted, not signalled"
        for kind in ("qemu", "network"):
            assert sb.run(["test", "-x", f"/etc/libvirt/hooks/{kind}.d/vnethook"],
                          check=False).returncode == 0
        ver = sb.run(["dpkg-query", "-W", "-f=${Version}", "libvirt-daemon"]).stdout
        assert ver.startswith("9.0.0"), ver

        # the admin writes the map over the shipped, commented example
        with open(sb.path("/etc/vnethook/ports.yaml"), "w", encoding="utf-8") as f:
            f.write(textwrap.dedent("""\
                guests:
                  web1:
                    - 8080:80
                """))
        assert sb.run(["vnethook", "check"], check=False).returncode == 0
        sb.start("web1")
        r = ext.connect_tcp(HOST_EXT, 8080)
        assert r.data == "web1 on debian 12", r
        cp = sb.run(["vnethook", "status"], check=False)
        assert cp.returncode == 0 and "web1" in cp.stdout, cp.stdout + cp.stderr
        sb.destroy("web1")
        assert not ext.connect_tcp(HOST_EXT, 8080, timeout=1).ok
        # purge: nothing of vnethook stays in the firewall, libvirt's rules do
        cp = sb.run(["apt-get", "purge", "-y", "-q", "vnethook"],
                    env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300, check=False)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        # postrm's SIGHUP makes libvirt rebuild its rules: wait until it is done
        after = sb.wait_stable(lambda: COUNTERS.sub("", sb.ruleset()), settle=1.0, timeout=30)
        assert "vnethook" not in after.lower() and "0x2000000" not in after, after
        # libvirt's rules again, each once (iptables-nft keeps the empty nat
        # base chains it made for the first DNAT: test_real_guest.py), in
        # whatever order libvirt's reload re-inserted them
        after, _ = without_new_empty_base_chains(after, before)
        assert sorted(after.splitlines()) == sorted(before.splitlines())
