"""The fast path's cheap checks against real damage: real rules, real packets.

A guest's start or reconnect goes from its record without listing the
firewall, and trusts a few cheap questions about the base instead: on
nftables, each of our chains' rule-and-jump count and the head of
libvirt's forward chains; on iptables-nft, one dump of VNETHOOK-SNAT for the
subnet's hairpin. Here the firewall is damaged under a recorded guest in
the way each question is meant to notice, and:

- the traffic shows the damage, and `vnethook status` says so too;
- the next fast-path event (the damaged guest's reconnect, or another
  guest's start) brings every forward back, and status agrees again;
- nothing is installed twice, and a port the map does not publish stays
  closed.
"""

from __future__ import annotations

import shlex

import pytest
from hostile_support import reaches_g1
from netns import A

MAP = {
    "g0": "{address: 192.0.2.10, forward: [8000:80, 5300:53/udp]}",
    "db": "{address: 192.0.2.11, forward: [5432:5432]}",
}
MAC, DB_MAC = "52:54:00:00:05:00", "52:54:00:00:05:01"


@pytest.fixture
def served(host):
    host.topo.server("g1", "g1", "80")
    host.topo.server("g1", "g1u", "53", proto="udp")
    host.topo.server("g2", "g2", "5432")
    host.write_map(MAP)
    assert host.started("g0", [MAC]).returncode == 0
    return host


def _healthy(host):
    """Traffic, status and the rules agree that every forward is there once."""
    assert reaches_g1(host)
    rc, st = host.status()
    assert rc == 0 and st["problems"] == [], st
    ours = host.ours()
    assert len(set(ours)) == len(ours), ours
    assert not host.topo.connect("ext", A["host_ext4"], 8001).ok  # not published


def _reconnect(host):
    p = host.hook("qemu", "g0", "reconnect", host.run_domain("g0", [MAC]))
    assert p.returncode == 0, p.stderr


def _start_db(host):
    assert host.started("db", [DB_MAC]).returncode == 0
    r = host.topo.connect("ext", A["host_ext4"], 5432)
    assert r.ok and r.who == "g2", r.text


def _accept_handle(host, family):
    listing = host.topo.exec("host", "nft", "-a", "list", "chain", family, "libvirt_network", "forward").stdout
    return next(ln for ln in listing.splitlines() if 'comment "vnethook"' in ln).split("# handle ")[1].strip()


@pytest.mark.parametrize("event", ["reconnect", "another guest starts"])
def test_a_flushed_chain_of_ours(served, event):
    """Someone flushes one of vnethook's own chains (nftables: the chain of
    the DNAT rules; iptables: the nat chain the base jumps into). The
    counts the fast path asks no longer match, so the base goes out again."""
    host = served
    _healthy(host)
    if host.backend == "nftables":
        host.topo.exec("host", "nft", "flush", "chain", "inet", "vnethook", "translate")
    else:
        tool = "iptables-legacy" if host.backend == "iptables-legacy" else "iptables-nft"
        save = host.dump()[f"{tool}-save"]
        jump = next(ln for ln in save.splitlines() if ln.startswith("-A PREROUTING") and "VNETHOOK-" in ln)
        chain = jump.split(" -j ")[-1].split()[0]
        host.topo.exec("host", tool, "-w", "-t", "nat", "-F", chain)
    assert not reaches_g1(host)
    rc, st = host.status()
    assert rc == 1 and st["problems"], st
    if event == "reconnect":
        _reconnect(host)
    else:
        _start_db(host)
    _healthy(host)


@pytest.mark.parametrize("how", ["deleted", "below libvirt's jumps", "a stale copy on top"])
def test_nftables_accept_in_libvirts_chain(served, how):
    """libvirt's forward chain rejects new connections to its guests: our
    accept must be its first rule, once, and today's. Each way it can go
    wrong (a libvirt reload recreating its table loses it; a jump libvirt
    re-inserts lands above it; an older release's accept) is seen by the
    dump of that one chain, and the next start puts exactly one on top."""
    host = served
    if host.backend != "nftables":
        pytest.skip("libvirt's nftables chains only")
    _healthy(host)
    handle = _accept_handle(host, "ip")
    ex = host.topo.exec
    if how == "deleted":
        ex("host", "nft", "delete", "rule", "ip", "libvirt_network", "forward", "handle", handle)
    elif how == "below libvirt's jumps":
        ex("host", "nft", "delete", "rule", "ip", "libvirt_network", "forward", "handle", handle)
        ex("host", "nft", "add", "rule", "ip", "libvirt_network", "forward",
           *shlex.split('ct mark & 0x02000000 == 0x02000000 accept comment "vnethook"'))
        ex("host", "nft", "insert", "rule", "ip", "libvirt_network", "forward", "jump", "guest_input")
    else:
        ex("host", "nft", "delete", "rule", "ip", "libvirt_network", "forward", "handle", handle)
        ex("host", "nft", "insert", "rule", "ip", "libvirt_network", "forward",
           *shlex.split('ct mark 0x00000001 accept comment "vnethook"'))  # not ours any more
        ex("host", "nft", "insert", "rule", "ip", "libvirt_network", "forward", "jump", "guest_input")
    assert not reaches_g1(host)
    rc, st = host.status()
    assert rc == 1 and any("accept rule" in p for p in st["problems"]), st
    _start_db(host)
    _healthy(host)
    chain = ex("host", "nft", "list", "chain", "ip", "libvirt_network", "forward").stdout
    rules = [ln.strip() for ln in chain.splitlines() if ln.strip() and not ln.strip().startswith(("type ", "chain",
                                                                                                   "table", "}"))]
    assert rules[0] == 'ct mark & 0x02000000 == 0x02000000 accept comment "vnethook"', rules
    assert chain.count('comment "vnethook"') == 1, chain
    if how != "deleted":
        assert sum(r.endswith("jump guest_input") for r in rules) == 2  # libvirt's own jumps stay


def test_iptables_nft_hairpin_of_the_subnet(served):
    """The subnet's hairpin masquerade (a guest reaching a published port of
    its own network through the host) is checked by one netlink dump of
    VNETHOOK-SNAT instead of a `-C` line in the batch. Deleted, the
    hairpin is not masqueraded, status says the forward drifted, and the
    next guest's start puts it back."""
    host = served
    if host.backend != "iptables-nft":
        pytest.skip("iptables-nft's netlink check")
    _healthy(host)
    r = host.topo.connect("g2", A["host_ext4"], 8000)
    assert r.ok and r.who == "g1" and r.client == A["host_br4"], r.text
    save = host.dump()["iptables-nft-save"]
    line = next(ln for ln in save.splitlines() if '"vnethook:hairpin"' in ln and A["host_br4"][:-1] in ln)
    host.topo.exec("host", "iptables-nft", "-w", "-t", "nat", "-D", *shlex.split(line)[1:])
    r = host.topo.connect("g2", A["host_ext4"], 8000)
    assert not (r.ok and r.client == A["host_br4"]), r.text  # not masqueraded any more
    rc, st = host.status()
    assert rc == 1, st
    _start_db(host)
    r = host.topo.connect("g2", A["host_ext4"], 8000)
    assert r.ok and r.who == "g1" and r.client == A["host_br4"], r.text
    _healthy(host)
