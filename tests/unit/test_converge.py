"""The generic change logic (firewall/converge.py) over a fake driver.

What each real driver commits is proven in tests/acceptance; here: which
path is taken, what is rolled back, and how the teardown rides along.
"""

from __future__ import annotations

import pytest
from forward_factory import fwd
from fresh import run, why_no_netns

from vnethook.firewall.base import CommitError, FirewallError, Owned, Snapshot, Unit
from vnethook.firewall.converge import Backend


class Fake(Backend):
    """Scopes are families; a unit per family; `fail` names scopes whose
    commit fails (after `partial` of its units went through)."""

    name = "fake"

    def __init__(self, last=None, by_handle=False):
        self.log = []
        self.fail = set()
        self.partial = 0
        self.last = last
        self.by_handle = by_handle
        self.listed = {}

    def render_rules(self, key, forwards):
        return {f"{f.family} {f.host_ports[0]}": f.family for f in forwards}

    def list_owned(self, key, want):
        self.log.append(("list", key))
        return Owned(dict(self.listed), [4, 6])

    def plan(self, key, old, new, owned):
        units = []
        for fam in sorted(set(old.values()) | set(new.values())):
            o = tuple(sorted(r for r, f in old.items() if f == fam))
            n = tuple(sorted(r for r, f in new.items() if f == fam))
            units += [Unit(fam, "a", ("a",) + n, ("a",) + o), Unit(fam, "b", ("b",) + n, ("b",) + o)]
        return units

    def commit(self, units):
        done = []
        for u in units:
            if u.scope in self.fail and len([d for d in done if d.scope == u.scope]) >= self.partial:
                if u.optional:
                    continue
                raise CommitError("no", done)
            self.log.append(("commit", u.scope, u.part, u.do, u.optional))
            done.append(u)

    def teardown_units(self, scope, last=False):
        return [Unit(scope, "b", ("teardown", last))]

    def last_guest(self, scope, key, old):
        return self.last

    def delete_by_handle(self, scope, key, old):
        self.log.append(("handle", scope))
        return self.by_handle

    def snapshot(self):
        return Snapshot()

    def flush(self):
        pass

    def ensure_base(self):
        pass


V4 = fwd()
V6 = fwd(family=6, subnet="2001:db8:1::/64", guest_address="2001:db8:1::10")
KEY = V4.key


def commits(log):
    return [e[1:] for e in log if e[0] == "commit"]


def test_fast_path_lists_nothing():
    d = Fake()
    assert d.apply(KEY, [V4], []) == ["4 8080"]
    assert not any(e[0] == "list" for e in d.log)
    assert commits(d.log) == [(4, "a", ("a", "4 8080"), False), (4, "b", ("b", "4 8080"), False)]


def test_a_failed_fast_path_reverts_committed_units_then_lists_and_retries():
    d = Fake()
    d.fail, d.partial = {6}, 1
    with pytest.raises(FirewallError):
        d.apply(KEY, [V4, V6], [V4])
    # fast: 4a 4b 6a, 6b fails -> 6a, 4b, 4a reverted (each family on its own);
    # then the slow path lists, twice
    assert [e[0] for e in d.log if e[0] == "list"] == ["list", "list"]
    first = commits(d.log)[:6]
    assert [(s, p) for s, p, _, _ in first] == [(4, "a"), (4, "b"), (6, "a"), (6, "a"), (4, "b"), (4, "a")]
    assert first[3][2] == ("a",) and first[4][2] == ("b", "4 8080")


def test_a_removal_is_never_reverted_and_stops_at_the_failing_scope():
    d = Fake(last=False)
    d.fail, d.partial = {4}, 1
    d.remove(KEY, [V4, V6])  # the slow path (nothing listed) tears down what it can
    fast = d.log[: d.log.index(("list", KEY))]
    # 4a went through and stays; 4b failed; family 6 is left to the slow path
    assert fast == [("handle", 4), ("commit", 4, "a", ("a",), False)]


@pytest.mark.parametrize("last", [None, True, False])
def test_teardown_rides_with_the_removal(last):
    d = Fake(last=last)
    d.remove(KEY, [V4])
    got = commits(d.log)
    if last is None:  # unknown: a best-effort last step
        assert got[-1] == (4, "b", ("teardown", False), True)  # guarded: must fail while others remain
    elif last:  # the last guest: in the removal's own unit
        assert got == [(4, "a", ("a",), False), (4, "b", ("b", "teardown", True), False)]
    else:  # others remain: the cheaper way, if the driver has one
        assert ("handle", 4) in d.log and not any("teardown" in c[2] for c in got)


def test_slow_removal_tears_down_every_scope_with_a_base():
    d = Fake(last=True)
    d.listed = {"4 8080": 4}
    d.remove(KEY, None)
    got = commits(d.log)
    # a listing never asks the count: the teardown is optional everywhere
    assert (6, "b", ("teardown", False), True) in got and (4, "b", ("teardown", False), True) in got


def test_a_record_of_another_guest_goes_by_tag():
    d = Fake()
    d.remove(KEY, [V4.replace(domain="db")])
    assert ("list", KEY) in d.log


@pytest.mark.skipif(why_no_netns("ip6tables-nft-restore") is not None,
                    reason=why_no_netns("ip6tables-nft-restore") or "")
def test_the_listing_path_deletes_a_jump_listed_twice():
    """A kill mid-change can leave a guest's jump twice; the listing path
    deletes each copy before the guest's chain (the canonical rules are
    keys of a dict: the listing's own list must be used)."""
    out = run("""
        import subprocess
        from forward_factory import fwd
        from vnethook.firewall import iptables_rules as ir
        from vnethook.firewall.iptables_nft import IptablesNftBackend
        fws = [fwd(), fwd(family=6, subnet="2001:db8::/64", guest_address="2001:db8::10")]
        key = fws[0].key
        be = IptablesNftBackend()
        be.apply(key, fws, [])
        subprocess.run(["ip6tables-nft", "-t", "nat", "-A", ir.CHAIN_DNAT, "-m", "comment", "--comment",
                        "vnethook:" + key, "-j", ir.guest_chain(ir.CHAIN_DNAT, key)], check=True)
        be.apply(key, fws[:1], None)
        print("vnethook:" + key in subprocess.run(["ip6tables-nft-save"], capture_output=True, text=True).stdout)
    """, netns=True)
    assert out.split() == ["False"]
