"""The nftables backend's rendering: forwards -> elements -> netlink, and back.

The pure tests pin down the parts that must agree with each other without
a kernel: the record strings, the elements' bytes, what a real nft 1.0.6
listing parses back into, and the base's text. The kernel tests (a private
network namespace each) hold the netlink messages to what libnftables
reads back, the cheap base and accept checks to what they check, and the
last guest's teardown to leaving libvirt's rules alone. The behaviour with
real packets is covered by tests/acceptance (parametrized over all
backends).
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import textwrap
from typing import Any, List

import pytest

from vnethook.firewall.base import TAG, FirewallError
from vnethook.firewall import nftables as nb
from vnethook.model import Forward
from forward_factory import fwd
from fresh import in_netns, why_no_netns


def v6(**kw: Any) -> Forward:
    base: dict = dict(family=6, subnet="2001:db8:1::/64", guest_address="2001:db8:1::10")
    base.update(kw)
    return fwd(**base)


# --- forwards -> elements ------------------------------------------------------------


def test_single_wildcard_forward():
    els = nb.render_elements([fwd()])
    assert list(els) == ["tcp *:8080 -> 192.0.2.10:80"]
    e = els["tcp *:8080 -> 192.0.2.10:80"]
    assert e.set_name == "fwd4_any"
    # each field of the concatenation fills 32-bit registers; the port is big-endian
    assert e.key_bytes() == (b"\x06\0\0\0" + struct.pack("!H", 8080) + b"\0\0", None)
    assert e.data_bytes() == socket.inet_aton("192.0.2.10") + struct.pack("!H", 80) + b"\0\0"


def test_range_maps_by_offset_one_element_per_port():
    els = nb.render_elements([fwd(host_ports=(30000, 30999), guest_ports=(40000, 40999))])
    assert len(els) == 1000
    pairs = {(e.host_port, e.guest_port) for e in els.values()}
    assert pairs == {(30000 + i, 40000 + i) for i in range(1000)}


def test_host_address_selects_host_map():
    (e,) = nb.render_elements([fwd(host_address="198.51.100.1")]).values()
    assert e.set_name == "fwd4_host"
    assert e.canonical() == "tcp 198.51.100.1:8080 -> 192.0.2.10:80"
    assert e.key_bytes() == (socket.inet_aton("198.51.100.1") + b"\x06\0\0\0\x1f\x90\0\0", None)


def test_sources_use_interval_maps_per_source_and_port():
    els = nb.render_elements([fwd(host_address="198.51.100.1", host_ports=(22, 23), guest_ports=(22, 23),
                                  sources=("203.0.113.0/24", "198.51.100.9"))])
    assert sorted(els) == [
        "tcp 198.51.100.1:22 from 198.51.100.9/32 -> 192.0.2.10:22",
        "tcp 198.51.100.1:22 from 203.0.113.0/24 -> 192.0.2.10:22",
        "tcp 198.51.100.1:23 from 198.51.100.9/32 -> 192.0.2.10:23",
        "tcp 198.51.100.1:23 from 203.0.113.0/24 -> 192.0.2.10:23",
    ]
    e = els["tcp 198.51.100.1:22 from 203.0.113.0/24 -> 192.0.2.10:22"]
    assert e.set_name == "fwd4_host_src"
    host, tail = socket.inet_aton("198.51.100.1"), b"\x06\0\0\0\0\x16\0\0"
    # an interval map's element: the first and the last source address
    assert e.key_bytes() == (host + socket.inet_aton("203.0.113.0") + tail,
                             host + socket.inet_aton("203.0.113.255") + tail)
    (w,) = nb.render_elements([fwd(sources=("203.0.113.0/24",))]).values()
    assert w.set_name == "fwd4_any_src"


def test_overlapping_sources_are_merged():
    # An interval map refuses overlapping elements, so /32 inside /24 must go.
    els = nb.render_elements([fwd(sources=("203.0.113.0/24", "203.0.113.7/32", "203.0.113.9"))])
    assert list(els) == ["tcp *:8080 from 203.0.113.0/24 -> 192.0.2.10:80"]


def test_sources_of_other_family_only_match_nobody():
    assert nb.render_elements([fwd(sources=("2001:db8::/32",))]) == {}
    els = nb.render_elements([fwd(sources=("2001:db8::/32", "203.0.113.0/24"))])
    assert list(els) == ["tcp *:8080 from 203.0.113.0/24 -> 192.0.2.10:80"]


def test_ipv6_canonical_form_is_bracketed_and_compressed():
    els = nb.render_elements([
        v6(guest_address="2001:0db8:0001:0000:0000:0000:0000:0010"),
        v6(host_address="2001:db8:9:0::1", protocol="udp", sources=("2001:db8:2::/48",)),
    ])
    assert sorted(els) == [
        "tcp [*]:8080 -> [2001:db8:1::10]:80",
        "udp [2001:db8:9::1]:8080 from 2001:db8:2::/48 -> [2001:db8:1::10]:80",
    ]
    assert {e.set_name for e in els.values()} == {"fwd6_any", "fwd6_host_src"}


def test_duplicate_forwards_render_once():
    assert len(nb.render_elements([fwd(), fwd(origin="other.yaml:9")])) == 1


@pytest.mark.parametrize("bad, why", [
    (dict(host_ports=(8080, 8081), guest_ports=(80, 80)), "port ranges"),
    (dict(host_ports=(0, 0)), "port ranges"),
    (dict(guest_address="2001:db8::1"), "not IPv4"),
    (dict(host_address="2001:db8::1"), "not IPv4"),
    (dict(protocol="icmp"), "protocol"),
    (dict(sources=("not-a-net",)), "not-a-net"),
])
def test_bad_forward_is_a_clear_error(bad, why):
    with pytest.raises(FirewallError) as exc:
        nb.render_elements([fwd(**bad)])
    assert why in str(exc.value)
    assert str(exc.value).startswith("ports.yaml:3: ")


# --- record strings <-> elements ------------------------------------------------------


ALL = [
    fwd(),
    fwd(protocol="udp", host_ports=(30000, 30002), guest_ports=(40000, 40002)),
    fwd(protocol="sctp", host_address="127.0.0.1", host_ports=(2222, 2222), guest_ports=(22, 22)),
    fwd(host_address="198.51.100.1", sources=("203.0.113.0/24", "0.0.0.0/0")),
    v6(),
    v6(host_address="::1"),
    v6(sources=("2001:db8:2::/48",)),
]


def test_canonical_strings_name_one_element_each():
    els = nb.render_elements(ALL)
    assert len({(e.set_name, e.key_bytes()) for e in els.values()}) == len(els)
    for text, e in els.items():
        assert e.canonical() == text


def test_guest_marker_is_stable_and_distinct():
    a, b = nb.guest_marker("web1-0123456789ab"), nb.guest_marker("web2-0123456789ab")
    assert a == nb.guest_marker("web1-0123456789ab") and a != b


# --- a real listing (nft 1.0.6, `list table inet vnethook`, JSON) -> the same strings --------------


LISTING: List[dict] = [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "vnethook", "handle": 1}},
    {"map": {"family": "inet", "name": "fwd4_host_src", "table": "vnethook",
             "type": ["ipv4_addr", "ipv4_addr", "inet_proto", "inet_service"], "handle": 1,
             "map": "ipv4_addr . inet_service", "flags": ["interval"], "elem": [
                 [{"elem": {"val": {"concat": ["198.51.100.1", "198.51.100.9", "udp", 30000]},
                            "comment": "vnethook:k1"}}, {"concat": ["192.0.2.10", 40000]}],
                 [{"elem": {"val": {"concat": ["198.51.100.1", {"prefix": {"addr": "203.0.113.0", "len": 24}},
                                                "udp", 30000]}, "comment": "vnethook:k1"}},
                  {"concat": ["192.0.2.10", 40000]}]]}},
    {"map": {"family": "inet", "name": "fwd4_any_src", "table": "vnethook", "elem": [
        [{"elem": {"val": {"concat": [{"prefix": {"addr": "0.0.0.0", "len": 0}}, "sctp", 8080]},
                   "comment": "vnethook:k1"}}, {"concat": ["192.0.2.10", 80]}]]}},
    {"map": {"family": "inet", "name": "fwd4_any", "table": "vnethook", "elem": [
        [{"elem": {"val": {"concat": ["tcp", 8080]}, "comment": "vnethook:k1"}}, {"concat": ["192.0.2.10", 80]}],
        [{"elem": {"val": {"concat": ["udp", 53]}, "comment": "vnethook:k2"}}, {"concat": ["192.0.2.11", 53]}],
        [{"concat": [17, 5353]}, {"concat": ["192.0.2.11", 53]}]]}},  # untagged, numeric protocol
    {"map": {"family": "inet", "name": "fwd6_host_src", "table": "vnethook", "elem": [
        [{"elem": {"val": {"concat": ["2001:db8:9::1", {"prefix": {"addr": "2001:db8:2::", "len": 48}}, "tcp", 8080]},
                   "comment": "vnethook:k1"}}, {"concat": ["2001:db8:1::10", 80]}]]}},
    {"map": {"family": "inet", "name": "elsewhere", "table": "vnethook", "elem": [[1, 2]]}},
    {"set": {"family": "inet", "name": "guests", "table": "vnethook", "type": "ipv6_addr", "elem": [
        {"elem": {"val": "6ab9:f1eb:8f7d:3388:f4f9:d586:f66e:99fd", "comment": "vnethook:k1"}},
        {"elem": {"val": "::2", "comment": "vnethook:k2"}}]}},
]

K1 = [
    fwd(),
    fwd(protocol="udp", host_address="198.51.100.1", host_ports=(30000, 30000), guest_ports=(40000, 40000),
        sources=("203.0.113.0/24", "203.0.113.7/32", "198.51.100.9")),
    v6(host_address="2001:db8:9::1", sources=("2001:db8:2::/48",)),
    fwd(protocol="sctp", sources=("0.0.0.0/0",)),
]


def _listed():
    out = {}
    for name, entry in nb._set_items(LISTING):
        e, owner = nb.parse_listed_element(name, entry)
        out.setdefault(owner, set()).add(e.canonical())
    return out


def test_listing_parses_back_to_the_rendered_record():
    got = _listed()
    assert got["k1"] == set(nb.render_elements(K1))
    assert got["k2"] == {"udp *:53 -> 192.0.2.11:53"}
    assert got[None] == {"udp *:5353 -> 192.0.2.11:53"}  # untagged: reported, never claimed


def test_listing_marker_owners():
    assert nb._marker_owners(LISTING) == ["k1", "k2"]


@pytest.mark.parametrize("raw, want", [
    ("203.0.113.7", "203.0.113.7/32"),
    ({"prefix": {"addr": "203.0.113.0", "len": 24}}, "203.0.113.0/24"),
    ({"range": ["203.0.113.0", "203.0.113.255"]}, "203.0.113.0/24"),
])
def test_listed_networks(raw, want):
    assert nb._listed_net(raw) == want


def test_listed_range_that_is_no_prefix_is_refused():
    with pytest.raises(ValueError):
        nb._listed_net({"range": ["203.0.113.1", "203.0.113.5"]})


# --- base rules (text) ---------------------------------------------------------------------------


def _rules(chain):
    return [r for c, r in nb.base_rules() if c == chain]


def test_translate_tries_most_specific_map_first_and_marks():
    rules = _rules("translate")
    assert rules[0] == "fib daddr type != local return"
    order = [next(w for w in r.split() if w.startswith("@")) for r in rules[1:]]
    assert order == ["@fwd4_host_src", "@fwd4_host", "@fwd4_any_src", "@fwd4_any",
                     "@fwd6_host_src", "@fwd6_host", "@fwd6_any_src", "@fwd6_any"]
    for r, spec in zip(rules[1:], nb.MAPS):
        # ct mark set ct mark | MARK: other users' bits survive; the DNAT
        # looks up the same key in the same map the match used
        assert "ct mark set ct mark | 0x02000000 " in r
        match, dnat = r.split(f" @{spec.name} ct mark set ")
        key = dnat.split(" to ", 1)[1].rsplit(" map ", 1)[0]
        assert match.endswith(key) and dnat.endswith(f"map @{spec.name}")


def test_wildcard_rules_exclude_loopback():
    for r, spec in zip(_rules("translate")[1:], nb.MAPS):
        assert ("daddr != " in r) == (not spec.host)


def test_hairpin_and_masquerade_rules():
    (hp,) = _rules("hairpin")
    assert hp.startswith("ct mark & 0x02000000 == 0x02000000 ")
    assert "fib daddr . iif oif exists" in hp and hp.endswith("ct mark set ct mark | 0x04000000")
    post = _rules("postrouting")
    assert [r.split()[-1] for r in post] == ["masquerade"] * 3
    assert nb.MARK & nb.MASQ == 0


def test_base_text_flushes_then_refills_every_chain():
    lines = nb.base_text().splitlines()
    flushed = [ln.split()[-1] for ln in lines if ln.startswith("flush chain ")]
    assert flushed == [name for name, _ in nb.CHAINS]
    first_rule = next(i for i, ln in enumerate(lines) if ln.startswith("add rule "))
    assert all(not ln.startswith(("flush", "add chain", "add map", "add set")) for ln in lines[first_rule:])
    assert len(lines) - first_rule == len(nb.base_rules())
    hooked = {ln.split()[4]: (" hook " in ln) for ln in lines if ln.startswith("add chain ")}
    assert hooked == {"prerouting": True, "output": True, "translate": False, "hairpin": True,
                      "postrouting": True}
    # rules + jumps to the chain, as NFTA_CHAIN_USE counts them
    assert nb.expected_use() == {"prerouting": 3, "output": 1, "translate": 11, "hairpin": 1, "postrouting": 3}


def test_declarations_declare_every_map_with_concatenated_data():
    text = nb.declarations()
    for spec in nb.MAPS:
        line = next(ln for ln in text.splitlines() if f" {spec.name} " in ln)
        assert f": {spec.addr_type} . inet_service;" in line
        assert ("flags interval" in line) == spec.sourced
    assert "add set inet vnethook guests { type ipv6_addr; }" in text


def test_accept_fix_text():
    assert nb.accept_fix_text("ip", [], False) == ""
    assert nb.accept_fix_text("ip6", [12, 14], True) == (
        "delete rule ip6 libvirt_network forward handle 12\n"
        "delete rule ip6 libvirt_network forward handle 14\n"
        'insert rule ip6 libvirt_network forward ct mark & 0x02000000 == 0x02000000 accept comment "vnethook"\n')


# --- the kernel: netlink messages, checks, teardown (a private network namespace each) -----------

NO_NETNS = why_no_netns("nft", "ip")
kernel = pytest.mark.skipif(NO_NETNS is not None, reason=NO_NETNS or "")

PRELUDE = """
    import json, socket, subprocess
    from forward_factory import fwd
    from vnethook.firewall import nfnetlink, nftables as nb
    def nft(*args, check=True):
        p = subprocess.run(["nft", *args], capture_output=True, text=True)
        assert p.returncode == 0 or not check, p.stderr
        return p.stdout
    def v6(**kw):
        return fwd(**dict(dict(family=6, subnet="2001:db8:1::/64", guest_address="2001:db8:1::10"), **kw))
    be = nb.NftablesBackend()
    def libvirt():  # the rules libvirt 11.3 creates, on the bridge they name
        subprocess.run(["ip", "link", "add", "virbr9", "type", "bridge"], check=True)
        nft("-f", RULESET)
