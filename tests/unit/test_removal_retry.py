"""Pending removals and addresses that dnsmasq gave to someone else.

The marks (state.mark_removal) are plain files; the plan's lease check is
pure. Both run on the real fixtures and the real config loader; the retry
itself, against a real libvirtd and firewall, is in
tests/e2e/test_hook_failures.py.
"""

from __future__ import annotations

import os

from vnethook import libvirt, state
from vnethook.config import load_config
from vnethook.paths import Paths
from vnethook.plan import leased_to_others, plan_guest

FIX = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "libvirt-11.3")
STARTED = os.path.join(FIX, "hooks", "06-qemu-web1-started-begin-_.xml")
NETWORK = os.path.join(FIX, "run-network-vnhnet.iptables.xml")
MAC1 = "52:54:00:e2:00:01"
OTHER = "52:54:00:e2:00:99"
NOW = 1796000000


def _paths(tmp_path):
    return Paths(config=str(tmp_path / "etc"), libvirt_root=str(tmp_path / "root"), state_dir=str(tmp_path / "st"))


def test_marks_merge_and_clear(tmp_path):
    p = _paths(tmp_path)
    assert state.removals(p) == {}
    state.mark_removal(p, "k1", "web1", ["52:54:00:00:00:02"])
    state.mark_removal(p, "k1", "web1", ["52:54:00:00:00:01"])
    assert state.removal(p, "k1")["macs"] == ["52:54:00:00:00:01", "52:54:00:00:00:02"]
    state.mark_removal(p, "k1", "web1")  # the whole guest covers its NICs
    state.mark_removal(p, "k1", "web1", ["52:54:00:00:00:03"])
    assert state.removal(p, "k1") == {"domain": "web1", "macs": None}
    state.mark_removal(p, "k2", "db 1")
    assert sorted(state.removals(p)) == ["k1", "k2"]
    state.clear_removal(p, "k1")
    state.clear_removal(p, "k1")  # twice is fine
    assert list(state.removals(p)) == ["k2"]
    with open(os.path.join(p.state_dir, "removals", "k2.json"), "w") as f:
        f.write("{not json")
    assert state.removal(p, "k2") == {"domain": "k2", "macs": None}  # unreadable: all of it, to be safe


def _lease_file(tmp_path, entries):
    import json

    f = tmp_path / "vnhbr0.status"
    f.write_text(json.dumps([{"ip-address": ip, "mac-address": mac, "expiry-time": exp} for ip, mac, exp in entries]))
    return libvirt.read_leases(str(f), now=NOW)


def test_leased_to_others_follows_the_newest_lease(tmp_path):
    leases = _lease_file(tmp_path, [("192.0.2.60", OTHER, NOW + 100), ("192.0.2.61", MAC1, NOW + 100),
                                    ("192.0.2.62", MAC1, NOW + 200), ("192.0.2.62", OTHER, NOW + 100),
                                    ("192.0.2.63", OTHER, NOW - 5)])
    assert leased_to_others(leases, "192.0.2.60", MAC1, NOW) == [OTHER]
    assert leased_to_others(leases, "192.0.2.61", MAC1, NOW) == []
    assert leased_to_others(leases, "192.0.2.62", MAC1, NOW) == []  # ours is newer: theirs is stale
    assert leased_to_others(leases, "192.0.2.63", MAC1, NOW) == []  # expired
    assert leased_to_others(leases, "192.0.2.64", MAC1, NOW) == []


def test_a_fixed_address_leased_to_another_mac_is_not_forwarded(tmp_path):
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    (d / "ports.yaml").write_text("guests:\n  web1:\n    address: 192.0.2.60\n    forward: [8080:80]\n")
    os.chmod(d / "ports.yaml", 0o644)
    cfg = load_config(_paths(tmp_path))
    with open(STARTED, "rb") as f:
        dom = libvirt.parse_domain(f.read(), "started")
    with open(NETWORK, "rb") as f:
        net = libvirt.parse_network(f.read(), "net")
    free = plan_guest(cfg.guests["web1"], dom, {net.name: net}, {"vnhbr0": _lease_file(tmp_path, [])}, now=NOW)
    assert [f.guest_address for f in free.forwards] == ["192.0.2.60"] and not free.errors
    taken = _lease_file(tmp_path, [("192.0.2.60", OTHER, NOW + 100), ("192.0.2.70", MAC1, NOW + 100)])
    p = plan_guest(cfg.guests["web1"], dom, {net.name: net}, {"vnhbr0": taken}, now=NOW)
    assert p.forwards == ()  # not to the other guest, and not to its own lease instead of the map's address
    assert len(p.errors) == 1 and "192.0.2.60 is leased by dnsmasq to " + OTHER in p.errors[0], p.errors
    assert not p.waiting
