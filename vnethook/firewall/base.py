"""The one interface every firewall backend implements.

Backends are the only code with firewall side effects. They receive planned
Forwards (data) and the *record* of what they installed last time for that
guest, and return a new record. The engine persists records in the state
directory, so teardown never guesses and the common path never lists the
whole ruleset: a backend turns `previous -> forwards` into one atomic batch of
deletions and additions.

If `previous` is None (state lost or known to be stale), or the fast batch
fails because the firewall no longer matches the record (someone flushed it,
vnethook was killed mid-change), the backend falls back to finding the
guest's rules by their tag in the firewall and replacing them, still as one
atomic batch.

A record is JSON-serialisable: a list of canonical rule strings. The same
canonical form is what `snapshot()` reports, so the engine can detect drift
by comparing sets, without knowing any backend's syntax.

Ownership: everything a backend creates carries the vnethook tag (a comment
`vnethook:<guest key>` or lives in vnethook's own chains/table). Nothing
else is ever modified, except the single accept rule a backend must keep in
libvirt's forward chain, which is also tagged.
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

    @abc.abstractmethod
    def apply(self, key: str, forwards: Sequence[Forward], previous: Optional[List[str]]) -> List[str]:
        """Make guest `key`'s installed forwards exactly `forwards`.

        Atomic: either the old set or the new set is installed afterwards,
        never a mix. Idempotent. Re-ensures the base (chains, jumps, and the
        accept in libvirt's chain, ahead of libvirt's reject).
        Returns the new record. Raises FirewallError on failure.
        """

    def check_record(self, key: str, rules: List[str]) -> Optional[str]:
        """Why a record's rules must not be used as `previous` for `key`, or
        None. The engine asks before every fast path; a refused record
        makes the backend find the guest's rules by tag instead."""
        return None

    def record_for(self, key: str, forwards: Sequence[Forward]) -> Optional[List[str]]:
        """The record apply() would return for these forwards (pure), or None
        if this backend cannot say without the firewall."""
        return None

    @abc.abstractmethod
    def remove(self, key: str, previous: Optional[List[str]]) -> None:
        """Remove guest `key`'s forwards. Atomic, idempotent."""

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