"""


def _in_netns(body: str):
    return in_netns(textwrap.dedent(PRELUDE) + textwrap.dedent(body))


@kernel
def test_netlink_elements_read_back_as_rendered():
    """Every kind of element (both families, host maps, interval maps with
    sources, ranges, sctp) added over netlink is what libnftables lists
    back as this guest's; re-adding is a no-op, a clash fails the batch
    whole, and deleting by the same rendering empties every map."""
    out = _in_netns("""
        ALL = [fwd(), fwd(protocol="udp", host_ports=(30000, 30299), guest_ports=(40000, 40299)),
               fwd(protocol="sctp", host_address="127.0.0.1", host_ports=(2222, 2222), guest_ports=(22, 22)),
               fwd(host_address="198.51.100.1", sources=("203.0.113.0/24", "198.51.100.9")),
               fwd(sources=("0.0.0.0/0",), host_ports=(9000, 9000)),
               v6(), v6(host_address="::1"), v6(sources=("2001:db8:2::/48",)),
               v6(host_address="2001:db8:9::1", sources=("2001:db8:3::/64",), protocol="udp")]
        els = nb.render_elements(ALL)
        subprocess.run(["nft", "-f", "-"], input=nb.base_text(), text=True, check=True)
        ops = nb.element_ops("add", els.values(), "k1") + nb.marker_ops("add", "k1", els)
        out = {"messages": len(ops), "add": nfnetlink.transaction(ops), "again": nfnetlink.transaction(ops)}
        listing = be._list_table()
        got = {}
        for name, entry in nb._set_items(listing):
            e, owner = nb.parse_listed_element(name, entry)
            got.setdefault(owner, []).append(e.canonical())
        out["same"] = {k: sorted(v) == sorted(els) for k, v in got.items()}
        out["markers"] = nb._marker_owners(listing)
        out["keys"] = [k.hex() for k in nfnetlink.set_keys("inet", "vnethook", "guests")]
        out["marker"] = socket.inet_pton(socket.AF_INET6, nb.guest_marker("k1", els)).hex()
        # the same key with other data, in a batch with a new element: refused whole
        clash = nb.render_elements([fwd(guest_address="192.0.2.99"), fwd(host_ports=(7000, 7000))])
        out["clash"] = nfnetlink.transaction(nb.element_ops("add", clash.values(), "k2"))
        out["after clash"] = "7000" in nft("list", "map", "inet", "vnethook", "fwd4_any")
        dels = nb.element_ops("delete", els.values()) + nb.marker_ops("delete", "k1", els)
        out["delete"] = nfnetlink.transaction(dels)
        out["left"] = [e for _n, e in nb._set_items(be._list_table())]
        out["delete again"] = nfnetlink.transaction(dels)
        print(json.dumps(out))
    """)
    assert out["add"] is None and out["again"] is None
    assert out["messages"] == 10  # 8 maps (fwd4_any: 301 elements, two messages) and the marker
    assert out["same"] == {"k1": True}
    assert out["markers"] == ["k1"] and out["keys"] == [out["marker"]]
    assert out["clash"] is not None and out["after clash"] is False
    assert out["delete"] is None and out["left"] == []
    assert out["delete again"].startswith("ENOENT No such file or directory at message 1 of ")
    assert "(delete elements of inet vnethook fwd" in out["delete again"]


@kernel
def test_base_and_accept_checks_match_the_kernel():
    """The cheap checks see what the listing would: our chains' rules and
    jumps, and exactly one current accept at the top of libvirt's chains;
    a rule of someone else's is never touched."""
    out = _in_netns(f"""
        RULESET = {RULESET!r}
        libvirt()
        out = {{"none": [be._base_intact(), be._accept_problems()[0].count("insert rule")]}}
        be.apply(fwd().key, [fwd()], [])
        out["ensured"] = [be._base_intact(), be._accept_problems(), be.snapshot().problems]
        nft("flush", "chain", "inet", "vnethook", "translate")
        out["flushed chain"] = be._base_intact()
        be.ensure_base()
        out["repaired"] = be._base_intact()
        nft("add", "rule", "ip", "libvirt_network", "forward", "ct", "mark", "&", "0x02000000", "==", "0x02000000",
            "accept", "comment", '"vnethook"')
        nft("insert", "rule", "ip6", "libvirt_network", "forward", "accept", "comment", '"vnethook"')
        nft("insert", "rule", "ip6", "libvirt_network", "forward", "ct", "mark", "&", "0x02000000", "==",
            "0x02000000", "accept", "comment", '"someone else"')
        fixes, problems = be._accept_problems()
        out["fixes"] = fixes.splitlines()
        out["problems"] = problems
        be.ensure_base()
        out["after"] = [be._accept_problems(), nft("list", "chain", "ip6", "libvirt_network", "forward")]
        out["forward4"] = nft("list", "chain", "ip", "libvirt_network", "forward")
        print(json.dumps(out))
    """)
    assert out["none"] == [False, 2]
    assert out["ensured"] == [True, ["", []], []]
    assert out["flushed chain"] is False and out["repaired"] is True
    # ip: a duplicate at the bottom goes; ip6: a stale accept at the top
    # (someone else's accept above it is no reason to keep it) is replaced
    assert [ln.split(" handle ")[0] for ln in out["fixes"]] == [
        "delete rule ip libvirt_network forward",
        "delete rule ip6 libvirt_network forward",
        "delete rule ip6 libvirt_network forward",
        'insert rule ip6 libvirt_network forward ct mark & 0x02000000 == 0x02000000 accept comment "vnethook"']
    assert len(out["problems"]) == 2
    assert out["after"][0] == ["", []]
    chain = [ln.strip() for ln in out["after"][1].splitlines() if "comment" in ln]
    assert chain[0] == 'ct mark & 0x02000000 == 0x02000000 accept comment "vnethook"'
    assert 'ct mark & 0x02000000 == 0x02000000 accept comment "someone else"' in chain
    assert len(chain) == 2
    assert out["forward4"].count('comment "vnethook"') == 1


