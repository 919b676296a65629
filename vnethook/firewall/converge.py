"""The one place that changes a guest's rules: generic over the drivers.

The engine hands a backend the planned forwards and the forwards applied
last time (`previous`, from its record: the record holds *inputs*, never a
driver's output, so it needs no parser and a layout change is just another
rendering). From here on:

- Fast path: both are rendered and the driver plans one change from the
  old rendering to the new, committed without listing anything; the plan
  fails, firewall unchanged, unless the firewall holds the old rendering
  as this guest's (see base.py, Ownership).
- Slow path, when `previous` is None (state lost, pending, written for
  another layout) or the fast path failed (someone flushed the firewall,
  vnethook was killed mid-change): list what is tagged as this guest's and
  replace it. Tried twice: a second listing after a race with libvirt or
  another writer (nothing else changes between attempts).
- Rollback: a firewall commits in units (an iptables table section, the
  nftables transaction); when a later unit fails, the ones already
  committed are reverted with their inverse, so the guest ends with its old
  rules or its new ones. A removal is not reverted: what it deleted is
  progress, and the slow path that follows deletes the rest.
- Teardown: when a removal leaves no guest in a scope, the base there goes
  too, in the removal's own transaction when the driver can count cheaply
  (`last_guest`), else as a last step that fails harmlessly while other
  guests remain; when the count says others remain, a driver may delete
  some cheaper way (`delete_by_handle`).
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Optional, Sequence

from vnethook.firewall.base import CommitError, Driver, FirewallError, Owned, Unit
from vnethook.model import Forward


class Backend(Driver):
    """A driver plus the generic change logic: what the engine calls."""

    # How often the slow path is tried.
    attempts = 2

    def apply(self, key: str, forwards: Sequence[Forward], previous: Optional[Sequence[Forward]]) -> List[str]:
        """Make guest `key`'s installed forwards exactly `forwards`.

        `previous`: the forwards applied last time ([] = nothing was ever
        installed, None = unknown: find the guest's rules by tag).
        Atomic: either the old set or the new set is installed afterwards,
        never a mix. Idempotent. Re-ensures the base (chains, jumps, and the
        accept in libvirt's chain, ahead of libvirt's reject).
        Returns render(key, forwards). Raises FirewallError on failure.
        """
        want = self.render_rules(key, forwards)
        if not want:
            self.remove(key, previous)
            return []
        if previous is not None:
            try:
                self._change(key, self._previous(key, previous), want, None)
                return self.canonical(want)
            except FirewallError:
                pass  # the firewall no longer holds what `previous` renders to: list and replace
        self._retry(lambda: self._change(key, None, want, self.list_owned(key, want)))
        return self.canonical(want)

    def remove(self, key: str, previous: Optional[Sequence[Forward]]) -> None:
        """Remove guest `key`'s forwards (`previous` as for apply). Atomic,
        idempotent; the base goes with the last guest."""
        if previous is not None and not previous:
            return  # nothing was ever installed
        if previous is not None:
            try:
                self._change(key, self._previous(key, previous), {}, None)
                return
            except FirewallError:
                pass
        self._retry(lambda: self._change(key, None, {}, self.list_owned(key, {})))

    def _previous(self, key: str, previous: Sequence[Forward]) -> Dict[str, Any]:
        """What the record renders to; FirewallError (go by tag) if it holds
        a forward of another guest."""
        if any(f.key != key for f in previous):
            raise FirewallError(f"{self.name}: the recorded forwards are not all {key}'s")
        return self.render_rules(key, previous)

    def _retry(self, step: Callable[[], None]) -> None:
        err: Optional[FirewallError] = None
        for _attempt in range(self.attempts):
            try:
                step()
                return
            except FirewallError as e:
                err = e
        assert err is not None
        raise err

    def _change(self, key: str, old: Optional[Dict[str, Any]], new: Dict[str, Any], owned: Optional[Owned]) -> None:
        """Plan old -> new (old None: as listed in `owned`), commit, and
        revert the committed units of a change that failed half-way."""
        if owned is not None:
            old = owned.rules
        assert old is not None
        units = self.plan(key, old, new, owned)
        if not new:
            self._remove(key, old, owned, units)
            return
        try:
            self.commit(units)
        except CommitError as e:
            undo = [Unit(u.scope, u.part, u.undo) for u in reversed(e.done) if u.undo]
            for scope in dict.fromkeys(u.scope for u in undo):  # each on its own
                try:
                    self.commit([u for u in undo if u.scope == scope])
                except FirewallError:
                    pass  # the slow path that follows lists and converges anyway
            raise

    def _remove(self, key: str, old: Dict[str, Any], owned: Optional[Owned], units: List[Unit]) -> None:
        """Commit a removal scope by scope, each with the base's teardown
        where it may be empty now. Stops at the first scope that fails:
        what went through stays (it is progress), and the slow path lists
        and removes the rest."""
        scopes = list(dict.fromkeys(u.scope for u in units))
        if owned is not None:
            scopes += [s for s in owned.bases if s not in scopes]
        for scope in scopes:
            mine = [u for u in units if u.scope == scope]
            # The count is asked only on the fast path: a listing already
            # cost more than the teardown step it could save.
            last = None if owned is not None else self.last_guest(scope, key, old)
            if last is None:
                mine += [Unit(u.scope, u.part, u.do, optional=True) for u in self.teardown_units(scope)]
            elif last:
                mine = _joined(mine, self.teardown_units(scope, last=True))
            elif self.delete_by_handle(scope, key, old):
                continue
            self.commit(mine)


def _joined(units: List[Unit], more: List[Unit]) -> List[Unit]:
    """`more` appended to the units of the same scope and part (one
    transaction instead of two: a second one on the same table first waits
    for the first one's RCU grace period); the rest after them."""
    out = list(units)
    for m in more:
        for i, u in enumerate(out):
            if (u.scope, u.part) == (m.scope, m.part):
                out[i] = Unit(u.scope, u.part, u.do + m.do, u.undo)
                break
        else:
            out.append(m)
    return out
