"""The one interface every firewall backend implements.

Backends are the only code with firewall side effects, and the only code
that knows a firewall's syntax. They receive planned Forwards (data) and
the forwards they applied last time for that guest (`previous`, from the
engine's record), and re-render both: the record holds *inputs*, never a
backend's output, so it needs no parser per backend and a layout change is
just a different rendering. A backend turns `previous -> forwards` into one
atomic batch of deletions and additions, so the common path never lists
the whole ruleset.

If `previous` is None (state lost, pending, or written for another
layout), or the fast batch fails because the firewall no longer matches it
(someone flushed it, vnethook was killed mid-change), the backend falls
back to finding the guest's rules by their tag in the firewall and
replacing them, still as one atomic batch.

`render()` gives the canonical strings of what `apply()` installs; the
same canonical form is what `snapshot()` reports, so the engine can detect
drift by comparing sets, without knowing any backend's syntax.

Ownership: everything a backend creates carries the vnethook tag (a comment
`vnethook:<guest key>` or lives in vnethook's own chains/table). Nothing
else is ever modified, except the single accept rule a backend must keep in
libvirt's forward chain, which is also tagged. A record can therefore only
name this guest's rules: what `previous` renders to is deleted only where
the firewall tags it as this guest's (iptables: the tag is part of every
rule spec deleted, and guest chains are named after the key; nftables:
the elements' comments are checked first), else the backend goes by tag.
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Sequence, Set

import abc

from vnethook.model import Forward, Value, factory

TAG = "vnethook"


class FirewallError(Exception):
    """A firewall change failed. The firewall is unchanged (atomic batch)."""


class Snapshot(Value, frozen=False):
    """What is installed right now, as found in the firewall itself."""

    guests: Dict[str, Set[str]] = factory(dict)  # key -> canonical rules
    base_ok: bool = True  # base chains/jumps/accept present and in position
    problems: List[str] = factory(list)  # human-readable base issues


class Backend(abc.ABC):
    """Apply, remove, list and verify one guest's forwards."""

    name: str = "abstract"
    # The iptables flavour whose filter FORWARD this backend's own jump
    # already accepts in (see firewall/others.py), if any.
    forward_flavour: Optional[str] = None

    # What render() produces, as a name the record keeps: a record written
    # for another layout (an older release) is not used as `previous`.
    layout: str = "abstract"

    # How often the slow path is tried: a second listing after a race with
    # libvirt or another writer (nothing else changes between attempts).
    attempts = 2

    def apply(self, key: str, forwards: Sequence[Forward], previous: Optional[Sequence[Forward]]) -> List[str]:
        """Make guest `key`'s installed forwards exactly `forwards`.

        `previous`: the forwards applied last time ([] = nothing was ever
        installed, None = unknown: find the guest's rules by tag).
        Atomic: either the old set or the new set is installed afterwards,
        never a mix. Idempotent. Re-ensures the base (chains, jumps, and the
        accept in libvirt's chain, ahead of libvirt's reject).
        Returns render(key, forwards). Raises FirewallError on failure.

        The one place that decides between the fast path (a batch from the
        diff of `previous` and `forwards`, no listing) and the slow path
        (list the guest's tagged rules, replace them), and retries the
        latter; the backends implement the two paths.
        """
        want = self.render(key, forwards)
        if not want:
            self.remove(key, previous)
            return []
        if previous is not None:
            try:
                self._apply_fast(key, forwards, previous)
                return want
            except FirewallError:
                pass  # the firewall no longer holds what `previous` renders to: list and replace
        self._retry(lambda: self._apply_slow(key, forwards))
        return want

    def remove(self, key: str, previous: Optional[Sequence[Forward]]) -> None:
        """Remove guest `key`'s forwards (`previous` as for apply). Atomic,
        idempotent; the base goes with the last guest. Fast and slow path as
        in apply()."""
        if previous is not None and not previous:
            return  # nothing was ever installed
        if previous is not None:
            try:
                self._remove_fast(key, previous)
                return
            except FirewallError:
                pass
        self._retry(lambda: self._remove_slow(key))

    def _retry(self, step) -> None:
        err: Optional[FirewallError] = None
        for _attempt in range(self.attempts):
            try:
                step()
                return
            except FirewallError as e:
                err = e
        assert err is not None
        raise err

    @abc.abstractmethod
    def render(self, key: str, forwards: Sequence[Forward]) -> List[str]:
        """The canonical strings of what apply() installs for these forwards (pure)."""

    @abc.abstractmethod
    def _apply_fast(self, key: str, forwards: Sequence[Forward], previous: Sequence[Forward]) -> None:
        """One atomic change from what `previous` renders to, to `forwards`'
        (non-empty), without listing. FirewallError (firewall unchanged) if
        the firewall does not hold `previous` as this guest's."""

    @abc.abstractmethod
    def _apply_slow(self, key: str, forwards: Sequence[Forward]) -> None:
        """List the guest's tagged rules, replace them with `forwards`' (non-empty)."""

    @abc.abstractmethod
    def _remove_fast(self, key: str, previous: Sequence[Forward]) -> None:
        """Delete what `previous` (non-empty) renders to, without listing,
        and the base if no guest is left; FirewallError as _apply_fast."""

    @abc.abstractmethod
    def _remove_slow(self, key: str) -> None:
        """List the guest's tagged rules, delete them; the base if no guest is left."""

    @abc.abstractmethod
    def snapshot(self) -> Snapshot:
        """List everything vnethook owns (slow path: sync, status, recovery)."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Remove everything vnethook owns, and nothing else."""

    @abc.abstractmethod
    def ensure_base(self) -> None:
        """Re-create base chains/jumps/accept if missing or out of place.

        Called at network start and by sync, because libvirt rebuilds its
        own rules (and may put them ahead of ours) without calling any hook.
        """
