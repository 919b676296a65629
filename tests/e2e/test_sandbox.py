"""Proves the e2e harness itself: a private libvirtd whose network hands a
real lease to a guest netns, reachable from an external netns, with hooks
that see baked-in environment, under both of libvirt's firewall backends."""

from __future__ import annotations

import os

import pytest

from sandbox import Sandbox, mac_for

pytestmark = pytest.mark.e2e


@pytest.mark.distros
def test_real_lease_and_external_reach(sandbox: Sandbox, firewall_backend):
    sandbox.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    mac = mac_for(1)
    sandbox.define_domain("guest1", macs=[mac])
    sandbox.start("guest1")
    assert sandbox.virsh("domstate", "guest1").strip() == "running"

    # libvirt's firewall backend is the one asked for, in the sandbox only
    if sandbox.firewall_backend == "nftables":
        assert "table ip libvirt_network" in sandbox.run(["nft", "list", "tables"]).stdout
    else:
        assert "LIBVIRT_FWI" in sandbox.run(["iptables", "-S", "FORWARD"]).stdout

    guest = sandbox.add_guest_netns("guest1", mac)
    ip = guest.dhcp(hostname="guest1")
    assert ip.startswith("192.0.2.")
    # libvirt's leases helper may still be writing the status file when
    # udhcpc has its address
    leases = sandbox.wait_for(lambda: sandbox.leases("vnhbr0"), timeout=10, what="the lease file")
    assert [(e["mac-address"], e["ip-address"], e.get("hostname")) for e in leases] == [
        (mac, ip, "guest1")]
    assert leases[0]["expiry-time"] > 0

    ext = sandbox.add_external("198.51.100.0/24")
    assert ext.ping("198.51.100.1")
    assert ext.ping("192.0.2.1")
    # unsolicited traffic to a NAT guest is refused by libvirt's own rules
    srv = guest.serve_tcp(8080, "from-guest")
    assert not ext.connect_tcp(ip, 8080, timeout=1).ok
    # the guest reaches out through libvirt's masquerade
    out = ext.serve_tcp(9090, "from-ext")
    r = guest.connect_tcp("198.51.100.2", 9090, "hi")
    assert r.ok and r.data == "from-ext"
    assert out.peers()[-1]["peer"] == "198.51.100.1"
    # and the host reaches the guest directly
    assert sandbox.connect_tcp(ip, 8080).data == "from-guest"
    assert srv.peers()[-1]["peer"] == "192.0.2.1"


def test_hooks_see_baked_env_and_event_order(make_sandbox, tmp_path):
    log = tmp_path / "hook.log"
    recorder = tmp_path / "record.py"
    recorder.write_text(
        "import os, sys\n"
        "with open(os.environ['VNH_TEST_LOG'], 'a') as f:\n"
        "    f.write(' '.join(sys.argv[1:]) + ' env=' + os.environ.get('VNH_TEST_TAG', '') + '\\n')\n")
    sb = make_sandbox("iptables", env={"VNH_TEST_LOG": str(log), "VNH_TEST_TAG": "baked"})
    wrapper = sb.hook_wrapper(["/usr/bin/python3", str(recorder)])
    sb.install_hook("qemu.d/10-record", wrapper)
    sb.install_hook("network.d/10-record", wrapper)
    sb.reload_libvirtd()
    sb.define_network()
    sb.define_domain("g", macs=[mac_for(2)])
    sb.start("g")
    sb.destroy("g")
    lines = log.read_text().splitlines()
    assert all(line.endswith(" env=baked") for line in lines)
    events = [" ".join(line.split()[:3]) for line in lines]
    assert events == [
        "vnhnet start begin", "vnhnet started begin",
        "g prepare begin", "vnhnet port-created begin", "g start begin", "g started begin",
        "g stopped end", "vnhnet port-deleted begin", "g release end",
    ]


def test_restart_keeps_guest_and_teardown_leaves_nothing(make_sandbox):
    sb = make_sandbox("nftables")
    sb.define_network()
    sb.define_domain("g", macs=[mac_for(3)])
    sb.start("g")
    old = sb.libvirtd_pid()
    sb.restart_libvirtd()
    assert sb.libvirtd_pid() not in (None, old)
    assert sb.virsh("domstate", "g").strip() == "running"
    holder = sb.pid
    net_ns = os.readlink(f"/proc/{holder}/ns/net")
    sb.close()
    assert not os.path.exists(f"/proc/{holder}")
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/net") == net_ns:
                left.append(pid)
        except OSError:
            pass
    assert left == []
