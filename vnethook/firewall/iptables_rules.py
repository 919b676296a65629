"""iptables rules as data, shared by the nft and legacy iptables flavours.

Both flavours install the same rules, through their own restore tool.
Rendering once, as data, keeps them identical.

The text form of a rule is exactly what `iptables-save` prints back
(`-d 192.0.2.10/32`, quoted comments, `--dport 30000:30009`). That is the
canonical form rendered from a guest's forwards and reported by snapshots,
so what a record's forwards render to and a listing of the firewall
compare equal as plain string sets. Records hold forwards, never these
strings: nothing here ever parses a rule back.

A canonical rule string is "<family> <table> -A <chain> <spec>", e.g.
`4 nat -A VNETHOOK-D-0123456789 -d 198.51.100.1/32 -p tcp -m tcp --dport 8080 ...`.

Layout: every guest has its own chains (VNETHOOK-D-/-S- in nat, VNETHOOK-F- in
filter, named by a hash of its key), each jumped from the shared
VNETHOOK-* chain by one tagged rule. Why: iptables-nft-restore compares a
deleted rule's spec against every rule it fetched, and x_tables offers no
cheaper delete, so with all guests in shared chains a guest's change grew
with the number of guests. A guest chain is replaced by declaring it
(`:CHAIN`, which flushes it in --noflush mode) and appending its rules,
and removed by -F/-X: none of that compares against other guests' rules.
Only the jump rules in the shared chains are added and deleted by spec.

The "marked" layout (iptables-legacy): every change to a legacy table
replaces the whole table in the kernel (IPT_SO_SET_REPLACE), so its cost
is the number of entries in the tables a change touches, not the change.
This layout keeps per-forward work to one DNAT entry in nat and has no
per-forward filter entry, the way the nftables backend works: VNETHOOK-MARK
(jumped from PREROUTING/OUTPUT) sets ct mark bit 0x2000000 on the new
connection, calls VNETHOOK-DNAT, and clears the bit again if no DNAT fired
(a DNAT ends the nat traversal, so only connections vnethook DNATed keep
it). One static rule in VNETHOOK-FWD accepts DNATed connections with the
bit, and hairpin masquerades are one rule per network subnet, shared by its
guests (the bit says the connection is one of ours, so no port is needed):
tagged `vnethook:hairpin`, checked and added by every guest's apply, never
deleted by a guest's removal, gone with the base when the last guest goes.
Measured with 1000 guests of 2 forwards: 6000 -> 2000 entries per change.

Only stdlib here: the hook path imports this module.
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from vnethook import addr as address
from vnethook.firewall.base import TAG
from vnethook.model import Forward, Value, factory

# re and ipaddress are imported where needed: `stopped` only renders and
# diffs rule strings and never pays for them.

CHAIN_DNAT = "VNETHOOK-DNAT"
CHAIN_SNAT = "VNETHOOK-SNAT"
CHAIN_FWD = "VNETHOOK-FWD"
# A guest's own chains: prefix + 10 hex digits of its key's hash (21 of
# iptables' 28 characters). The name says vnethook, like all we create.
GUEST_CHAINS = {CHAIN_DNAT: "VNETHOOK-D-", CHAIN_SNAT: "VNETHOOK-S-", CHAIN_FWD: "VNETHOOK-F-"}
_GUEST_PREFIXES = frozenset(GUEST_CHAINS.values())
OUR_CHAINS = {"nat": (CHAIN_DNAT, CHAIN_SNAT), "filter": (CHAIN_FWD,)}
# The marked layout (iptables-legacy): one more nat chain, in front of DNAT.
CHAIN_MARK = "VNETHOOK-MARK"
OUR_CHAINS_MARKED = {"nat": (CHAIN_MARK, CHAIN_DNAT, CHAIN_SNAT), "filter": (CHAIN_FWD,)}
CT_BIT = "0x2000000"  # the ct mark bit of connections vnethook DNATed (nftables.MARK too)
SHARED_KEY = "hairpin"  # the tag key of shared rules (never a guest key: those end in -<hash>)
TABLES = ("nat", "filter")  # order of commits: see apply() in the backends
FAMILIES = (4, 6)

LOOPBACK_NET = {4: "127.0.0.0/8", 6: "::1/128"}

_COMMENT_PAT = r'-m comment --comment "?' + TAG + r':([A-Za-z0-9_.-]+)"?'
_comment_re = None


class Rule(Value):
    """One iptables rule, in the order `iptables-save` prints its parts."""

    family: int
    table: str
    chain: str
    target: str
    src: Optional[str] = None
    dst: Optional[str] = None
    dst_negated: bool = False
    protocol: Optional[str] = None
    dport: Optional[str] = None  # "80" or "30000:30009"
    addrtype_local: bool = False  # -m addrtype --dst-type LOCAL
    ctstate: Optional[str] = None
    ctmark: bool = False  # -m connmark --mark CT_BIT/CT_BIT
    comment: Optional[str] = None
    to_destination: Optional[str] = None
    set_xmark: Optional[str] = None  # -j CONNMARK --set-xmark VALUE

    @property
    def spec(self) -> str:
        parts: List[str] = []
        if self.src:
            parts += ["-s", self.src]
        if self.dst:
            if self.dst_negated:
                parts.append("!")
            parts += ["-d", self.dst]
        if self.protocol:
            parts += ["-p", self.protocol]
            if self.dport:
                parts += ["-m", self.protocol, "--dport", self.dport]
        if self.addrtype_local:
            parts += ["-m", "addrtype", "--dst-type", "LOCAL"]
        if self.ctstate:
            parts += ["-m", "conntrack", "--ctstate", self.ctstate]
        if self.ctmark:
            parts += ["-m", "connmark", "--mark", f"{CT_BIT}/{CT_BIT}"]
        if self.comment:
            parts += ["-m", "comment", "--comment", f'"{self.comment}"']
        parts += ["-j", self.target]
        if self.to_destination:
            parts += ["--to-destination", self.to_destination]
        if self.set_xmark:
            parts += ["--set-xmark", self.set_xmark]
        return " ".join(parts)

    @property
    def canonical(self) -> str:
        return f"{self.family} {self.table} -A {self.chain} {self.spec}"


def split_canonical(rule: str) -> Tuple[int, str, str, str]:
    """'4 nat -A CHAIN spec' -> (4, 'nat', 'CHAIN', 'spec')."""
    family, table, dash_a, chain, spec = rule.split(" ", 4)
    if dash_a != "-A":
        raise ValueError(f"not a canonical rule: {rule!r}")
    return int(family), table, chain, spec


def key_of(spec: str) -> Optional[str]:
    """The guest key a rule is tagged with, or None for untagged rules."""
    global _comment_re
    if _comment_re is None:
        import re

        _comment_re = re.compile(_COMMENT_PAT)
    m = _comment_re.search(spec)
    return m.group(1) if m else None


def _host(text: str, family: int) -> str:
    return f"{address.compressed(text)}/{32 if family == 4 else 128}"


def _ports(lo: int, hi: int, sep: str = ":") -> str:
    return str(lo) if lo == hi else f"{lo}{sep}{hi}"


def _to_destination(fw: Forward) -> str:
    addr = address.compressed(fw.guest_address)
    if fw.family == 6:
        addr = f"[{addr}]"
    glo, ghi = fw.guest_ports
    if glo == ghi:
        return f"{addr}:{glo}"
    # Shifted range (xt_nat revision 2): host port base+i -> guest glo+i.
    return f"{addr}:{glo}-{ghi}/{fw.host_ports[0]}"


def render_forward(fw: Forward, marked: bool = False) -> List[Rule]:
    """The DNAT, filter-accept and masquerade rules of one forward.

    `marked` (the legacy layout, see the module docstring): no accept (the
    static one in VNETHOOK-FWD takes marked connections), and the subnet's
    shared hairpin masquerade instead of one per forward.
    """
    fam = fw.family
    tag = f"{TAG}:{fw.key}"
    proto = fw.protocol
    hport = _ports(*fw.host_ports)
    gport = _ports(*fw.guest_ports)
    guest = _host(fw.guest_address, fam)
    rules: List[Rule] = []

    if fw.host_address is None:
        dst, neg = LOOPBACK_NET[fam], True
    else:
        dst, neg = _host(fw.host_address, fam), False
    if fw.sources:
        sources: Sequence[Optional[str]] = [address.network(s) for s in fw.sources]
    elif fw.is_loopback:
        # Only host-originated traffic may use a loopback forward. A packet
        # from outside addressed to 127.x would otherwise be DNATed in
        # PREROUTING before the martian check ever sees it.
        sources = [LOOPBACK_NET[fam]]
    else:
        sources = [None]
    for src in sources:
        rules.append(Rule(fam, "nat", CHAIN_DNAT, "DNAT", src=src, dst=dst, dst_negated=neg,
                          protocol=proto, dport=hport, comment=tag,
                          to_destination=_to_destination(fw)))

    if marked:
        # One per subnet, shared (see the module docstring); loopback
        # sources are masqueraded by a base rule of VNETHOOK-SNAT.
        net = address.network(fw.subnet)
        rules.append(Rule(fam, "nat", CHAIN_SNAT, "MASQUERADE", src=net, dst=net,
                          ctmark=True, comment=f"{TAG}:{SHARED_KEY}"))
        return rules

    rules.append(Rule(fam, "filter", CHAIN_FWD, "ACCEPT", dst=guest, protocol=proto,
                      dport=gport, ctstate="DNAT", comment=tag))

    # Hairpin: a guest on the same network reaching the forward must see
    # replies come back through the host, so hide its address.
    rules.append(Rule(fam, "nat", CHAIN_SNAT, "MASQUERADE", src=address.network(fw.subnet), dst=guest,
                      protocol=proto, dport=gport, ctstate="DNAT", comment=tag))
    if fw.is_loopback and fam == 4:
        # A 127.x source cannot leave the host: rewrite it to the bridge's.
        rules.append(Rule(fam, "nat", CHAIN_SNAT, "MASQUERADE", src=LOOPBACK_NET[4], dst=guest,
                          protocol=proto, dport=gport, ctstate="DNAT", comment=tag))
    return rules


def chain_hash(key: str) -> str:
    """10 hex digits of the key's BLAKE2b: a chain name of 16 characters (limit 28).

    _blake2 directly: hashlib's import loads OpenSSL, on the hook's path.
    """
    try:
        from _blake2 import blake2b
    except ImportError:  # pragma: no cover - every CPython build has it
        from hashlib import blake2b
    return blake2b(key.encode("utf-8", "surrogateescape"), digest_size=5).hexdigest()


def guest_chain(shared: str, key: str) -> str:
    return GUEST_CHAINS[shared] + chain_hash(key)


def is_guest_chain(chain: str) -> bool:
    return chain[:11] in _GUEST_PREFIXES


def place(key: str, rules: Iterable[Rule]) -> List[Rule]:
    """Move rendered rules into the guest's own chains, plus one tagged jump per chain.

    The rules come first, then the jumps (record order; batches order
    their lines themselves).
    """
    out: List[Rule] = []
    jumps: List[Rule] = []
    seen: Set[Tuple[int, str]] = set()
    h = chain_hash(key)
    tag = f"{TAG}:{key}"
    for r in rules:
        if r.comment == f"{TAG}:{SHARED_KEY}":
            out.append(r)  # a subnet's shared rule stays in the shared chain
            continue
        own = GUEST_CHAINS[r.chain] + h
        fields = {f: getattr(r, f) for f in Rule._fields}
        fields["chain"] = own
        out.append(Rule(**fields))
        if (r.family, r.chain) not in seen:
            seen.add((r.family, r.chain))
            jumps.append(Rule(r.family, r.table, r.chain, own, comment=tag))
    return out + jumps


def render(forwards: Iterable[Forward], marked: bool = False) -> List[Rule]:
    """All rules of a guest's forwards, deduplicated, in a stable order."""
    out: List[Rule] = []
    seen: Set[Rule] = set()
    for fw in forwards:
        for r in render_forward(fw, marked):
            if r not in seen:
                seen.add(r)
                out.append(r)
    return out


