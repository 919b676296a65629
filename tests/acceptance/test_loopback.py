"""Loopback (127.0.0.1) forwards: reachable from the host itself, and from no one else.

Attacks with real packets, for every backend: a neighbour routing
127.0.0.0/8 to the host or putting a crafted SYN on the wire, a guest
reaching the host's own 127.0.0.1 services through its gateway, a guest
spoofing 127.0.0.1 as its source. Each asserts on the side that must see
nothing (the guest's interface, the host's lo), not only on a failed connect.
"""

from __future__ import annotations

import time

from acceptance_support import fwd, key

from netns import A, BRIDGE

LOCALNET = f"net/ipv4/conf/{BRIDGE}/route_localnet"
GLOBALS = ["net/ipv4/conf/all/route_localnet", "net/ipv4/conf/default/route_localnet",
           "net/ipv4/conf/ext0/route_localnet", "net/ipv4/ip_forward",
           "net/bridge/bridge-nf-call-iptables"]


def apply(net, backend, state, fws):
    return net.drive("apply", backend, fws[0].key, state, forwards=fws)


def guard_present(net) -> bool:
    return net.exec("host", "nft", "list", "table", "ip", "vnethook_guard", check=False).returncode == 0


def loopback_and_wildcard(net, backend, state):
    """g1 serves 22 and 80; 127.0.0.1:2222 -> 22 (host only) and *:8080 -> 80."""
    net.server("g1", "g1", "22,80")
    apply(net, backend, state, [fwd(host="127.0.0.1", hp=(2222, 2222), gp=(22, 22)), fwd()])


def test_host_reaches_its_loopback_forward(net, backend, state):
    before = {p: net.sysctl(p) for p in GLOBALS}
    assert net.sysctl(LOCALNET) == "0" and not guard_present(net)
    loopback_and_wildcard(net, backend, state)
    assert net.sysctl(LOCALNET) == "1" and guard_present(net)
    r = net.connect("host", "127.0.0.1", 2222)
    assert r.ok and r.who == "g1" and r.port == 22, r.text
    # The loopback forward is bound to 127.0.0.1: no other host address has it.
    for role, addr in (("ext", A["host_ext4"]), ("g2", A["host_br4"]), ("host", A["host_ext4"])):
        assert not net.connect(role, addr, 2222).ok, (role, addr)
    assert {p: net.sysctl(p) for p in GLOBALS} == before
    net.drive("remove", backend, key(), state)
    assert net.sysctl(LOCALNET) == "0" and not guard_present(net)
    assert not net.connect("host", "127.0.0.1", 2222).ok
    assert {p: net.sysctl(p) for p in GLOBALS} == before


def test_neighbour_routing_loopback_via_host_reaches_nothing(net, backend, state):
    loopback_and_wildcard(net, backend, state)
    seen = net.sniff("g1")
    net.route_loopback_via("ext", A["host_ext4"])
    for port in (2222, 8080):
        assert not net.connect("ext", "127.0.0.1", port, timeout=1).ok, port
    assert net.connect("ext", A["host_ext4"], 8080).ok  # the real forward still works
    time.sleep(0.3)
    leaked = [p for p in seen.packets() if p["src"] in (A["ext4"], "127.0.0.1") and p["dport"] == 22]
    assert leaked == [], leaked
    assert not [p for p in seen.packets() if p["dst"] == "127.0.0.1"]


def test_crafted_syn_to_loopback_reaches_nothing(net, backend, state):
    loopback_and_wildcard(net, backend, state)
    seen = net.sniff("g1")
    host_mac = net.mac("host", "ext0")
    for src in (A["ext4"], "127.0.0.1", "127.0.0.2"):
        for port in (2222, 8080):
            net.craft("ext", host_mac, src, "127.0.0.1", "tcp", port)
    # IPv6: ::1 from outside (no [::1] forward exists; the wildcard 8080 has a v6 twin).
    apply(net, backend, state, [fwd(host="127.0.0.1", hp=(2222, 2222), gp=(22, 22)), fwd(),
                                fwd(family=6, guest=A["g1_6"])])
    for src in (A["ext6"], "::1"):
        net.craft("ext", host_mac, src, "::1", "tcp", 8080)
    time.sleep(0.3)
    got = [p for p in seen.packets() if p["dport"] in (22, 80) or p["dst"] in ("127.0.0.1", "::1")]
    assert got == [], got
    # The sniffer does see what a forward lets through: it is not blind.
    assert net.connect("ext", A["host_ext4"], 8080).ok
    time.sleep(0.2)
    assert seen.packets(src=A["ext4"], dport=80)


def _guest_to_host_loopback(net):
    """g2 sends 127.0.0.0/8 to its gateway and connects to the host's own 127.0.0.1:7000."""
    return net.connect("g2", "127.0.0.1", 7000, timeout=1)


def test_guest_cannot_reach_host_loopback_services(net, backend, state):
    net.server("host", "host-lo", "7000", bind4="127.0.0.1")
    assert net.connect("host", "127.0.0.1", 7000).ok  # the service is there
    net.route_loopback_via("g2", A["host_br4"])
    answers = net.sniff("g2")
    assert not _guest_to_host_loopback(net).ok
    # Same with a loopback forward on g2's bridge (route_localnet=1 there).
    loopback_and_wildcard(net, backend, state)
    assert net.sysctl(LOCALNET) == "1"
    assert not _guest_to_host_loopback(net).ok
    assert net.connect("host", "127.0.0.1", 2222).ok  # while the host's own use works
    time.sleep(0.2)
    # The host's service never answered the guest (a SYN-ACK from 127.0.0.1:7000).
    assert not answers.packets(src="127.0.0.1", sport=7000), answers.packets(src="127.0.0.1")


def test_guest_spoofing_loopback_source_gets_no_reply(net, backend, state):
    """A datagram from a guest that claims 127.0.0.1 as its source would make
    the host answer to itself. The kernel refuses a local source address
    arriving from outside (accept_local=0); the guard drops it before that,
    so this holds whatever the host's accept_local is."""
    net.server("host", "host-udp", "7001", proto="udp")
    loopback_and_wildcard(net, backend, state)
    lo = net.sniff("host", "lo")
    port = net.sniff("host", "vnet1")  # g2's port on the bridge
    net.craft("g2", net.mac("host", BRIDGE), "127.0.0.1", A["host_br4"], "udp", 7001)
    net.craft("g2", net.mac("host", BRIDGE), "127.0.0.1", "127.0.0.1", "udp", 7001)
    time.sleep(0.3)
    assert port.packets(proto="udp", dport=7001, src="127.0.0.1")  # they did arrive
    assert not lo.packets(proto="udp", sport=7001), "the host answered a spoofed 127.0.0.1"
    assert not lo.packets(proto="udp", dport=7001)
