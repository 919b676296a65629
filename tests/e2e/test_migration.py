"""Live migration between two real libvirtds: the forward follows the guest.

Two sandboxes play two hypervisors on one LAN (a veth between their
network namespaces, 203.0.113.0/30), each with its own libvirtd (listening
on TCP for the migration), the same NAT network definition (a static DHCP
host for the guest, as hosts that migrate guests between them share), its
own vnethook and its own external client. A real guest (guest_image.py:
Debian's kernel and a busybox initramfs that takes its lease and serves TCP
and UDP) boots on host A and is migrated live with `virsh migrate --live`.
libvirt runs, on B: qemu `migrate` (a filter: vnethook must print nothing),
`prepare`, `start`, `started`; on A: `stopped` and `release`. Afterwards the
guest, still the same running kernel, answers through B's published port,
A's firewall is exactly what it was before the guest started, and after the
guest stops on B so is B's.

Twice: with the forwards in both hosts' YAML maps (what config management
would give two hosts), and with the forwards only in the guest's own
metadata (`virsh metadata --config`, as a template or virt-install would
leave them; neither host's map names the guest): there B learns them from
the migrated domain XML alone.
"""

from __future__ import annotations

import difflib
import time

import pytest

from sandbox import Sandbox, mac_for
from vnethook_env import VnethookEnv, without_new_empty_base_chains

pytestmark = pytest.mark.e2e

HOST_EXT = "198.51.100.1"
GUEST_IP = "192.0.2.50"


def _host(make_sandbox, tmp_path, label: str, mac: str, ports: str):
    sb: Sandbox = make_sandbox("iptables", listen_tcp=True)
    d = tmp_path / label
    d.mkdir()
    vh = VnethookEnv(sb, d)
    vh.install()
    sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24", static_hosts=[(mac, GUEST_IP)])
    if ports:
        vh.write_map(ports)
    ext = sb.add_external()
    return sb, vh, ext


def _diff(before: str, after: str) -> str:
    return "\n".join(difflib.unified_diff(before.splitlines(), after.splitlines(), "before",
                                          "after", lineterm=""))


def _answers(ext, name: str) -> bool:
    return (ext.connect_tcp(HOST_EXT, 8080, timeout=1).data.strip() == f"{name} tcp"
            and ext.send_udp(HOST_EXT, 5353, timeout=1).data.strip() == f"{name} udp")


MAP = """
guests:
  mguest:
    - 8080:80
    - 5353:53/udp
"""


NS = "http://vnethook.org/xmlns/ports/1.0"
METADATA = "<ports><forward>8080:80</forward><forward>5353:53/udp</forward></ports>"


@pytest.mark.parametrize("declared", ["map", "metadata"])
def test_live_migration_moves_the_forward(make_sandbox, image, tmp_path, declared):
    name, mac = "mguest", mac_for(0x51)
    ports = MAP if declared == "map" else ""
    a, vh_a, ext_a = _host(make_sandbox, tmp_path, "a", mac, ports)
    b, vh_b, ext_b = _host(make_sandbox, tmp_path, "b", mac, ports)
    _, b_ip = a.link(b)
    before_a, before_b = vh_a.ruleset_text(), vh_b.ruleset_text()

    a.define_linux_guest(name, mac, image.kernel, image.initrd,
                         f"console=ttyS0 quiet vnh.name={name} vnh.tcp=80 vnh.udp=53")
    if declared == "metadata":
        a.virsh("metadata", name, "--uri", NS, "--key", "vnethook", "--set", METADATA, "--config")
        assert NS in a.virsh("dumpxml", "--inactive", name)
    a.start(name)
    a.wait_for(lambda: _answers(ext_a, name), timeout=90, interval=0.5,
               what=f"{name} answering through host A")
    assert not ext_b.connect_tcp(HOST_EXT, 8080, timeout=1).ok

    t0 = time.monotonic()
    a.virsh("migrate", "--live", "--persistent", "--undefinesource", name,
            f"qemu+tcp://{b_ip}/system", "--migrateuri", f"tcp://{b_ip}", timeout=180)
    took = time.monotonic() - t0
    assert name not in a.virsh("list", "--all", "--name").split()
    assert b.virsh("domstate", name).strip() == "running"
    if declared == "metadata":
        assert NS in b.virsh("dumpxml", name) and NS in b.virsh("dumpxml", "--inactive", name)
    # the same kernel, still running: its console shows one boot only
    b.wait_for(lambda: _answers(ext_b, name), timeout=10, interval=0.2,
               what=f"{name} answering through host B after the migration")
    answered = time.monotonic() - t0
    print(f"\n[{declared}] virsh migrate --live: {took:.2f}s; B's forward answered {answered:.2f}s "
          "after the migration began")
    assert not ext_a.connect_tcp(HOST_EXT, 8080, timeout=1).ok
    assert vh_a.records() == []
    # A's status agrees with the traffic: no guest, nothing wrong
    st_a = vh_a.status_json()
    assert st_a["guests"] == [] and st_a["problems"] == [], st_a
    # iptables-nft keeps the empty nat base chains it created for the first
    # DNAT (as in test_real_guest.py); nothing else may differ.
    after_a, _ = without_new_empty_base_chains(vh_a.ruleset_text(), before_a)
    assert after_a == before_a, _diff(before_a, after_a)
    assert GUEST_IP in str(vh_b.records_of(name))
    assert vh_b.status_json()["guests"][0]["drift"] == []
    for log in (vh_a.log_text(), vh_b.log_text()):
        assert "Traceback" not in log, log

    b.destroy(name)
    assert vh_b.records() == []
    assert not ext_b.connect_tcp(HOST_EXT, 8080, timeout=1).ok
    after_b, _ = without_new_empty_base_chains(vh_b.ruleset_text(), before_b)
    assert after_b == before_b, _diff(before_b, after_b)