def our_chains(marked: bool = False) -> Dict[str, Tuple[str, ...]]:
    return OUR_CHAINS_MARKED if marked else OUR_CHAINS


def base_jumps(family: int, marked: bool = False) -> List[Rule]:
    """The jumps from builtin chains into ours; each must exist exactly once.

    FORWARD's jump must be first, ahead of libvirt's (and Docker's) jumps
    to their rejecting chains. The nat jumps go first too, so that a
    forward wins over another tool's DNAT of the same port.
    """
    nat = CHAIN_MARK if marked else CHAIN_DNAT
    return [
        # Never for loopback destinations arriving from outside: a forward
        # bound to 127.0.0.1 is the host's own, reached through OUTPUT only.
        Rule(family, "nat", "PREROUTING", nat, dst=LOOPBACK_NET[family], dst_negated=True,
             addrtype_local=True),
        Rule(family, "nat", "OUTPUT", nat, addrtype_local=True),
        Rule(family, "nat", "POSTROUTING", CHAIN_SNAT),
        Rule(family, "filter", "FORWARD", CHAIN_FWD),
    ]


def base_rules(family: int, marked: bool = False) -> Dict[Tuple[str, str], List[Rule]]:
    """(table, chain) -> the untagged rules that chain holds, exactly and in order.

    Only the marked layout has any: those chains hold nothing else, so a
    chain that differs is declared (flushed) and filled again.
    """
    if not marked:
        return {}
    bit = f"{CT_BIT}/{CT_BIT}"
    return {
        ("nat", CHAIN_MARK): [Rule(family, "nat", CHAIN_MARK, "CONNMARK", set_xmark=bit),
                              Rule(family, "nat", CHAIN_MARK, CHAIN_DNAT),
                              Rule(family, "nat", CHAIN_MARK, "CONNMARK", set_xmark=f"0x0/{CT_BIT}")],
        ("nat", CHAIN_SNAT): ([Rule(family, "nat", CHAIN_SNAT, "MASQUERADE", src=LOOPBACK_NET[4], ctmark=True)]
                              if family == 4 else []),
        ("filter", CHAIN_FWD): [Rule(family, "filter", CHAIN_FWD, "ACCEPT", ctstate="DNAT", ctmark=True)],
    }


