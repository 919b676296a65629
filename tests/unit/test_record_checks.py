"""Records read back from disk are checked before they are used.

A record holds inputs (the forwards applied, the backend, its layout) and
decides what is deleted, so every forward field must be of the right kind
and belong to its guest, and what a record renders to can only name this
guest's rules (iptables: its tag and its own chains). Records of older
releases (rendered rule strings) still read, and are used only when their
forwards render to exactly those strings.
"""

from __future__ import annotations

import json
import os

import pytest
from forward_factory import fwd

from vnethook import state
from vnethook.engine import Engine
from vnethook.firewall import iptables_rules as ir
from vnethook.firewall.base import FirewallError
from vnethook.firewall.iptables_nft import IptablesNftBackend
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
def test_what_a_record_renders_to_names_only_its_guest(marked):
    """Whatever forwards a record holds for `key`, each rendered line is in
    this guest's own chains or carries its tag (deleting it cannot touch
    another guest's rules), and a forward of another guest does not render."""
    key = FORWARDS[0].key
    tag = f'"vnethook:{key}"'
    own = {ir.guest_chain(c, key) for c in ir.GUEST_CHAINS}
    for line in IptablesNftBackend().render(key, FORWARDS) + iptables_record(FORWARDS, marked):
        chain = line.split(" ")[3]
        assert chain in own or tag in line or ir.is_shared(line), line
    with pytest.raises(FirewallError):
        IptablesNftBackend().render(key, [FORWARDS[0].replace(domain="db")])


def test_nftables_deletes_a_records_elements_only_with_their_marker():
    """`delete element` names only the key: every batch that deletes what a
    record renders to also deletes the guest's marker for exactly those
    elements (absent, the batch fails whole), and a forward of another
    guest in the record is refused before any batch."""
    from vnethook.firewall import nftables as nb

    key = FORWARDS[0].key
    mine = render_elements(FORWARDS[:2])
    forged = render_elements(FORWARDS[:2] + [FORWARDS[0].replace(host_ports=(9000, 9000), guest_ports=(90, 90))])
    assert nb.guest_marker(key, mine) != nb.guest_marker(key, forged)
    assert nb.guest_marker(key, mine) != nb.guest_marker("db-0000000000", mine)
    assert nb.guest_marker(key, list(mine)) == nb.guest_marker(key, sorted(mine, reverse=True))
    b = NftablesBackend()
    # The fast path's plan from the record: one netlink transaction (a
    # removal asks nothing of the firewall before it).
    (unit,) = b.plan(key, mine, {}, None)
    assert list(unit.do) == nb.element_ops("delete", mine.values()) + nb.marker_ops("delete", key, mine)
    with pytest.raises(FirewallError):  # another guest's forward in the record: go by tag
        b._previous(key, [FORWARDS[0].replace(domain="db")])


class Paths:
    def __init__(self, root):
        self.state_dir = str(root)
        self.guests_dir = os.path.join(str(root), "guests")


def _write(paths, forwards, over=None):
    key = forwards[0].key
    state.write(paths, key, forwards[0].domain, "iptables-nft", forwards, IptablesNftBackend().layout)
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
    {"layout": "a\nb"},
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


def test_an_older_releases_record_is_used_only_if_its_rules_still_render(tmp_path, caplog):
    """Upgrade with guests running: a record holding rule strings (no layout)
    is converted when its forwards render to exactly them, else the rules
    are found by tag (previous None)."""
    paths = Paths(tmp_path)
    be = IptablesNftBackend()
    key = FORWARDS[0].key
    rules = be.render(key, FORWARDS)
    _write(paths, FORWARDS, {"rules": rules})
    rec = state.read(paths, key)
    del rec["layout"]
    assert Engine._previous(be, key, rec) == FORWARDS
    rec["rules"] = [r.replace("-j DNAT", "-j DNAT ") for r in rules]  # an older rendering
    assert Engine._previous(be, key, rec) is None
    assert Engine._previous(be, key, dict(rec, rules=rules, pending=True)) is None
    assert Engine._previous(be, key, dict(rec, rules=[], layout="shared-chains,accept")) is None
    assert Engine._previous(be, key, dict(rec, layout=be.layout)) == FORWARDS


def test_nftables_first_apply_takes_the_fast_path():
    """previous == [] (nothing installed): no marker to delete, no listing."""
    from vnethook.firewall import nftables as nb

    key = FORWARDS[0].key
    sent = []
    b = NftablesBackend()
    b.commit = lambda units: sent.extend(units)  # type: ignore[method-assign]
    b._accept_problems = lambda: ("", [])  # type: ignore[method-assign]
    b._base_intact = lambda: True  # type: ignore[method-assign]

    def no_listing(*a, **kw):
        raise AssertionError("listed")

    b._guest_elements = no_listing  # type: ignore[method-assign]
    want = render_elements(FORWARDS[:2])
    assert b.apply(key, FORWARDS[:2], []) == sorted(want)
    (unit,) = sent  # the base is intact: no text batch, only the elements
    assert list(unit.do) == nb.element_ops("add", want.values(), key) + nb.marker_ops("add", key, want)