@kernel
def test_the_last_guest_takes_the_base_and_nothing_else():
    """Removing guests from their records: the first leaves the base (its
    count sees the other), the last takes table and accepts in its own
    transaction, and libvirt's rules are as they were."""
    out = _in_netns(f"""
        RULESET = {RULESET!r}
        libvirt()
        before = nft("list", "ruleset")
        a, b = [fwd()], [fwd(domain="db", guest_address="192.0.2.11", host_ports=(9090, 9090))]
        be.apply(a[0].key, a, [])
        be.apply(b[0].key, b, [])
        loaded = [m for m in ("nftables", "ctypes") if m in sys.modules]  # before the listing below
        out = {{"both": be.snapshot().guests, "loaded": loaded}}
        out["last a"] = be.last_guest("vnethook", a[0].key, be.render_rules(a[0].key, a))
        be.remove(a[0].key, a)
        out["one left"] = [sorted(be.snapshot().guests), nfnetlink.table_exists("inet", "vnethook")]
        out["last b"] = be.last_guest("vnethook", b[0].key, be.render_rules(b[0].key, b))
        be.remove(b[0].key, b)
        out["gone"] = nfnetlink.table_exists("inet", "vnethook")
        out["same as before"] = nft("list", "ruleset") == before
        print(json.dumps(out, default=sorted))
    """)
    assert len(out["both"]) == 2
    assert out["loaded"] == []  # the fast paths never load the binding (nor ctypes)
    assert out["last a"] is False
    assert out["one left"][1] is True and len(out["one left"][0]) == 1
    assert out["last b"] is True
    assert out["gone"] is False and out["same as before"] is True