def base_use(family: int, marked: bool = False) -> Dict[Tuple[str, str], int]:
    """(table, chain) -> what the kernel counts as that chain's use with no guest:
    its base rules plus the base jumps into it (NFTA_CHAIN_USE)."""
    use: Dict[Tuple[str, str], int] = {}
    for table, chains in our_chains(marked).items():
        for c in chains:
            use[(table, c)] = 0
    for j in base_jumps(family, marked):
        use[(j.table, j.target)] += 1
    for (table, chain), rules in base_rules(family, marked).items():
        use[(table, chain)] += len(rules)
        for r in rules:
            if (table, r.target) in use:
                use[(table, r.target)] += 1
    return use


def is_shared(canonical: str) -> bool:
    """Whether a canonical rule is a shared one (a subnet's hairpin)."""
    return canonical.endswith(f'"{TAG}:{SHARED_KEY}" -j MASQUERADE')


# --- reading iptables-save output -------------------------------------------


class SavedTable(Value, frozen=False):
    chains: Set[str]
    rules: List[Tuple[str, str]]  # (chain, spec) in listed order


def parse_save(text: str) -> Dict[str, SavedTable]:
    """Parse `iptables-save` output into tables of chains and rule specs."""
    tables: Dict[str, SavedTable] = {}
    cur: Optional[SavedTable] = None
    for line in text.splitlines():
        if line.startswith("*"):
            cur = tables.setdefault(line[1:].strip(), SavedTable(set(), []))
        elif cur is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            cur.chains.add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            cur.rules.append((chain, spec))
    return tables


