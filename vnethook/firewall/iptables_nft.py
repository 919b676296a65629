"""Forwards as iptables rules in the nf_tables-backed tables (iptables-nft).

libvirt's iptables backend runs the `iptables` binary, which on current
distributions is iptables-nft. Its REJECT lives in those nft-backed tables,
so our accept must live there too, ahead of libvirt's jumps: a legacy
(x_tables) accept cannot override an nft reject.

Every change is one `iptables-nft-restore --noflush -w` run per family,
fed on stdin. Never one process per rule: a 1000-rule change costs the same
single process as a 1-rule change. iptables-nft-restore commits each table
section (`*nat` ... `COMMIT`) as its own nf_tables transaction, so a change
is atomic per table: a table section is this driver's unit of commit
(converge.py puts back the tables already committed when a later one
fails, and its slow path lists and replaces). So a guest ends with its old
rules or its new ones; only a process killed between two commits can leave
nat from one and filter from the other, which the next apply fixes.
The nat section carries only DNAT/masquerade, the filter section only
accepts of DNATed connections, so such a mix is never a wider opening.

Careful with `--noflush`: declaring an existing user chain (`:CHAIN`)
flushes it, so the shared chains are declared only when a listing showed
them missing; a guest's own chains are declared on purpose, to refill them
(see iptables_rules for the layout).
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import os

from vnethook.firewall import iptables_rules as ir
from vnethook.firewall.base import CommitError, FirewallError, Owned, Snapshot, Unit
from vnethook.firewall.converge import Backend
from vnethook.firewall.tools import MARK, find_tool, run_tool
from vnethook.model import Forward


class RestoreError(FirewallError):
    """A restore run failed; `line` is the batch line it blamed, if it said."""

    def __init__(self, msg: str, line: Optional[int] = None) -> None:
        super().__init__(msg)
        self.line = line


def check_key(key: str, forwards: Sequence[Forward]) -> None:
    for fw in forwards:
        if fw.key != key:
            raise FirewallError(f"forward {fw.describe()} belongs to {fw.key}, not {key}")


class IptablesBackend(Backend):
    """The iptables driver both flavours share: one restore batch per family
    per change. What differs between the flavours is data (tools, layout);
    what only nf_tables can do cheaply, IptablesNftBackend adds."""

    name = "iptables"
    # Each guest in its own chains (iptables_rules.place), or every guest's
    # rules in the shared chains.
    per_guest_chains = True
    # iptables_rules' marked layout: the accept is one static rule for
    # connections that vnethook's own DNAT marked, so another tool's DNAT
    # to a forwarded guest port is still rejected by libvirt, and a
    # forward's `source` holds for the accept too (only its DNAT marks).
    marked = True
    restore_tools: Dict[int, str] = {}
    save_tools: Dict[int, str] = {}

    def __init__(self) -> None:
        self._paths: Dict[str, str] = {}

    # --- plumbing ----------------------------------------------------------

    def _tool(self, name: str) -> str:
        if name not in self._paths:
            self._paths[name] = find_tool(name)
        return self._paths[name]

    def _restore(self, family: int, batch: str) -> None:
        self._restore_steps(family, [batch])

    def _restore_steps(self, family: int, batches: List[str], probe: bool = False) -> int:
        """Run batches in one restore process; how many leading ones committed.

        The first must commit (RestoreError otherwise); later ones may fail
        (a best-effort teardown), which stops the run there. `probe` puts a
        mark first, so that even a first batch that fails is not waited for.
        """
        tool = self._tool(self.restore_tools[family])
        text = [f"{MARK}0\n"] if probe else []
        for i, b in enumerate(batches, 1):
            text += [b, f"{MARK}{i}\n"]
        want = len(batches) + (1 if probe else 0)
        rc, out, err, seen = run_tool([tool, "--noflush", "-w", "-v"], "".join(text).encode(), marks=want)
        done = seen - (1 if probe else 0) if seen else (len(batches) if rc == 0 else 0)
        if done >= 1 or (probe and seen and len(batches) == 0):
            return done
        import re

        msg = " ".join((err or "exited with status %s" % rc).split())
        m = re.search(r"\bline:? (\d+)", msg)
        line = int(m.group(1)) - (1 if probe else 0) if m else None
        raise RestoreError(f"{os.path.basename(tool)} failed: {msg}", line)

    def _save(self, family: int) -> str:
        tool = self._tool(self.save_tools[family])
        rc, out, err, _ = run_tool([tool])
        if rc != 0:
            raise FirewallError(f"{os.path.basename(tool)} failed: {err.strip()}")
        return out

    def _state(self, family: int) -> ir.FamilyState:
        return ir.family_state(family, ir.parse_save(self._save(family)), self.marked)

    @staticmethod
    def _batch(sections: Dict[str, List[str]]) -> str:
        out: List[str] = []
        for table in ir.TABLES:
            lines = sections.get(table)
            if lines:
                out.append(f"*{table}")
                out += lines
                out.append("COMMIT")
        return "\n".join(out) + "\n"

    # --- driver ------------------------------------------------------------

    @property
    def layout(self) -> str:  # type: ignore[override]
        chains = "guest-chains" if self.per_guest_chains else "shared-chains"
        return f"{chains},{'marked' if self.marked else 'accept'}"

    def render_rules(self, key: str, forwards: Sequence[Forward]) -> Dict[str, Any]:
        """Canonical rule strings (they are the data: split_canonical)."""
        check_key(key, forwards)
        try:
            new = ir.render(forwards, self.marked)
        except ValueError as e:
            raise FirewallError(f"cannot render forwards of {key}: {e}") from None
        return {r.canonical: r.canonical for r in (ir.place(key, new) if self.per_guest_chains else new)}

    def list_owned(self, key: str, want: Dict[str, Any]) -> Owned:
        """Both families' listings; one that fails matters only where the
        guest is to have rules (IPv6 may be absent from the kernel)."""
        new_by = ir.by_family(want)
        states: Dict[int, ir.FamilyState] = {}
        for fam in ir.FAMILIES:
            try:
                states[fam] = self._state(fam)
            except FirewallError:
                if new_by.get(fam):
                    raise
        rules = {r: r for st in states.values() for r in st.guests.get(key, [])}
        # also a base left by a removal killed before its teardown
        bases = [fam for fam, st in states.items() if st.guests.get(key) or st.present]
        return Owned(rules, bases, states)

    def plan(self, key: str, old: Dict[str, Any], new: Dict[str, Any], owned: Optional[Owned]) -> List[Unit]:
        """Per family, per table: the lines of _plan(old, new), its inverse
        as undo, and what the base needs.

        Every line rendered from a record names this guest's tag or its own
        chains, so the batch can touch nothing else; a line the firewall
        does not hold fails it (and the slow path lists). Without a
        listing, the base is checked (a missing jump or rule fails the
        batch, which is how a vanished base sends us to the slow path);
        with one, only what it shows wrong is repaired.
        """
        old_by, new_by = ir.by_family(old), ir.by_family(new)
        fams: Iterable[int] = sorted(set(old_by) | set(new_by)) if owned is None else owned.context
        units: List[Unit] = []
        for fam in fams:
            o, n = old_by.get(fam, []), new_by.get(fam, [])
            sections: Dict[str, List[str]] = {"nat": [], "filter": []}
            existing: List[Tuple[str, str]] = []
            fresh = False
            if owned is None:
                if n:
                    fresh = self._base_absent(fam)
                    self._check_lines(fam, n, sections, fresh)
                    if fresh:
                        # Without the base none of the guest's rules can be
                        # there either (a flushed table, firewalld's reload):
                        # whatever the record says, everything is added.
                        o = []
            else:
                st = owned.context[fam]
                # As listed, duplicates included (a kill mid-change can leave
                # a jump twice; each must go before its chain can).
                o = st.guests.get(key, [])
                existing = self._own_chains(st, key)
                if not o and not n and not existing:
                    continue
                if n:
                    flushed = self._base_lines(fam, st, sections)
                    for r in dict.fromkeys(r for r in n if ir.is_shared(r)):
                        _, table, chain, spec = ir.split_canonical(r)
                        if r not in st.shared or (table, chain) in flushed:
                            sections[table].append(f"-A {chain} {spec}")
            self._plan(sections, o, n, existing)
            undo: Dict[str, List[str]] = {"nat": [], "filter": []}
            if new:  # a removal is never reverted (converge.py)
                self._plan(undo, n, o)
            units += [Unit(fam, t, tuple(sections[t]), tuple(undo[t])) for t in ir.TABLES if sections[t]]
        return units

    def _check_lines(self, fam: int, new: List[str], sections: Dict[str, List[str]], fresh: bool) -> None:
        """Lines that fail the batch unless the base and the shared rules the
        guest needs are there (nothing, if netlink said the base is fine);
        `fresh` (no base yet): lines that create it instead."""
        if fresh:
            self._create_base(fam, sections)
        elif not self._base_in_place(fam):
            # FORWARD's jump is re-seated at position 1 every time, as
            # libvirt may have put its own jumps ahead since; the nat
            # jumps are only checked (every rule deletion makes the
            # kernel wait for an RCU grace period).
            for j in ir.base_jumps(fam, self.marked):
                if j.chain == "FORWARD":
                    sections[j.table] += [f"-D {j.chain} {j.spec}", f"-I {j.chain} 1 {j.spec}"]
                else:
                    sections[j.table].append(f"-C {j.chain} {j.spec}")
            # The marked layout's static rules: checked, like the jumps.
            for (table, chain), rules in ir.base_rules(fam, self.marked).items():
                sections[table] += [f"-C {chain} {r.spec}" for r in rules]
        # Shared rules this guest needs: checked (a missing one fails
        # the batch, and the slow path adds it), unless netlink saw them.
        shared = [r for r in dict.fromkeys(new) if ir.is_shared(r)]
        if fresh or not self._shared_in_place(fam, shared):
            for r in shared:
                _, table, chain, spec = ir.split_canonical(r)
                sections[table].append(f"-{'A' if fresh else 'C'} {chain} {spec}")

    def _base_absent(self, fam: int) -> bool:
        """Whether vnethook's chains are known not to exist (False: unknown)."""
        return False

    def _create_base(self, fam: int, sections: Dict[str, List[str]]) -> None:
        """Lines creating our chains, their base rules and the jumps into
        them, in the order the listing path's _base_lines() uses (each table
        commits whole either way; the same order keeps `nft list` the same
        whichever path built the base)."""
        for table, chains in ir.our_chains(self.marked).items():
            sections[table] += [f"-N {c}" for c in chains]
        for (table, chain), rules in ir.base_rules(fam, self.marked).items():
            sections[table] += [f"-A {chain} {r.spec}" for r in rules]
        for j in ir.base_jumps(fam, self.marked):
            sections[j.table].append(f"-I {j.chain} 1 {j.spec}")

    def _base_in_place(self, fam: int) -> bool:
        """Whether the base is known to be in place without checking it in
        the batch (False: check it there)."""
        return False

    def _shared_in_place(self, fam: int, shared: List[str]) -> bool:
        """Whether these shared rules are known to be there (False: check
        them in the batch)."""
        return not shared

    def commit(self, units: List[Unit]) -> None:
        """One restore run per family: its required tables as one step (each
        table section commits on its own), its optional teardown as a later
        step in the same run (one spawn; its failure is normal)."""
        done: List[Unit] = []
        families: List[Any] = list(dict.fromkeys(u.scope for u in units))
        for fam in families:
            req = [u for u in units if u.scope == fam and not u.optional]
            opt = [u for u in units if u.scope == fam and u.optional]
            sections = _sections(req)
            steps = [self._batch(s) for s in (sections, _sections(opt)) if any(s.values())]
            if not steps:
                continue
            try:
                self._restore_steps(fam, steps, probe=not req)
            except FirewallError as e:
                if not req:
                    continue  # only a teardown, and guests remain
                if isinstance(e, RestoreError):
                    went = self._committed(sections, e.line)
                    done += [u for u in req if u.part in went]
                raise CommitError(str(e), done) from None
            done += req

    def _committed(self, sections: Dict[str, List[str]], line: Optional[int]) -> List[str]:
        """Tables of a failed batch that committed before the blamed line."""
        out, end = [], 0
        for table in ir.TABLES:
            lines = sections.get(table)
            if not lines:
                continue
            end += len(lines) + 2
            if line is None or line <= end:
                # No line named: assume nothing committed. The slow path that
                # follows lists the firewall and converges from what it finds.
                break
            out.append(table)
        return out

    @staticmethod
    def _plan(sections: Dict[str, List[str]], old: List[str], new: List[str],
              existing: Iterable[Tuple[str, str]] = ()) -> None:
        """Lines that turn one family's rules of a guest from `old` into `new`.

        A guest chain whose rules change is declared (created, or flushed if
        it exists) and filled again: cheaper than deleting rules by spec,
        and it never compares against another guest's rules. Rules in the
        shared chains (the guest's jumps; or rules of the old one-chain
        layout) are deleted and added by spec. A guest chain no longer
        needed is flushed and deleted once its jump is gone. `existing`:
        (table, chain) of this guest's chains a listing showed, beyond the
        ones `old` has rules in (an empty chain left by a killed run).
        """
        def group(rules: List[str]):
            own: Dict[Tuple[str, str], List[str]] = {}
            shared: List[Tuple[str, str, str]] = []
            for r in rules:
                _, table, chain, spec = ir.split_canonical(r)
                if ir.is_guest_chain(chain):
                    own.setdefault((table, chain), []).append(spec)
                else:
                    shared.append((table, chain, spec))
            return own, shared

        # Rules several guests share (a subnet's hairpin, marked layout):
        # never added or deleted with one guest; apply checks them apart.
        old = [r for r in old if not ir.is_shared(r)]
        new = [r for r in new if not ir.is_shared(r)]
        old_own, old_shared = group(old)
        new_own, new_shared = group(new)
        fill: Dict[str, List[str]] = {}
        for (table, chain), specs in new_own.items():
            if old_own.get((table, chain)) != specs:
                lines = fill.setdefault(table, [])
                lines.append(f":{chain} - [0:0]")
                lines += [f"-A {chain} {spec}" for spec in specs]
        old_set, new_set = set(old_shared), set(new_shared)
        dele = [r for r in old_shared if r not in new_set]
        add = [r for r in new_shared if r not in old_set]
        drop = [tc for tc in dict.fromkeys(list(old_own) + list(existing)) if tc not in new_own]
        for table in ir.TABLES:
            out = sections.setdefault(table, [])
            out += fill.get(table, [])
            out += [f"-D {c} {s}" for t, c, s in dele if t == table]
            out += [f"-A {c} {s}" for t, c, s in add if t == table]
            out += [f"-F {c}" for t, c in drop if t == table]
            out += [f"-X {c}" for t, c in drop if t == table]

    @staticmethod
    def _own_chains(st: ir.FamilyState, key: str) -> List[Tuple[str, str]]:
        h = ir.chain_hash(key)
        names = {p + h for p in ir.GUEST_CHAINS.values()}
        return [(t, c) for t, cs in st.guest_chains.items() for c in sorted(cs) if c in names]

    def _base_lines(self, fam: int, st: ir.FamilyState, sections: Dict[str, List[str]]) -> Set[Tuple[str, str]]:
        """Lines that make chains exist and every jump exist once (FORWARD's first);
        the base chains whose declaring (flushing) they include.

        Only what the listing shows wrong is touched: every rule deletion
        costs the kernel an RCU grace period, so a healthy base costs nothing.
        """
        for table, chains in ir.our_chains(self.marked).items():
            have = st.chains.get(table, set())
            sections[table] += [f":{c} - [0:0]" for c in chains if c not in have]
        flushed: Set[Tuple[str, str]] = set()
        for table, chain in st.base_wrong():
            # These chains hold only their base rules: declare (flush) and
            # fill. Unless guests' rules are there too (an older layout's):
            # then only the base rules are deleted and added again.
            rules = ir.base_rules(fam, self.marked)[(table, chain)]
            where = f" {table} -A {chain} "
            if any(where in r for rs in st.guests.values() for r in rs):
                sections[table] += [f"-D {chain} {spec}" for spec in st.base.get((table, chain), [])]
            elif chain in st.chains.get(table, set()):
                sections[table].append(f":{chain} - [0:0]")
                flushed.add((table, chain))
            sections[table] += [f"-A {chain} {r.spec}" for r in rules]
        for j in ir.base_jumps(fam, self.marked):
            found = st.jumps.get((j.table, j.chain), [])
            ok = found == [j.spec] and (j.chain != "FORWARD" or st.first_forward == j.spec)
            if ok:
                continue
            for spec in found:
                sections[j.table].append(f"-D {j.chain} {spec}")
            sections[j.table].append(f"-I {j.chain} 1 {j.spec}")
        return flushed

    def teardown_units(self, scope: Any, last: bool = False) -> List[Unit]:
        # The same units either way: deleting a chain fails while it holds rules.
        return [Unit(scope, t, tuple(lines)) for t, lines in self._teardown_sections(scope).items() if lines]

    def _teardown_sections(self, fam: int) -> Dict[str, List[str]]:
        sections: Dict[str, List[str]] = {"nat": [], "filter": []}
        for j in ir.base_jumps(fam, self.marked):
            sections[j.table].append(f"-D {j.chain} {j.spec}")
        # Chains holding only base rules are flushed first; deleting a chain
        # that still holds a guest's rules fails, and with it the section
        # (nat comes first, so filter's static accept stays while any DNAT does).
        for table, chain in ir.base_rules(fam, self.marked):
            sections[table].append(f"-F {chain}")
        for table, chains in ir.our_chains(self.marked).items():
            sections[table] += [f"-X {c}" for c in chains]
        return sections

    def snapshot(self) -> Snapshot:
        states = []
        for fam in ir.FAMILIES:
            try:
                states.append(self._state(fam))
            except FirewallError:
                if fam == 4:
                    raise
        return ir.snapshot_from(states)

    def _present_states(self):
        """(family, state) where something of ours exists. An IPv4 listing
        failure is an error; IPv6 may be absent from the kernel."""
        for fam in ir.FAMILIES:
            try:
                st = self._state(fam)
            except FirewallError:
                if fam == 4:
                    raise
                continue
            if st.present:
                yield fam, st

    def flush(self) -> None:
        for fam, st in self._present_states():
            sections: Dict[str, List[str]] = {"nat": [], "filter": []}
            for (table, chain), specs in st.jumps.items():
                sections[table] += [f"-D {chain} {s}" for s in specs]
            for table in ir.TABLES:
                chains = sorted(st.chains.get(table, set()) | st.guest_chains.get(table, set()))
                sections[table] += [f"-F {c}" for c in chains]
                sections[table] += [f"-X {c}" for c in chains]
            self._restore(fam, self._batch(sections))

    def ensure_base(self) -> None:
        # where nothing of ours exists, apply() creates the base
        for fam, st in self._present_states():
            sections: Dict[str, List[str]] = {"nat": [], "filter": []}
            self._base_lines(fam, st, sections)
            if any(sections.values()):
                self._restore(fam, self._batch(sections))



