"""Other managers' iptables FORWARD chains: Docker, ufw, an admin's policy DROP.

An accept is final only in its own base chain. Whatever backend vnethook
uses, a DNATed guest connection also traverses the iptables filter FORWARD
chain of each flavour that has one (nft and legacy x_tables are separate
hooks), and Docker sets its policy to DROP, ufw ships
DEFAULT_FORWARD_POLICY="DROP". So wherever such a chain exists and could
drop, vnethook adds one static rule there:

    -m conntrack --ctstate DNAT -m connmark --mark 0x2000000/0x2000000
    -m comment --comment "vnethook:forward" -j ACCEPT

It accepts only connections vnethook itself DNATed (the ct mark bit every
backend sets with its DNAT), so it opens nothing beyond the map; `source:`
restrictions are part of that DNAT. Placement: first in DOCKER-USER when it
exists (Docker jumps to it first from FORWARD and never touches its
contents, so the rule survives a dockerd restart); otherwise at the head of
FORWARD, where ufw reloads (which rebuild only ufw's own chains) leave it.
It lives while any guest has forwards and goes with the last one.

Everything here but `ensure` is pure: a listing in, batch lines or a
verdict out.
"""

from __future__ import annotations

import os

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False

from vnethook.firewall.base import TAG, FirewallError

if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional, Tuple

OTHERS_TAG = f"{TAG}:forward"
CT_BIT = "0x2000000"
DOCKER_USER = "DOCKER-USER"
FLAVOURS = ("nft", "legacy")
_MANAGED_PREFIXES = ("DOCKER", "ufw-", "ufw6-")
_DEPTH = 8


def accept_spec() -> str:
    return (f"-m conntrack --ctstate DNAT -m connmark --mark {CT_BIT}/{CT_BIT} "
            f'-m comment --comment "{OTHERS_TAG}" -j ACCEPT')


class FilterView:
    """One flavour's and family's filter table, as `iptables-save -t filter` lists it."""

    def __init__(self, policies: "Dict[str, str]", rules: "Dict[str, List[str]]") -> None:
        self.policies = policies  # builtin chain -> policy
        self.rules = rules  # chain -> specs in order (every declared chain present)

    @property
    def forward(self) -> "List[str]":
        return self.rules.get("FORWARD", [])


def parse(text: str) -> "Optional[FilterView]":
    """The filter table of a save listing; None when the flavour has no filter table."""
    policies: "Dict[str, str]" = {}
    rules: "Dict[str, List[str]]" = {}
    inside = False
    for line in text.splitlines():
        if line.startswith("*"):
            inside = line[1:].strip() == "filter"
        elif not inside or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            name, policy = (line[1:].split(" ") + ["-"])[:2]
            rules.setdefault(name, [])
            if policy != "-":
                policies[name] = policy
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            rules.setdefault(chain, []).append(spec)
    if not rules:
        return None
    return FilterView(policies, rules)


def _words(spec: str) -> "List[str]":
    return spec.split(" ")


def _target(spec: str) -> "Tuple[Optional[str], bool]":
    """(target, is_goto) of a rule spec."""
    w = _words(spec)
    for flag, goto in (("-j", False), ("-g", True)):
        if flag in w:
            i = w.index(flag)
            if i + 1 < len(w):
                return w[i + 1], goto
    return None, False


def _elsewhere(spec: str, bridges: "Optional[Iterable[str]]") -> bool:
    """Whether an interface match keeps the rule off guest traffic.

    A positive `-i X` / `-o X` naming an interface that is not one of the
    libvirt bridges (when known: names starting with `virbr` otherwise)
    cannot see a connection forwarded between a host interface and a guest
    bridge... unless it is the host's uplink (`-i`). Only `-o` is decisive:
    our connections leave through the guest's bridge.
    """
    w = _words(spec)
    for i, word in enumerate(w[:-1]):
        if word == "-o" and (i == 0 or w[i - 1] != "!"):
            name = w[i + 1]
            if bridges is not None:
                return not any(_ifmatch(name, b) for b in bridges)
            return not name.startswith("virbr")
    return False


