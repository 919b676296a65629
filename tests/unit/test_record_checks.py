"""Records read back from disk are checked before they reach a batch.

A record decides what is deleted and its iptables lines go verbatim into
restore batches, so a line must parse strictly (ir.parse_rule), belong to
its guest, and every forward field must be of the right kind. What the
renderers produce must always pass; tampered variants must not.
"""

from __future__ import annotations

import json
import os

import pytest
from forward_factory import fwd

from vnethook import state
from vnethook.firewall import iptables_rules as ir
from vnethook.firewall.nftables import NftablesBackend, render_elements
from vnethook.model import Forward

FORWARDS = [
    fwd(),
    fwd(protocol="udp", host_ports=(30000, 30009), guest_ports=(40000, 40009)),
    fwd(family=6, subnet="2001:db8:1::/64", guest_address="2001:db8:1::10"),
    fwd(host_address="127.0.0.1", host_ports=(2222, 2222), guest_ports=(22, 22)),
    fwd(host_address="198.51.100.1", sources=("203.0.113.0/24", "198.51.100.7/32")),
    fwd(family=6, subnet="2001:db8:1::/64", guest_address="2001:db8:1::10", protocol="sctp",
        host_address="2001:db8:2::1", sources=("2001:db8:3::/48",)),
]


def iptables_record(forwards, marked):
    return [r.canonical for r in ir.place(forwards[0].key, ir.render(forwards, marked))]


@pytest.mark.parametrize("marked", [False, True])
def test_every_rendered_iptables_line_round_trips_and_passes(marked):
    rec = iptables_record(FORWARDS, marked)
    assert len(rec) > len(FORWARDS)
    for line in rec:
        assert ir.parse_rule(line).canonical == line
    assert ir.check_record(FORWARDS[0].key, rec) is None


@pytest.mark.parametrize("marked", [False, True])
def test_base_rules_parse_too(marked):
    for fam in (4, 6):
        for r in ir.base_jumps(fam, marked) + [x for rs in ir.base_rules(fam, marked).values() for x in rs]:
            assert ir.parse_rule(r.canonical) == r


def _tampered(rec, key):
    dnat = next(line for line in rec if "-j DNAT" in line)
    other = iptables_record([f.replace(domain="db") for f in FORWARDS], True)
    return {
        "newline": dnat + "\n-A FORWARD -j ACCEPT",
        "extra option": dnat.replace(" -j DNAT", " -i eth0 -j DNAT"),
        "foreign table": dnat.replace("4 nat ", "4 mangle "),
        "foreign chain": dnat.replace(dnat.split()[3], "DOCKER", 1),
        "builtin chain, untagged": "4 filter -A FORWARD -j ACCEPT",
        "another guest's chain": next(line for line in other if "-j DNAT" in line),
        "another guest's tag": dnat.replace(f"vnethook:{key}", "vnethook:db-0000000000"),
        "accept in nat": dnat.replace("-j DNAT --to-destination", "-j ACCEPT --to-destination"),
        "wildcard accept": f'4 filter -A {ir.guest_chain(ir.CHAIN_FWD, key)} -m comment --comment "vnethook:{key}" -j ACCEPT',
        "bad address": dnat.replace("192.0.2.10", "192.0.2.300"),
        "bad port": dnat.replace("--dport 8080", "--dport 99999"),
        "spaces doubled": dnat.replace(" -p ", "  -p "),
        "unknown target": dnat.replace("-j DNAT", "-j LOG"),
    }


@pytest.mark.parametrize("case", sorted(_tampered(iptables_record(FORWARDS, True), FORWARDS[0].key)))
def test_tampered_iptables_lines_are_refused(case):
    key = FORWARDS[0].key
    rec = iptables_record(FORWARDS, True)
    bad = _tampered(rec, key)[case]
    why = ir.check_record(key, rec + [bad])
    assert why is not None and repr(bad)[:20] in why