@kernel
def test_accepts_left_without_our_table_and_the_binding_when_there_is_no_nft_binary():
    """A table deleted under us (firewalld's `nft flush ruleset` spares
    libvirt's here): the snapshot names the family whose accept was left,
    flush() takes it. Without an `nft` binary the base goes through the
    binding, to the same ruleset."""
    out = _in_netns(f"""
        RULESET = {RULESET!r}
        libvirt()
        f = fwd()
        be.apply(f.key, [f], [])
        with_binary = nft("list", "table", "inet", "vnethook")
        nft("delete", "table", "inet", "vnethook")
        handle = next(ln for ln in nft("-a", "list", "chain", "ip6", "libvirt_network", "forward").splitlines()
                      if '"vnethook"' in ln).split("# handle ")[1]
        nft("delete", "rule", "ip6", "libvirt_network", "forward", "handle", handle)
        snap = be.snapshot()
        out = {{"left": [snap.base_ok, snap.problems]}}
        be.flush()
        snap = be.snapshot()
        out["flushed"] = [snap.base_ok, snap.problems, nft("list", "ruleset").count("vnethook")]
        from vnethook.firewall import tools
        def missing(name, package="iptables"):
            raise nb.FirewallError(name + " not found")
        tools.find_tool = missing
        fresh = nb.NftablesBackend()
        fresh.apply(f.key, [f], [])
        out["binding used"] = fresh._ctx is not None
        out["same base"] = nft("list", "table", "inet", "vnethook") == with_binary
        print(json.dumps(out))
    """)
    assert out["left"] == [False, ["accept rule in ip libvirt_network forward without table inet vnethook"]]
    assert out["flushed"] == [True, [], 0]
    assert out["binding used"] is True and out["same base"] is True