def _sections(units: List[Unit]) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {"nat": [], "filter": []}
    for u in units:
        out[u.part] += u.do
    return out


class IptablesNftBackend(IptablesBackend):
    """iptables-nft: the restore driver, plus what netlink can ask and do
    cheaply in nf_tables (count, check the base, delete by handle)."""

    name = "iptables-nft"
    forward_flavour = "nft"
    # Each guest in its own chains: with nf_tables, a change then touches
    # only the guest's chains and its jumps.
    per_guest_chains = True
    restore_tools = {4: "iptables-nft-restore", 6: "ip6tables-nft-restore"}
    save_tools = {4: "iptables-nft-save", 6: "ip6tables-nft-save"}

    def _base_absent(self, fam: int) -> bool:
        """Whether vnethook's chains seem not to exist (the first guest after
        the last one's teardown): one O(1) netlink request.

        Then the fast batch creates the base itself instead of failing on
        its checks and sending the first guest to the listing path. It
        creates the chains with `-N`, which fails the batch if one exists
        after all (a wrong guess costs what the checks would have); and no
        jump to a chain can exist without the chain.
        """
        from vnethook.firewall.nfnetlink import chain_use

        return all(chain_use(fam, table, chain) is None
                   for table, chains in ir.our_chains(self.marked).items() for chain in chains[:1])

    def _base_in_place(self, fam: int) -> bool:
        """Whether every base jump is there once, FORWARD's first (False if unsure).

        Asked with one netlink dump per builtin chain: `-C`/`-D` lines in the
        batch would make the restore tool fetch every rule of both tables
        (O(guests)). A jump is recognised by its target chain's name in the
        rule's attributes.
        """
        from vnethook.firewall.nfnetlink import chain_rules

        for j in ir.base_jumps(fam, self.marked):
            rules = chain_rules(fam, j.table, j.chain)
            if rules is None:
                return False
            target = j.target.encode() + b"\0"
            if sum(1 for r in rules if target in r) != 1:
                return False
            if j.chain == "FORWARD" and target not in rules[0]:
                return False
        # Chains that hold nothing but their base rules: counted (a wrong
        # one is found and replaced by the listing that sync does).
        for (table, chain), base in ir.base_rules(fam, self.marked).items():
            if chain == ir.CHAIN_SNAT:
                continue  # also holds the subnets' hairpins
            rules = chain_rules(fam, table, chain)
            if rules is None or len(rules) != len(base):
                return False
        return True

    def _shared_in_place(self, fam: int, shared: List[str]) -> bool:
        """Whether each subnet's hairpin this guest needs is in VNETHOOK-SNAT.

        A `-C` line in the batch would make iptables-nft-restore fetch the
        rules of every chain the batch names, VNETHOOK-DNAT's jump of every
        guest among them (O(guests): README, Performance). One dump of
        VNETHOOK-SNAT (a rule per subnet) instead: a hairpin is a rule that
        carries its comment, masquerades, and compares source and
        destination with the subnet's network bytes (the cmp data
        iptables-nft writes for `-s/-d NET/LEN`, masked or not).
        """
        import _socket

        from vnethook.firewall.nfnetlink import attr, chain_rules

        if not shared:
            return True
        rules = chain_rules(fam, "nat", ir.CHAIN_SNAT)
        if rules is None:
            return False
        hairpins = [r for r in rules if f"{ir.TAG}:{ir.SHARED_KEY}".encode() + b"\0" in r
                    and b"MASQUERADE\0" in r]
        for rule in shared:
            _, table, chain, spec = ir.split_canonical(rule)
            args = spec.split()
            if table != "nat" or chain != ir.CHAIN_SNAT or "-s" not in args or "-d" not in args:
                return False
            src, dst = args[args.index("-s") + 1], args[args.index("-d") + 1]
            net, _, plen = src.partition("/")
            if dst != src or not plen.isdigit() or int(plen) == 0:
                return False
            raw = _socket.inet_pton(_socket.AF_INET if fam == 4 else _socket.AF_INET6, net)
            needle = attr(1, raw[:(int(plen) + 7) // 8])  # NFTA_DATA_VALUE of the cmp
            if not any(r.count(needle) >= 2 for r in hairpins):
                return False
        return True

    def last_guest(self, scope: Any, key: str, old: Dict[str, Any]) -> Optional[bool]:
        return self._only_guest(scope, ir.by_family(old).get(scope, []))

    def delete_by_handle(self, scope: Any, key: str, old: Dict[str, Any]) -> bool:
        return self._remove_by_handle(scope, key, ir.by_family(old).get(scope, []))

    def _remove_by_handle(self, fam: int, key: str, old: List[str]) -> bool:
        """Delete the guest's jumps by handle and its chains: one netlink transaction.

        Why: `-D` by spec makes iptables-nft-restore fetch every rule of
        both tables, O(guests). Here the kernel walks only the shared
        chains, and each jump is checked to be exactly the guest's tagged
        jump before its handle is used. False (nothing changed, or an
        unknown outcome that the caller's listing fallback converges) when
        the record is not plainly jumps plus own chains, or anything
        differs from what we expect.
        """
        from vnethook.firewall import nfnetlink

        tag = f"{ir.TAG}:{key}"
        shared_of = {p: c for c, p in ir.GUEST_CHAINS.items()}
        own: Dict[Tuple[str, str], None] = {}
        jumps: Set[str] = set()
        for r in old:
            if ir.is_shared(r):
                continue  # a subnet's hairpin is never removed with one guest
            _, table, chain, _ = ir.split_canonical(r)
            if ir.is_guest_chain(chain):
                if chain != ir.guest_chain(shared_of[chain[:11]], key):
                    return False
                own[(table, chain)] = None
            else:
                jumps.add(r)
        want: Dict[Tuple[str, str], Dict[str, str]] = {}
        expect: Set[str] = set()
        for table, chain in own:
            shared = shared_of[chain[:11]]
            expect.add(ir.Rule(fam, table, shared, chain, comment=tag).canonical)
            want.setdefault((table, shared), {})[chain] = tag
        if not own or jumps != expect:
            return False
        wanted = [(t, c, targets) for (t, c), targets in want.items()]
        # Each jump was most likely created right after its chain's rules:
        # asking for those few handles is O(1) in the other guests; else dump.
        found = nfnetlink.probe_jumps(fam, wanted, len(old) + 4) or nfnetlink.find_jumps(fam, wanted)
        if found is None:
            return False
        return nfnetlink.delete_batch(fam, [(t, c, h) for t, c, _, h in found], list(own))

    def _only_guest(self, fam: int, old: List[str]) -> Optional[bool]:
        """Whether `old` holds everything in the shared chains; None if unknown.

        The kernel counts each chain's rules plus the jumps to it: a shared
        chain holding only this guest's jumps counts the base jumps into it
        plus those. One O(1) netlink request per chain, instead of a
        teardown that fails (and waits for an RCU grace period) whenever
        other guests remain.
        """
        from vnethook.firewall.nfnetlink import chain_use

        expect = ir.base_use(fam, self.marked)
        for r in old:
            _, table, chain, _ = ir.split_canonical(r)
            if (table, chain) in expect and not ir.is_shared(r):
                expect[(table, chain)] += 1
        # Only the shared chains a guest jumps from can tell: every guest
        # has a jump in VNETHOOK-DNAT (a subnet's hairpin outlives its guests).
        expect = {tc: n for tc, n in expect.items() if tc[1] in ir.GUEST_CHAINS}
        if self.marked:
            expect = {tc: n for tc, n in expect.items() if tc[1] == ir.CHAIN_DNAT}
        for (table, chain), n in expect.items():
            use = chain_use(fam, table, chain)
            if use is None:
                return None
            if use != n:
                return False
        return True