class FamilyState(Value, frozen=False):
    """What one family's listing says about vnethook's rules and base."""

    family: int
    chains: Dict[str, Set[str]]  # table -> our shared chains that exist
    guest_chains: Dict[str, Set[str]]  # table -> guests' own chains that exist
    guests: Dict[str, List[str]]  # key -> canonical rules (listed order)
    untagged: List[str]  # canonical rules in our chains without a tag
    jumps: Dict[Tuple[str, str], List[str]]  # (table, builtin chain) -> our jump specs
    first_forward: Optional[str]  # spec of the first rule in filter FORWARD
    marked: bool = False  # the layout this state was read for
    base: Dict[Tuple[str, str], List[str]] = factory(dict)  # base rules' chain -> untagged specs listed
    shared: List[str] = factory(list)  # canonical shared rules (subnets' hairpins)
    filter_rules: Dict[str, List[str]] = factory(dict)  # filter table: chain -> specs (all of them)

    @property
    def present(self) -> bool:
        return (any(self.chains.values()) or any(self.jumps.values())
                or any(self.guest_chains.values()))

    def base_wrong(self) -> List[Tuple[str, str]]:
        """(table, chain) of base-rule chains whose untagged rules are not exactly the expected."""
        out = []
        for (table, chain), rules in base_rules(self.family, self.marked).items():
            if self.base.get((table, chain), []) != [r.spec for r in rules]:
                out.append((table, chain))
        return out

    def problems(self) -> List[str]:
        """Why the base is not as apply() leaves it; [] when absent or fine."""
        if not self.present:
            return []
        out = []
        for table, chains in our_chains(self.marked).items():
            for c in chains:
                if c not in self.chains.get(table, set()):
                    out.append(f"ipv{self.family} {table}: chain {c} missing")
        jumps = base_jumps(self.family, self.marked)
        for j in jumps:
            found = self.jumps.get((j.table, j.chain), [])
            if j.spec not in found:
                out.append(f"ipv{self.family} {j.table}: jump {j.chain} -> {j.target} missing")
            elif len(found) > 1:
                out.append(f"ipv{self.family} {j.table}: {len(found)} jumps {j.chain} -> {j.target}")
            for spec in found:
                if spec != j.spec:
                    out.append(f"ipv{self.family} {j.table}: stray jump {j.chain} {spec}")
        if self.jumps.get(("filter", "FORWARD")) and self.first_forward != jumps[3].spec:
            # Another manager's jumps above ours (Docker re-inserts its own
            # on every start) are fine as long as none of them may drop.
            from vnethook.firewall.others import FilterView, culprit

            view = FilterView({}, self.filter_rules)
            forward = self.filter_rules.get("FORWARD", [])
            above = culprit(view, "FORWARD", forward.index(jumps[3].spec) if jumps[3].spec in forward else None)
            if above:
                out.append(f"ipv{self.family} filter: {above} is above the FORWARD jump to {CHAIN_FWD} "
                           "and may drop forwarded connections")
        for table, chain in self.base_wrong():
            if chain in self.chains.get(table, set()):
                out.append(f"ipv{self.family} {table}: chain {chain} does not hold exactly its base rules")
        return out