@kernel
def test_a_forged_record_cannot_delete_another_guests_element():
    """A record of guest a that also names guest b's port (same host port,
    same target: the very element b installed): the fast path's batch
    deletes a's marker for exactly those elements, which does not exist,
    so the kernel refuses the batch whole; the slow path then removes a's
    elements by their comment, and b's forward stays."""
    out = _in_netns(f"""
        RULESET = {RULESET!r}
        libvirt()
        a = fwd()
        b = fwd(domain="db", guest_address="192.0.2.11", host_ports=(9090, 9090))
        be.apply(a.key, [a], [])
        be.apply(b.key, [b], [])
        forged = [a, b.replace(domain=a.domain, mac=a.mac)]
        (unit,) = be.plan(a.key, be.render_rules(a.key, forged), {{}}, None)
        out = {{"fast": nfnetlink.transaction(list(unit.do))}}
        be.remove(a.key, forged)
        out["left"] = be.snapshot().guests
        print(json.dumps(out, default=sorted))
    """)
    assert out["fast"].startswith("ENOENT") and "guests" in out["fast"]
    assert out["left"] == {fwd(domain="db").key: ["tcp *:9090 -> 192.0.2.11:80"]}


RULESET = __file__.rsplit("/tests/", 1)[0] + "/tests/acceptance/rulesets/libvirt-nftables.nft"


