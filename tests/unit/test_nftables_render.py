"""Pure rendering of the nftables backend: forwards -> elements -> JSON, and back.

No firewall is touched here; the behaviour with real packets is covered by
tests/acceptance (parametrized over all backends). These tests pin down the
parts that must agree with each other without a kernel: the record strings,
the element JSON, what a real nft 1.0.6 listing parses back into, and the
accept-rule repair plan for libvirt's chain.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any, List

import pytest

from vnethook.firewall.base import TAG, FirewallError
from vnethook.firewall import nftables as nb
from vnethook.model import Forward
from forward_factory import fwd


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
    assert e.key_json() == {"concat": ["tcp", 8080]}
    assert e.data_json() == {"concat": ["192.0.2.10", 80]}


def test_range_maps_by_offset_one_element_per_port():
    els = nb.render_elements([fwd(host_ports=(30000, 30999), guest_ports=(40000, 40999))])
    assert len(els) == 1000
    pairs = {(e.host_port, e.guest_port) for e in els.values()}
    assert pairs == {(30000 + i, 40000 + i) for i in range(1000)}


def test_host_address_selects_host_map():
    (e,) = nb.render_elements([fwd(host_address="198.51.100.1")]).values()
    assert e.set_name == "fwd4_host"
    assert e.canonical() == "tcp 198.51.100.1:8080 -> 192.0.2.10:80"
    assert e.key_json() == {"concat": ["198.51.100.1", "tcp", 8080]}


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
    assert e.key_json() == {"concat": ["198.51.100.1", {"prefix": {"addr": "203.0.113.0", "len": 24}}, "tcp", 22]}
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
    assert len({(e.set_name, e.key_text()) for e in els.values()}) == len(els)
    for text, e in els.items():
        assert e.canonical() == text and "\n" not in e.key_text()


def test_add_commands_carry_comment_and_data_delete_only_keys():
    els = nb.render_elements([fwd(), fwd(host_ports=(9000, 9000)), v6()]).values()
    adds = nb.element_commands("add", els, "web1-abc")
    assert [c["add"]["element"]["name"] for c in adds] == ["fwd4_any", "fwd6_any"]
    items = adds[0]["add"]["element"]["elem"]
    assert len(items) == 2
    assert items[0] == [{"elem": {"val": {"concat": ["tcp", 8080]}, "comment": "vnethook:web1-abc"}},
                        {"concat": ["192.0.2.10", 80]}]
    dels = nb.element_commands("delete", els)
    assert dels[0]["delete"]["element"]["elem"][0] == {"concat": ["tcp", 8080]}
    assert all(c["delete"]["element"]["family"] == "inet" and c["delete"]["element"]["table"] == "vnethook"
               for c in dels)


def test_guest_marker_is_stable_and_distinct():
    a, b = nb.guest_marker("web1-0123456789ab"), nb.guest_marker("web2-0123456789ab")
    assert a == nb.guest_marker("web1-0123456789ab") and a != b
    add = nb.marker_command("add", "web1-0123456789ab")["add"]["element"]
    assert add["name"] == nb.GUESTS_SET
    assert add["elem"] == [{"elem": {"val": a, "comment": "vnethook:web1-0123456789ab"}}]
    assert nb.marker_command("delete", "web1-0123456789ab")["delete"]["element"]["elem"] == [a]


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


# --- base rules ------------------------------------------------------------------------------


def _rules(chain):
    return [r["add"]["rule"]["expr"] for r in nb.base_rules() if r["add"]["rule"]["chain"] == chain]


def test_translate_tries_most_specific_map_first_and_marks():
    rules = _rules("translate")
    assert rules[0] == [{"match": {"op": "!=", "left": {"fib": {"result": "type", "flags": ["daddr"]}},
                                   "right": "local"}}, {"return": None}]
    order = [next(m["match"]["right"] for m in r if "match" in m and str(m["match"]["right"]).startswith("@"))
             for r in rules[1:]]
    assert order == ["@fwd4_host_src", "@fwd4_host", "@fwd4_any_src", "@fwd4_any",
                     "@fwd6_host_src", "@fwd6_host", "@fwd6_any_src", "@fwd6_any"]
    for r in rules[1:]:
        # ct mark set ct mark | MARK: other users' bits survive
        assert {"mangle": {"key": {"ct": {"key": "mark"}},
                           "value": {"|": [{"ct": {"key": "mark"}}, nb.MARK]}}} in r
        assert "dnat" in r[-1]
        lookup = next(m["match"]["left"] for m in r if "match" in m and str(m["match"]["right"]).startswith("@"))
        assert r[-1]["dnat"]["addr"]["map"]["key"] == lookup


def test_wildcard_rules_exclude_loopback():
    rules = _rules("translate")[1:]
    for r, spec in zip(rules, nb.MAPS):
        loop = [m for m in r if "match" in m and m["match"]["op"] == "!="]
        assert bool(loop) == (not spec.host)


def test_hairpin_and_masquerade_rules():
    (hp,) = _rules("hairpin")
    assert hp[0] == {"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, nb.MARK]}, "right": nb.MARK}}
    assert {"match": {"op": "==", "left": {"fib": {"result": "oif", "flags": ["daddr", "iif"]}},
                      "right": True}} in hp
    post = _rules("postrouting")
    assert [r[-1] for r in post] == [{"masquerade": None}] * 3
    assert nb.MARK & nb.MASQ == 0


def test_base_commands_flush_then_refill_every_chain():
    cmds = nb.base_commands()
    flushed = [c["flush"]["chain"]["name"] for c in cmds if "flush" in c]
    assert flushed == [name for name, _ in nb.CHAINS]
    first_rule = next(i for i, c in enumerate(cmds) if "rule" in c.get("add", {}))
    assert all("flush" not in c for c in cmds[first_rule:])
    hooks = {c["add"]["chain"]["name"]: c["add"]["chain"].get("hook") for c in cmds if "chain" in c.get("add", {})}
    assert hooks == {"prerouting": "prerouting", "output": "output", "translate": None,
                     "hairpin": "prerouting", "postrouting": "postrouting"}


def test_declarations_declare_every_map_with_concatenated_data():
    text = nb.declarations()
    for spec in nb.MAPS:
        line = next(ln for ln in text.splitlines() if f" {spec.name} " in ln)
        assert f": {spec.addr_type} . inet_service;" in line
        assert ("flags interval" in line) == spec.sourced
    assert "add set inet vnethook guests { type ipv6_addr; }" in text


# --- the accept at the top of libvirt's forward chain -------------------------------------------


def _chain(*rules):
    out: List[dict] = [{"chain": {"family": "ip", "table": "libvirt_network", "name": "forward", "handle": 1}}]
    for h, r in enumerate(rules, start=10):
        out.append({"rule": dict(r, family="ip", table="libvirt_network", chain="forward", handle=h)})
    return out


OURS = {"expr": nb.accept_rule_expr(), "comment": TAG}
JUMP = {"expr": [{"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "guest_input"}}]}


def test_missing_accept_is_inserted_at_the_top():
    (cmd,) = nb.libvirt_fix_commands("ip", _chain(JUMP))
    assert cmd == {"insert": {"rule": {"family": "ip", "table": "libvirt_network", "chain": "forward",
                                       "expr": nb.accept_rule_expr(), "comment": TAG}}}


def test_accept_in_place_needs_nothing():
    assert nb.libvirt_fix_commands("ip6", _chain(OURS, JUMP)) == []


def test_buried_accept_is_moved_to_the_top():
    cmds = nb.libvirt_fix_commands("ip", _chain(JUMP, OURS))
    assert cmds[0] == {"delete": {"rule": {"family": "ip", "table": "libvirt_network", "chain": "forward",
                                           "handle": 11}}}
    assert "insert" in cmds[1]


def test_duplicates_and_stale_accepts_are_replaced():
    stale = {"expr": [{"accept": None}], "comment": TAG}
    cmds = nb.libvirt_fix_commands("ip", _chain(OURS, JUMP, OURS))
    assert cmds == [{"delete": {"rule": {"family": "ip", "table": "libvirt_network", "chain": "forward",
                                         "handle": 12}}}]
    cmds = nb.libvirt_fix_commands("ip", _chain(stale, JUMP))
    assert [next(iter(c)) for c in cmds] == ["delete", "insert"]


def test_foreign_rules_are_never_touched():
    foreign = {"expr": nb.accept_rule_expr(), "comment": "someone else"}
    cmds = nb.libvirt_fix_commands("ip", _chain(foreign, JUMP))
    assert cmds == [nb.libvirt_fix_commands("ip", _chain())[0]]


def test_accept_listing_as_nft_renders_it():
    # what nft 1.0.6 prints for `ct mark & 0x02000000 == 0x02000000 accept`
    listed = [{"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, 33554432]}, "right": 33554432}},
              {"accept": None}]
    assert nb.is_current_accept(listed)
    assert not nb.is_current_accept(listed[:1])
    assert not nb.is_current_accept([{"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, 1]},
                                                "right": 1}}, {"accept": None}])


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
