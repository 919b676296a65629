"""The driver interface: what each firewall implements, and nothing more.

A driver knows one firewall's syntax and nothing else; nobody else knows
that syntax. It does four things:

- `render_rules(key, forwards)`: pure. Forwards in, the guest's rules as
  data out, keyed by a canonical string. `plan(key, old, new)` turns two
  such renderings into the firewall's commands, and the same function gives
  the inverse (`plan(key, new, old)`), so an addition and its deletion can
  never disagree (firewalld's ipXtables.py/nftables.py `build_*_rules(enable)`
  are the model).
- `list_owned(key)`: what the firewall holds tagged as this guest's, in the
  same canonical form (and `snapshot()`: everything, for sync and status).
- `commit(units)`: apply planned units, each atomically (a unit is what the
  firewall commits whole: an iptables table section, the nftables
  transaction), raising CommitError with the units that went through.
- `ensure_base()`, and the teardown of the base (`teardown_units`).

The diff of the recorded and the wanted forwards, the fast path versus the
slow path, retry, rollback and teardown when the last guest goes live once,
in converge.py, which every driver subclasses.

Ownership: everything a driver creates carries the vnethook tag (a comment
`vnethook:<guest key>`, or it lives in vnethook's own chains/table). Nothing
else is ever modified, except the single accept rule a driver must keep in
libvirt's forward chain, which is also tagged. A record can therefore only
name this guest's rules: what a record renders to is deleted only where the
firewall tags it as this guest's (iptables: the tag is part of every rule
spec deleted, and guest chains are named after the key; nftables: a marker
element that exists only for exactly what this guest installed is deleted
in the same transaction), else the slow path goes by tag.
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Hashable, List, Optional, Sequence, Set

import abc

from vnethook.model import Forward, Value, factory

TAG = "vnethook"


class FirewallError(Exception):
    """A firewall change failed. The firewall is unchanged (atomic batch)."""


class CommitError(FirewallError):
    """commit() stopped at a unit: `done` are the units committed before it.

    The failing unit and every one after it left the firewall unchanged;
    the generic code reverts `done` when a change (not a removal) fails.
    """

    def __init__(self, msg: str, done: Sequence[Unit] = ()) -> None:
        super().__init__(msg)
        self.done = list(done)


class Snapshot(Value, frozen=False):
    """What is installed right now, as found in the firewall itself."""

    guests: Dict[str, Set[str]] = factory(dict)  # key -> canonical rules
    base_ok: bool = True  # base chains/jumps/accept present and in position
    problems: List[str] = factory(list)  # human-readable base issues


class Unit(Value):
    """One unit of atomicity of a planned change: committed whole or not at all.

    `scope`: units of one scope go to the firewall together, in order (an
    iptables family: one restore run; nftables: its table). `part`: which
    unit within the scope (an iptables table section); units with the same
    scope and part can be joined into one. `do` and `undo` are the driver's
    commands (tuples): `undo` reverts `do` and is empty where nothing needs
    putting back (checks, base repairs). `optional`: a teardown that may
    fail because other guests remain: it ends its scope's run, no error.
    """

    scope: Hashable
    part: str
    do: tuple
    undo: tuple = ()
    optional: bool = False


class Owned(Value, frozen=False):
    """What a listing found of one guest: its rules (canonical -> data, as
    render_rules gives them), the scopes where a base of ours exists (where
    a removal may tear it down), and what else the driver needs to plan."""

    rules: Dict[str, Any]
    bases: List[Hashable] = factory(list)
    context: Any = None


class Driver(abc.ABC):
    """One firewall's rendering, listing and committing (see module docstring)."""

    name: str = "abstract"
    # The iptables flavour whose filter FORWARD this backend's own jump
    # already accepts in (see firewall/others.py), if any.
    forward_flavour: Optional[str] = None

    # What render() produces, as a name the record keeps: a record written
    # for another layout (an older release) is not used as `previous`.
    layout: str = "abstract"

    @abc.abstractmethod
    def render_rules(self, key: str, forwards: Sequence[Forward]) -> Dict[str, Any]:
        """The guest's rules as data, keyed by canonical string, in install
        order (pure; FirewallError if a forward cannot be rendered)."""

    def render(self, key: str, forwards: Sequence[Forward]) -> List[str]:
        """The canonical strings of what apply() installs (pure). The same
        form is what snapshot() reports, so the engine can detect drift by
        comparing sets without knowing any firewall's syntax."""
        return self.canonical(self.render_rules(key, forwards))

    def canonical(self, rules: Dict[str, Any]) -> List[str]:
        """render()'s list for rules render_rules gave."""
        return list(rules)

    @abc.abstractmethod
    def list_owned(self, key: str, want: Dict[str, Any]) -> Owned:
        """What the firewall holds tagged as guest `key`'s (the slow path).
        `want`: what is about to be installed (a driver may refuse, with
        FirewallError, what another owner already holds)."""

    @abc.abstractmethod
    def plan(self, key: str, old: Dict[str, Any], new: Dict[str, Any], owned: Optional[Owned]) -> List[Unit]:
        """Units that turn the guest's rules `old` into `new` (either may be
        empty), in commit order, each with its inverse as `undo`.

        `owned` None: `old` comes from the record, unverified; the units must
        then fail (firewall unchanged) unless the firewall holds `old` as
        this guest's. Else `old` is owned.rules, as listed."""

    @abc.abstractmethod
    def commit(self, units: List[Unit]) -> None:
        """Apply `units` in order, each atomically; CommitError (with the
        units done) at the first required one that fails."""

    @abc.abstractmethod
    def teardown_units(self, scope: Hashable, last: bool = False) -> List[Unit]:
        """Units that remove the base in `scope`. Unless `last` (last_guest()
        just said the removal leaves no guest there), they must fail,
        leaving it, while any guest still has rules there."""

    def last_guest(self, scope: Hashable, key: str, old: Dict[str, Any]) -> Optional[bool]:
        """Whether `old` is all that is left in `scope` (None: unknown). An
        optional cheap count: True lets the teardown ride in the removal's
        own transaction, False skips it."""
        return None

    def delete_by_handle(self, scope: Hashable, key: str, old: Dict[str, Any]) -> bool:
        """Optional: remove `old` (not the last guest) from `scope` some
        cheaper way than commit(); False if not done (nothing changed)."""
        return False

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