# --- import cost ------------------------------------------------------------------------------


def test_module_import_does_not_load_the_binding():
    code = ("import sys; import vnethook.firewall.nftables as m; m.NftablesBackend(); "
            "print('nftables' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.stdout.strip() == "False"


def test_slow_path_names_clashes_with_other_guests(monkeypatch):
    """The clash report is pure logic over a listing (here: the real one above)."""
    backend = nb.NftablesBackend()
    monkeypatch.setattr(backend, "_list_table", lambda: LISTING)
    want = nb.render_elements([fwd(guest_address="192.0.2.12", host_ports=(8080, 8080)),
                               fwd(guest_address="192.0.2.12", protocol="udp", host_ports=(53, 54),
                                   guest_ports=(53, 54))])
    found, marker, clashes = backend._guest_elements("k2", want)
    assert marker and list(found) == ["udp *:53 -> 192.0.2.11:53"]
    assert found["udp *:53 -> 192.0.2.11:53"] == nb.FwdElem(4, "udp", None, 53, None, "192.0.2.11", 53)
    assert clashes == ["tcp *:8080 -> 192.0.2.10:80 (owned by k1)"]
    other = nb.render_elements([fwd(protocol="udp", host_ports=(5353, 5353))])
    _found, _marker, clashes = backend._guest_elements("k3", other)
    assert clashes == ["udp *:5353 -> 192.0.2.11:53 (owned by nobody: untagged)"]