def family_state(family: int, tables: Dict[str, SavedTable], marked: bool = False) -> FamilyState:
    import re

    layout = our_chains(marked)
    ours = {c for cs in layout.values() for c in cs}
    base_specs = {tc: {r.spec for r in rules} for tc, rules in base_rules(family, marked).items()}
    st = FamilyState(family, {}, {}, {}, [], {}, None, marked)
    for table in TABLES:
        t = tables.get(table)
        if t is None:
            continue
        st.chains[table] = t.chains & set(layout[table])
        st.guest_chains[table] = {c for c in t.chains if is_guest_chain(c)}
        # Jumps into any chain of ours (either layout's), so that a base
        # left by the other layout is seen, and replaced.
        jump_re = re.compile(r"(^| )-j (" + "|".join(OUR_CHAINS_MARKED[table]) + r")$")
        if table == "filter":
            st.filter_rules = {c: [] for c in t.chains}
        for chain, spec in t.rules:
            if table == "filter":
                st.filter_rules.setdefault(chain, []).append(spec)
            if table == "filter" and chain == "FORWARD" and st.first_forward is None:
                st.first_forward = spec
            if chain in ours or is_guest_chain(chain):
                canon = f"{family} {table} -A {chain} {spec}"
                k = key_of(spec)
                if k == SHARED_KEY:
                    st.shared.append(canon)
                elif k is not None:
                    st.guests.setdefault(k, []).append(canon)
                elif (table, chain) in base_specs:
                    st.base.setdefault((table, chain), []).append(spec)
                    if spec not in base_specs[(table, chain)]:
                        st.untagged.append(canon)
                else:
                    st.untagged.append(canon)
            elif jump_re.search(spec):
                st.jumps.setdefault((table, chain), []).append(spec)
    if st.shared:
        _attribute_shared(st)
    return st


_TO_DEST = None


def _attribute_shared(st: FamilyState) -> None:
    """List each subnet's hairpin with every guest that has a DNAT into that subnet.

    A guest's record holds the hairpins its forwards need, so a listing
    that shows them next to its DNATs compares equal to its record, and a
    missing hairpin shows up as that guest's drift (which sync repairs).
    """
    import ipaddress
    import re

    global _TO_DEST
    if _TO_DEST is None:
        _TO_DEST = re.compile(r" --to-destination (?:\[([^\]]+)\]|([^: ]+))")
    nets = []
    for canon in st.shared:
        src = _split_src(canon)
        try:
            nets.append((canon, ipaddress.ip_network(src)))
        except ValueError:
            continue
    for rules in st.guests.values():
        dests = set()
        for r in rules:
            m = _TO_DEST.search(r)
            if m:
                try:
                    dests.add(ipaddress.ip_address(m.group(1) or m.group(2)))
                except ValueError:
                    pass
        rules += [canon for canon, net in nets if any(d in net for d in dests) and canon not in rules]


def _split_src(canonical: str) -> str:
    parts = canonical.split()
    return parts[parts.index("-s") + 1] if "-s" in parts else ""


def snapshot_from(states: Iterable[FamilyState]):
    """Build the engine's Snapshot from per-family listings."""
    from vnethook.firewall.base import Snapshot

    snap = Snapshot()
    for st in states:
        for k, rules in st.guests.items():
            snap.guests.setdefault(k, set()).update(rules)
        snap.problems += st.problems()
        snap.problems += [f"untagged rule in a vnethook chain: {r}" for r in st.untagged]
    snap.base_ok = not snap.problems
    return snap


def by_family(rules: Iterable[str]) -> Dict[int, List[str]]:
    out: Dict[int, List[str]] = {}
    for r in rules:
        out.setdefault(int(r.split(" ", 1)[0]), []).append(r)
    return out