def test_nftables_record_lines_checked():
    b = NftablesBackend.__new__(NftablesBackend)
    rec = sorted(render_elements(FORWARDS))
    assert b.check_record("k", rec) is None
    assert b.check_record("k", rec + [rec[0] + "\nflush ruleset"]) is not None
    assert b.check_record("k", ["tcp *:8080 -> 192.0.2.10:80 ; delete table ip nat"]) is not None


class Paths:
    def __init__(self, root):
        self.state_dir = str(root)
        self.guests_dir = os.path.join(str(root), "guests")


def _write(paths, forwards, over=None):
    key = forwards[0].key
    state.write(paths, key, forwards[0].domain, "iptables-nft", forwards, iptables_record(forwards, True))
    if over:
        p = os.path.join(paths.guests_dir, key + ".json")
        with open(p) as f:
            data = json.load(f)
        data.update(over)
        with open(p, "w") as f:
            json.dump(data, f)
    return key


def test_a_written_record_reads_back(tmp_path):
    paths = Paths(tmp_path)
    key = _write(paths, FORWARDS)
    rec = state.read(paths, key)
    assert rec is not None and state.refused(paths, key) is None
    assert state.forwards_of(rec) == FORWARDS


@pytest.mark.parametrize("over", [
    {"rules": ["4 nat -A VNETHOOK-DNAT -j ACCEPT", 7]},
    {"rules": ["a\nb"]},
    {"backend": "../../bin/sh"},
    {"key": "someone-else"},
    {"pending": "yes"},
    {"forwards": [dict(fwd().to_dict(), guest_address="192.0.2.10; rm")]},
    {"forwards": [dict(fwd().to_dict(), bridge="virbr0/../x")]},
    {"forwards": [dict(fwd().to_dict(), host_ports=[8080, 8090])]},
    {"forwards": [dict(fwd().to_dict(), family=5)]},
    {"forwards": [dict(fwd().to_dict(), sources=["203.0.113.0/99"])]},
    {"forwards": [dict(fwd(domain="db").to_dict())]},
])
def test_malformed_records_are_refused_with_a_reason(tmp_path, over):
    paths = Paths(tmp_path)
    key = _write(paths, FORWARDS, over)
    assert state.read(paths, key) is None
    why = state.refused(paths, key)
    assert why and why.startswith(os.path.join(paths.guests_dir, key + ".json"))


def test_untrusted_record_files_are_refused(tmp_path):
    paths = Paths(tmp_path)
    key = _write(paths, FORWARDS)
    p = os.path.join(paths.guests_dir, key + ".json")
    os.chmod(p, 0o666)
    assert state.read(paths, key) is None and "writable by group and others" in state.refused(paths, key)
    os.chmod(p, 0o600)
    os.rename(p, p + ".real")
    os.symlink(p + ".real", p)
    assert state.read(paths, key) is None and state.refused(paths, key)
    assert state.exists(paths, key)  # a dangling or foreign link still counts as "something was here"
    os.unlink(p)
    os.rename(p + ".real", p)
    os.chown(p, 12345, 0)
    assert state.read(paths, key) is None and "owned by uid 12345" in state.refused(paths, key)


def test_untrusted_state_directories_are_named(tmp_path):
    paths = Paths(tmp_path / "s")
    _write(paths, FORWARDS)
    assert state.distrusted_dir(paths) is None
    os.chmod(paths.guests_dir, 0o777)
    assert state.distrusted_dir(paths) == f"{paths.guests_dir}: writable by group and others"
    os.chmod(paths.guests_dir, 0o700)
    os.rename(paths.state_dir, str(tmp_path / "real"))
    os.symlink(str(tmp_path / "real"), paths.state_dir)
    assert state.distrusted_dir(paths) == f"{paths.state_dir}: a symlink"


def test_forward_from_record_matches_from_dict_for_good_input():
    for f in FORWARDS:
        assert Forward.from_record(f.to_dict()) == Forward.from_dict(f.to_dict()) == f