def _ifmatch(pattern: str, name: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


def _unconditional(spec: str) -> bool:
    return spec.split(" -m comment ")[0].strip().startswith("-j ") or spec.startswith("-j ")


def culprit(view: FilterView, chain: str, upto: "Optional[int]" = None,
            bridges: "Optional[Iterable[str]]" = None, depth: int = 0) -> "Optional[str]":
    """The first rule in `chain` (rules [0, upto)) that may drop or reject a
    DNATed guest connection, as "CHAIN: spec", or None.

    Conservative where it cannot know: a DROP/REJECT counts unless an
    out-interface match keeps it off guest bridges; a jump counts if its
    chain has such a rule before an unconditional RETURN or ACCEPT. A goto
    or a jump into an unknown chain counts as what it may do.
    """
    rules = view.rules.get(chain, [])
    for spec in rules[:upto]:
        target, goto = _target(spec)
        if target is None or _elsewhere(spec, bridges):
            continue
        if target in ("DROP", "REJECT"):
            return f"{chain}: {spec}"
        if target in ("ACCEPT", "RETURN"):
            if _unconditional(spec):
                return None
            continue
        if target in view.rules and depth < _DEPTH:
            found = culprit(view, target, None, bridges, depth + 1)
            if found:
                return found
            if goto:
                return None
    return None


def managed(view: FilterView) -> bool:
    """Whether FORWARD could drop a guest connection that passed libvirt:
    policy DROP, or jumps into Docker's or ufw's chains."""
    if view.policies.get("FORWARD") == "DROP":
        return True
    return any((_target(s)[0] or "").startswith(_MANAGED_PREFIXES) for s in view.forward)


def placement(view: FilterView) -> "Optional[str]":
    """Where our accept belongs: DOCKER-USER when FORWARD jumps to it, else
    the head of FORWARD wherever this flavour has a FORWARD chain at all.

    Ahead of time, not only once a manager is there: a dockerd or ufw that
    starts later under running guests inserts its jumps above ours and sets
    policy DROP, and ours (below their returning jumps) still accepts before
    that policy, with no hook or sync in between. A host whose flavour has
    no filter table gets none from us (only `ensure` with a view adds rules).
    """
    if DOCKER_USER in view.rules and any(_target(s)[0] == DOCKER_USER for s in view.forward):
        return DOCKER_USER
    if "FORWARD" in view.rules:
        return "FORWARD"
    return None


def changes(view: "Optional[FilterView]", active: bool, covered: bool = False) -> "List[str]":
    """Batch lines (`-D`/`-I`, no table header) that put our accept where
    it belongs, once, or (not active) take every copy away.

    `covered`: vnethook's own FORWARD jump (an iptables backend of this
    flavour) already accepts in FORWARD, so only DOCKER-USER needs a rule.
    """
    if view is None:
        return []
    spec = accept_spec()
    where = placement(view) if active else None
    if where == "FORWARD" and covered:
        where = None
    out = []
    good = False
    for chain, specs in view.rules.items():
        for i, s in enumerate(specs):
            if s != spec:
                continue
            if chain == where and not good and _in_place(view, chain, i):
                good = True
                continue
            out.append(f"-D {chain} {spec}")
    if where and not good:
        out.append(f"-I {where} 1 {spec}")
    return out


def _in_place(view: FilterView, chain: str, index: int) -> bool:
    """First in DOCKER-USER; in FORWARD, above every rule that may drop."""
    if chain == DOCKER_USER:
        return index == 0
    return culprit(view, chain, index) is None


def verdict(view: "Optional[FilterView]", flavour: str, family: int, jump_first: bool = False,
            bridges: "Optional[Iterable[str]]" = None) -> "Optional[str]":
    """Why this FORWARD chain would drop our DNATed connections, or None.

    `jump_first`: vnethook's own accepting jump is in this FORWARD (an
    iptables backend of this flavour): the backend's own listing judges
    what is above that jump (iptables_rules.FamilyState.problems).
    """
    if view is None or jump_first:
        return None  # judged by the iptables backend itself (what is above its jump)
    name = f"ip{'6' if family == 6 else ''}tables-{flavour} filter"
    spec = accept_spec()
    for chain in (DOCKER_USER, "FORWARD"):
        specs = view.rules.get(chain, [])
        if spec not in specs:
            continue
        i = specs.index(spec)
        if chain == DOCKER_USER:
            if placement(view) != DOCKER_USER:
                continue  # nothing jumps there: not reached
            above = (culprit(view, "FORWARD", _jump_index(view, DOCKER_USER), bridges)
                     or culprit(view, DOCKER_USER, i, bridges))
        else:
            above = culprit(view, "FORWARD", i, bridges)
        if above is None:
            return None
        return f"dropped: {name} {above} (above vnethook's accept)"
    found = culprit(view, "FORWARD", None, bridges)
    if found:
        return f"dropped: {name} {found}"
    if view.policies.get("FORWARD") == "DROP":
        who = _who(view)
        return f"dropped: {name} FORWARD policy DROP{who}"
    return None


def _jump_index(view: FilterView, chain: str) -> int:
    for i, s in enumerate(view.forward):
        if _target(s)[0] == chain:
            return i
    return len(view.forward)


def _who(view: FilterView) -> str:
    names = {(_target(s)[0] or "") for s in view.forward}
    if any(n.startswith("DOCKER") for n in names):
        return ", set by Docker"
    if any(n.startswith(("ufw-", "ufw6-")) for n in names):
        return ", set by ufw"
    return ""


# --- the one side effect --------------------------------------------------------------


def legacy_loaded(proc: str = "/proc/net") -> "Dict[int, bool]":
    """Which families have a legacy x_tables filter table in this netns."""
    out = {}
    for fam, name in ((4, "ip_tables_names"), (6, "ip6_tables_names")):
        try:
            with open(os.path.join(proc, name)) as f:
                out[fam] = "filter" in f.read().split()
        except OSError:
            out[fam] = False
    return out


def _nft_filter_tables() -> "set":
    """Families whose iptables-nft filter table exists (unknown counts as existing:
    the listing then decides, as iptables-nft-save does)."""
    from vnethook.firewall.nfnetlink import table_exists

    return {fam for fam in (4, 6) if table_exists(fam, "filter") is not False}


def _covered_nft_untouched(fam: int) -> bool:
    """Whether changes() would find nothing to do in iptables-nft's filter
    table of `fam` when vnethook's own jump already serves its FORWARD.

    Then only DOCKER-USER could need our accept, and only copies of it
    could need deleting: FORWARD neither jumps to DOCKER-USER nor holds our
    accept, and DOCKER-USER (if it exists) does not hold it. Two netlink
    dumps of one chain each, instead of an iptables-nft-save run that
    fetches the whole table: the first guest's start and the last one's
    stop pay for this. False when unsure (the listing decides).
    """
    from vnethook.firewall.nfnetlink import chain_rules

    tag = OTHERS_TAG.encode()
    forward = chain_rules(fam, "filter", "FORWARD")
    if forward is None or any(tag in r or f"{DOCKER_USER}\0".encode() in r for r in forward):
        return False
    # None here: no such chain (or no answer): a copy in a DOCKER-USER that
    # FORWARD does not jump to is never reached, and sync lists everything.
    user = chain_rules(fam, "filter", DOCKER_USER)
    return not (user and any(tag in r for r in user))


def views(flavours: "Iterable[str]" = FLAVOURS, skip: "Iterable[Tuple[str, int]]" = ()) \
        -> "Dict[Tuple[str, int], Optional[FilterView]]":
    """Every flavour's and family's filter table (None where there is none,
    or where `skip` names it).

    Legacy is listed only where its filter table is loaded: listing it
    would load the x_tables modules.
    """
    out: "Dict[Tuple[str, int], Optional[FilterView]]" = {}
    legacy = legacy_loaded()
    nft = _nft_filter_tables()
    skip = set(skip)
    for flavour in flavours:
        for fam in (4, 6):
            if (flavour == "legacy" and not legacy[fam]) or (flavour == "nft" and fam not in nft) \
                    or (flavour, fam) in skip:
                # iptables-nft-save prints builtin chains even for a table
                # that does not exist; adding to them would create it.
                out[(flavour, fam)] = None
                continue
            from vnethook.firewall.tools import find_tool, run_tool

            tool = f"ip{'6' if fam == 6 else ''}tables-{flavour}-save"
            try:
                status, text, _err, _ = run_tool([find_tool(tool), "-t", "filter"])
            except FirewallError:
                status, text = 1, ""
            out[(flavour, fam)] = parse(text) if status == 0 else None
    return out


def ensure(active: bool, covered: "Optional[str]" = None) -> "List[str]":
    """Put our accept where every other manager's FORWARD needs it (or take
    it away when `active` is false). `covered`: the flavour whose FORWARD
    vnethook's own jump already serves. Returns what could not be done."""
    problems = []
    skip = [("nft", fam) for fam in (4, 6) if covered == "nft" and _covered_nft_untouched(fam)]
    for (flavour, fam), view in views(skip=skip).items():
        lines = changes(view, active, covered == flavour)
        if not lines:
            continue
        from vnethook.firewall.tools import find_tool, run_tool

        tool = f"ip{'6' if fam == 6 else ''}tables-{flavour}-restore"
        batch = "*filter\n" + "\n".join(lines) + "\nCOMMIT\n"
        try:
            status, _out, err, _ = run_tool([find_tool(tool), "--noflush"], batch.encode())
        except FirewallError as e:
            status, err = 1, str(e)
        if status != 0:
            problems.append(f"{tool}: {err.strip()}")
    return problems


# --- native nftables tables on the forward hook ---------------------------------------

# Tables judged elsewhere: iptables-nft's own (listed through iptables-save
# above), libvirt's (our accept is inside it, see firewall/nftables.py) and ours.
_NFT_SKIP = {("ip", "filter"), ("ip6", "filter"), ("ip", "libvirt_network"), ("ip6", "libvirt_network")}
_QUIET = ("counter", "log", "limit")


def _accepts_ours(expr: list) -> bool:
    """`ct status dnat accept` or our ct-mark test followed by accept."""
    if not expr or "accept" not in expr[-1]:
        return False
    for e in expr[:-1]:
        m = e.get("match") if isinstance(e, dict) else None
        if not m:
            if isinstance(e, dict) and any(k in e for k in _QUIET):
                continue
            return False
        left, right = m.get("left"), m.get("right")
        if isinstance(left, dict) and left.get("ct", {}).get("key") == "status":
            if right == "dnat" or (isinstance(right, list) and "dnat" in right):
                continue
        if isinstance(left, dict) and "&" in left and any(
                isinstance(x, dict) and x.get("ct", {}).get("key") == "mark" for x in left["&"]):
            continue
        return False
    return True


def _drops_all(expr: list) -> bool:
    """A rule that drops or rejects every packet reaching it."""
    if not expr or not ("drop" in expr[-1] or "reject" in expr[-1]):
        return False
    return all(isinstance(e, dict) and any(k in e for k in _QUIET) for e in expr[:-1])


def nft_culprits(ruleset: list) -> "List[str]":
    """For each other table's base chain on the forward hook: what drops a
    DNATed guest connection there, judged in rule order (an accept of
    `ct status dnat` or our ct mark first makes the chain harmless).

    `ruleset` is `nft -j list ruleset`'s "nftables" list. Jumps into other
    chains are not followed: what they may do is not known here.
    """
    chains = {}
    rules: "Dict[Tuple[str, str, str], List[list]]" = {}
    for obj in ruleset:
        if "chain" in obj:
            c = obj["chain"]
            chains[(c.get("family"), c.get("table"), c.get("name"))] = c
        elif "rule" in obj:
            r = obj["rule"]
            rules.setdefault((r.get("family"), r.get("table"), r.get("chain")), []).append(r.get("expr") or [])
    out = []
    for (family, table, name), c in sorted(chains.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        if c.get("hook") != "forward" or c.get("type") != "filter" or family in ("bridge", "netdev", "arp"):
            continue
        if (family, table) in _NFT_SKIP or str(table).startswith("vnethook"):
            continue
        where = f"nft {family} {table} chain {name} (hook forward)"
        verdict = None
        for expr in rules.get((family, table, name), []):
            if _accepts_ours(expr):
                verdict = "ok"
                break
            if _drops_all(expr):
                verdict = f"dropped: {where}: a rule drops or rejects everything not accepted above it"
                break
        if verdict is None and c.get("policy") == "drop":
            verdict = f"dropped: {where} policy drop"
        if verdict and verdict != "ok":
            out.append(verdict)
    return out


def nft_ruleset() -> list:
    """The whole ruleset as nft JSON objects ([] when nft cannot list it)."""
    try:
        import nftables  # noqa: PLC0415 - lazy on purpose
    except ImportError:
        return []
    import json

    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, out, _err = nft.cmd("list ruleset")
    if rc != 0 or not out:
        return []
    return [o for o in json.loads(out).get("nftables", []) if "metainfo" not in o]
