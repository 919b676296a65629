"""nftables backend, for libvirt's nftables firewall (libvirt >= 10.4).

Why this shape:

- One table of our own, ``inet vnethook``, holds every DNAT as an *element*
  of a few maps, not as rules. Adding or removing a guest is then one
  transaction of element additions/deletions whose cost does not depend on
  how many other guests exist, and a packet costs one map lookup per rule
  (only the first packet of a connection: nat chains see nothing else).
- Offset mapping of port ranges (host 30000+i -> guest 40000+i) cannot be
  computed by nftables, so a range is one element per port.
- Each element carries the comment ``vnethook:<guest key>``. That comment
  is how the slow path finds a guest's elements without a record.
- Maps, most specific first (per family, 4 and 6):
    ``fwd4_host_src``  daddr . saddr . proto . port  (interval: sources)
    ``fwd4_host``      daddr . proto . port          (hash)
    ``fwd4_any_src``   saddr . proto . port          (interval: sources)
    ``fwd4_any``       proto . port                  (hash)
  ``host`` maps hold forwards bound to one host address, ``any`` maps hold
  forwards for any local non-loopback address. Splitting them (instead of
  encoding "any" as an address interval) keeps the common case in cheap
  hash maps, and lets two forwards share a port on different addresses, or
  an address-bound forward coexist with a wildcard one (the bound one
  wins). Interval ("pipapo") maps are only used when ``sources`` restrict
  a forward, because their updates cost O(size of the map).
- DNATed connections get ct mark bit ``MARK`` (0x02000000), set with
  ``ct mark set ct mark | MARK`` so other users' bits survive. libvirt's
  ``forward`` chain (``ip``/``ip6 libvirt_network``) rejects new
  connections to its guests, and an accept in our own table cannot undo a
  reject in another table's base chain. So we keep exactly one rule, with
  comment ``vnethook``, at the top of libvirt's chain: ``ct mark & MARK ==
  MARK accept``. libvirt reloads keep it in place (they re-insert libvirt's
  rules in its sub-chains); a recreated table loses it, and a jump libvirt
  re-inserts because it was missing lands above it. apply() and
  ensure_base() list that one chain and repair both.
- Hairpin connections (a guest reaches a forward whose target is on the
  bridge it came from) and host connections from 127.0.0.0/8 or ::1 are
  masqueraded, so replies come back through the host. Hairpin is detected
  right after the DNAT, without any per-guest data: chain ``hairpin``
  (prerouting, priority dstnat+1) asks the FIB whether the new destination
  is routed out of the interface the packet came in on
  (``fib daddr . iif oif exists``), and if so sets ct mark bit ``MASQ``
  (0x04000000); postrouting masquerades connections carrying that bit.
  This also holds when br_netfilter bridges the DNATed packet (its IP hooks
  then see the bridge as both input and output device). A guest reaching
  *itself* through a forward additionally needs hairpin mode on its bridge
  port when br_netfilter is active (bridge behaviour, not ours).
- Base chains and their few rules are flushed and re-added inside every
  transaction: ``add table/chain/map`` are idempotent, ``flush chain`` +
  ``add rule`` makes the rules idempotent without listing anything.
- When the last guest goes, everything goes (table and libvirt accepts),
  so a host without forwards carries nothing of ours. "Last" is known
  without listing the maps: set ``guests`` holds one marker element per
  guest that has forwards (an IPv6-typed 128-bit hash of the key and of
  its elements, with the key as comment), and listing it is cheap.
- The record holds forwards, not elements, and ``delete element`` names
  only an element's key, whoever's comment it carries. A change or removal
  from the record therefore deletes the guest's marker for exactly the
  elements the record renders to, in the same transaction: it exists only
  if those are what this guest's last change installed, so a record that
  names another guest's element fails the batch, and the slow path finds
  the guest's elements by their comment instead.

The ``nftables`` binding is imported lazily: the hook's fast paths never
pay for it unless this backend is in use.
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import json

from vnethook import addr
from vnethook.firewall.base import (
    TAG,
    CommitError,
    FirewallError,
    Owned,
    Snapshot,
    Unit,
)
from vnethook.firewall.converge import Backend
from vnethook.firewall.nfnetlink import hold_past_exit as _hold_socket_past_exit
from vnethook.keys import _sha256
from vnethook.model import PROTOCOLS, Forward, Value

FAMILY = "inet"
TABLE = "vnethook"
MARK = 0x02000000  # ct mark bit: connection DNATed by vnethook (libvirt accept)
MASQ = 0x04000000  # ct mark bit: DNATed hairpin connection, masquerade it
LIBVIRT_TABLE = "libvirt_network"
LIBVIRT_CHAIN = "forward"
LIBVIRT_FAMILIES = ("ip", "ip6")
COMMENT_PREFIX = f"{TAG}:"

_PROTO_NUMBERS = {6: "tcp", 17: "udp", 132: "sctp"}
_NAT_PRIO_DST = -100
_NAT_PRIO_SRC = 100
_HAIRPIN_PRIO = _NAT_PRIO_DST + 1  # after our DNAT, before routing


# --------------------------------------------------------------------------
# The maps and sets, and what one element of each means.


class MapSpec(Value):
    """One DNAT map: which packet fields form its key."""

    family: int  # 4 | 6
    host: bool  # key starts with the destination (host) address
    sourced: bool  # key has the source address (interval)

    @property
    def name(self) -> str:
        return f"fwd{self.family}_{'host' if self.host else 'any'}{'_src' if self.sourced else ''}"

    @property
    def addr_type(self) -> str:
        return "ipv4_addr" if self.family == 4 else "ipv6_addr"

    @property
    def proto(self) -> str:
        return "ip" if self.family == 4 else "ip6"

    def key_types(self) -> List[str]:
        t: List[str] = []
        if self.host:
            t.append(self.addr_type)
        if self.sourced:
            t.append(self.addr_type)
        return t + ["inet_proto", "inet_service"]

    def key_expr(self) -> dict:
        parts = []
        if self.host:
            parts.append(_payload(self.proto, "daddr"))
        if self.sourced:
            parts.append(_payload(self.proto, "saddr"))
        parts += [{"meta": {"key": "l4proto"}}, _payload("th", "dport")]
        return {"concat": parts}


# Order matters: the translate chain tries the most specific map first.
MAPS: Tuple[MapSpec, ...] = tuple(
    MapSpec(fam, host, sourced)
    for fam in (4, 6)
    for host, sourced in ((True, True), (True, False), (False, True), (False, False))
)
_MAPS_BY_NAME = {m.name: m for m in MAPS}
_MAPS_BY_KEY = {(m.family, m.host, m.sourced): m for m in MAPS}
GUESTS_SET = "guests"

CHAINS = (
    # name, (type, hook, priority) or None for a regular chain
    ("prerouting", ("nat", "prerouting", _NAT_PRIO_DST)),
    ("output", ("nat", "output", _NAT_PRIO_DST)),
    ("translate", None),
    ("hairpin", ("filter", "prerouting", _HAIRPIN_PRIO)),
    ("postrouting", ("nat", "postrouting", _NAT_PRIO_SRC)),
)


class FwdElem(Value):
    """One port of one forward: one element of one DNAT map."""

    family: int
    protocol: str
    host: Optional[str]  # None = any local non-loopback address
    host_port: int
    source: Optional[str]  # CIDR (with prefix length) or None = anyone
    guest: str
    guest_port: int

    @property
    def map(self) -> MapSpec:
        # A lookup, not a new MapSpec: a 1000-port range asks 1000 elements.
        return _MAPS_BY_KEY[(self.family, self.host is not None, self.source is not None)]

    @property
    def set_name(self) -> str:
        return self.map.name

    def canonical(self) -> str:
        if self.host is None:
            host = "*" if self.family == 4 else "[*]"
        else:
            host = _bracket(self.host, self.family)
        src = f" from {self.source}" if self.source else ""
        return (
            f"{self.protocol} {host}:{self.host_port}{src} -> "
            f"{_bracket(self.guest, self.family)}:{self.guest_port}"
        )

    def key_json(self) -> dict:
        parts: List[Any] = []
        if self.host is not None:
            parts.append(self.host)
        if self.source is not None:
            parts.append(_prefix_json(self.source))
        parts += [self.protocol, self.host_port]
        return {"concat": parts}

    def data_json(self) -> dict:
        return {"concat": [self.guest, self.guest_port]}

    def key_text(self) -> str:
        """The element's key in nft's text syntax (for `get element`; every
        part is a normalised address, a prefix, a known protocol or a number)."""
        parts = [p for p in (self.host, self.source) if p is not None]
        return " . ".join(parts + [self.protocol, str(self.host_port)])


Elem = FwdElem


def _bracket(addr: str, family: int) -> str:
    return f"[{addr}]" if family == 6 else addr


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _prefix_json(cidr: str) -> dict:
    net, _, plen = addr.network(cidr).partition("/")
    return {"prefix": {"addr": net, "len": int(plen)}}


# --------------------------------------------------------------------------
# Pure rendering: forwards -> elements -> JSON commands (one function for add and delete).


def render_elements(forwards: Sequence[Forward]) -> Dict[str, Elem]:
    """Every element the forwards need, keyed by canonical string."""
    out: Dict[str, Elem] = {}
    for f in forwards:
        for e in _forward_elements(f):
            out[e.canonical()] = e
    return out


def _forward_elements(f: Forward) -> List[Elem]:
    where = f"{f.origin}: " if f.origin else ""
    try:
        if f.family not in (4, 6):
            raise ValueError(f"family {f.family!r}")
        if f.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {f.protocol!r}")
        if addr.family(f.guest_address) != f.family:
            raise ValueError(f"guest address {f.guest_address} is not IPv{f.family}")
        guest = addr.compressed(f.guest_address)
        host = None
        if f.host_address is not None:
            if addr.family(f.host_address) != f.family:
                raise ValueError(f"host address {f.host_address} is not IPv{f.family}")
            host = addr.compressed(f.host_address)
        hlo, hhi = f.host_ports
        glo, ghi = f.guest_ports
        if not (0 < hlo <= hhi <= 65535 and 0 < glo <= ghi <= 65535) or hhi - hlo != ghi - glo:
            raise ValueError(f"port ranges {hlo}-{hhi} -> {glo}-{ghi}")
        if f.sources:
            import ipaddress

            nets = [ipaddress.ip_network(s, strict=False) for s in f.sources]
        else:
            nets = []
    except ValueError as exc:
        raise FirewallError(f"{where}cannot render forward {f.describe()}: {exc}") from None
    sources: List[Optional[str]]
    if nets:
        # Sources of the other family restrict nothing in this family; if
        # none is left, the forward must match nobody rather than everybody.
        # Overlapping sources are merged: an interval map refuses overlaps.
        mine = [n for n in nets if n.version == f.family]
        sources = [n.with_prefixlen for n in ipaddress.collapse_addresses(mine)]  # type: ignore[type-var]
    else:
        sources = [None]
    out: List[Elem] = []
    for src in sources:
        for i in range(hhi - hlo + 1):
            out.append(FwdElem(f.family, f.protocol, host, hlo + i, src, guest, glo + i))
    return out


def guest_marker(key: str, elements: Iterable[str] = ()) -> str:
    """The guest's element in set `guests`: 128 bits of a hash of its key
    and its elements' canonical strings, typed as IPv6.

    Why the elements: `delete element` names only an element's key,
    whoever's comment it carries, and a record holds forwards, which could
    name another guest's port. A removal deletes this marker in the same
    transaction as the elements; the marker exists only if those elements
    are exactly what this guest's last change installed, so a record that
    says otherwise fails the whole batch (and the rules are found by tag).
    (Releases before this one used the key alone: their markers go by tag.)
    """
    data = key.encode("utf-8") + b"".join(b"\n" + e.encode("utf-8") for e in sorted(elements))
    return addr.from_bytes(_sha256(data).digest()[:16])


def marker_command(op: str, key: str, elements: Iterable[str] = (), value: Optional[str] = None) -> dict:
    val: Any = value or guest_marker(key, elements)
    if op == "add":
        val = {"elem": {"val": val, "comment": COMMENT_PREFIX + key}}
    return {op: {"element": {"family": FAMILY, "table": TABLE, "name": GUESTS_SET, "elem": [val]}}}


def element_json(e: Elem, key: Optional[str]) -> Any:
    """The element as `add element` wants it (with comment) or `delete element` (key only)."""
    val: Any = e.key_json()
    if key is not None:
        val = {"elem": {"val": val, "comment": COMMENT_PREFIX + key}}
    return [val, e.data_json()] if key is not None else val


def element_commands(op: str, elems: Iterable[Elem], key: Optional[str] = None) -> List[dict]:
    """One add/delete command per map, each carrying all its elements."""
    by_set: Dict[str, List[Any]] = {}
    for e in elems:
        by_set.setdefault(e.set_name, []).append(element_json(e, key if op == "add" else None))
    return [
        {op: {"element": {"family": FAMILY, "table": TABLE, "name": name, "elem": items}}}
        for name, items in sorted(by_set.items())
    ]


def _mark_match(bit: int = MARK) -> dict:
    return {"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, bit]}, "right": bit}}


def _mark_set(bit: int = MARK) -> dict:
    return {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"|": [{"ct": {"key": "mark"}}, bit]}}}


def _loopback(family: int) -> Any:
    return {"prefix": {"addr": "127.0.0.0", "len": 8}} if family == 4 else "::1"


def _rule(chain: str, expr: List[dict]) -> dict:
    return {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "expr": expr}}}


def base_rules() -> List[dict]:
    """The fixed rules of our chains, in order."""
    rules = [
        # A loopback destination arriving from outside is never translated:
        # a forward bound to 127.0.0.1 is the host's own (output hook only).
        _rule("prerouting", [{"match": {"op": "==", "left": _payload("ip", "daddr"), "right": _loopback(4)}},
                             {"return": None}]),
        _rule("prerouting", [{"match": {"op": "==", "left": _payload("ip6", "daddr"), "right": _loopback(6)}},
                             {"return": None}]),
        _rule("prerouting", [{"jump": {"target": "translate"}}]),
        _rule("output", [{"jump": {"target": "translate"}}]),
        _rule(
            "translate",
            [
                {"match": {"op": "!=", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}},
                {"return": None},
            ],
        ),
    ]
    for spec in MAPS:
        expr: List[dict] = [
            # Needed by nft before `th dport`; also skips other protocols early.
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": list(PROTOCOLS)}}}
        ]
        if not spec.host:
            # "any host address" means non-loopback: 127.0.0.1 is opt-in.
            expr.append(
                {"match": {"op": "!=", "left": _payload(spec.proto, "daddr"), "right": _loopback(spec.family)}}
            )
        expr += [
            {"match": {"op": "==", "left": spec.key_expr(), "right": "@" + spec.name}},
            _mark_set(),
            {"dnat": {"family": spec.proto, "addr": {"map": {"key": spec.key_expr(), "data": "@" + spec.name}}}},
        ]
        rules.append(_rule("translate", expr))
    rules.append(
        _rule(
            "hairpin",
            [
                # Cheapest test first: this base chain sees every packet.
                _mark_match(),
                {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}},
                # The (DNATed) destination is routed out of the input interface.
                {"match": {"op": "==", "left": {"fib": {"result": "oif", "flags": ["daddr", "iif"]}}, "right": True}},
                _mark_set(MASQ),
            ],
        )
    )
    for fam in (4, 6):
        proto = "ip" if fam == 4 else "ip6"
        rules.append(
            _rule(
                "postrouting",
                [
                    _mark_match(),
                    {"match": {"op": "==", "left": _payload(proto, "saddr"), "right": _loopback(fam)}},
                    {"masquerade": None},
                ],
            )
        )
    rules.append(_rule("postrouting", [_mark_match(MASQ), {"masquerade": None}]))
    return rules


def declarations() -> str:
    """Our table, maps and sets, in nft's text syntax (idempotent `add`s).

    Text, not JSON, because the JSON parser of nftables 1.0.x cannot
    declare a map whose data is a concatenation (``ipv4_addr .
    inet_service``): it rejects the string form and silently creates a
    plain *set* from the array form, and a DNAT rule referring to that set
    then crashes libnftables (seen with 1.0.6). Every name here is ours and
    fixed, so nothing needs quoting.
    """
    lines = [f"add table {FAMILY} {TABLE}"]
    for spec in MAPS:
        flags = " flags interval;" if spec.sourced else ""
        lines.append(
            f"add map {FAMILY} {TABLE} {spec.name} {{ type {' . '.join(spec.key_types())} : "
            f"{spec.addr_type} . inet_service;{flags} }}"
        )
    lines.append(f"add set {FAMILY} {TABLE} {GUESTS_SET} {{ type ipv6_addr; }}")
    return "\n".join(lines) + "\n"


def base_commands() -> List[dict]:
    """Create (idempotently) the chains and reset their rules (maps: see declarations())."""
    cmds: List[dict] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
    for name, hook in CHAINS:
        c: Dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": name}
        if hook:
            c.update(type=hook[0], hook=hook[1], prio=hook[2], policy="accept")
        cmds.append({"add": {"chain": c}})
    for name, _hook in CHAINS:
        cmds.append({"flush": {"chain": {"family": FAMILY, "table": TABLE, "name": name}}})
    return cmds + base_rules()


def accept_rule_expr() -> List[dict]:
    return [_mark_match(), {"accept": None}]


def is_current_accept(expr: Any) -> bool:
    """Whether a listed rule is today's accept (tolerant of how nft renders it)."""
    if not isinstance(expr, list) or len(expr) != 2 or expr[-1] != {"accept": None}:
        return False
    m = expr[0].get("match") if isinstance(expr[0], dict) else None
    if not m or m.get("op") not in ("==", "in"):
        return False
    left = m.get("left")
    return (
        isinstance(left, dict)
        and left.get("&") == [{"ct": {"key": "mark"}}, MARK]
        and m.get("right") == MARK
    )


def libvirt_fix_commands(family: str, listing: Sequence[dict]) -> List[dict]:
    """Commands that leave exactly one current accept at the top of libvirt's chain.

    `listing` is the `list chain` output (with handles) of that chain; an
    empty result means nothing to change.
    """
    rules = [o["rule"] for o in listing if "rule" in o]
    ours = [r for r in rules if r.get("comment") == TAG]
    keep = None
    if ours and rules[0] is ours[0] and is_current_accept(ours[0].get("expr")):
        keep = ours[0]
    cmds: List[dict] = []
    for r in ours:
        if r is not keep:
            cmds.append(
                {
                    "delete": {
                        "rule": {
                            "family": family,
                            "table": LIBVIRT_TABLE,
                            "chain": LIBVIRT_CHAIN,
                            "handle": r["handle"],
                        }
                    }
                }
            )
    if keep is None:
        cmds.append(
            {
                "insert": {
                    "rule": {
                        "family": family,
                        "table": LIBVIRT_TABLE,
                        "chain": LIBVIRT_CHAIN,
                        "expr": accept_rule_expr(),
                        "comment": TAG,
                    }
                }
            }
        )
    return cmds


# --------------------------------------------------------------------------
# Reading elements back from a listing.


def _listed_addr(v: Any) -> str:
    if isinstance(v, str):
        return addr.compressed(v)
    raise ValueError(f"unexpected address {v!r}")


def _listed_net(v: Any) -> str:
    if isinstance(v, str):
        return addr.network(v)
    if isinstance(v, dict) and "prefix" in v:
        p = v["prefix"]
        return addr.network(f"{p['addr']}/{p['len']}")
    if isinstance(v, dict) and "range" in v:
        import ipaddress

        lo, hi = (ipaddress.ip_address(x) for x in v["range"])
        nets: list = list(ipaddress.summarize_address_range(lo, hi))
        if len(nets) == 1:
            return nets[0].with_prefixlen
    raise ValueError(f"unexpected network {v!r}")


def _listed_proto(v: Any) -> str:
    if isinstance(v, int):
        v = _PROTO_NUMBERS.get(v, str(v))
    if v not in PROTOCOLS:
        raise ValueError(f"unexpected protocol {v!r}")
    return v


def _listed_port(v: Any) -> int:
    if isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
        return int(v)
    raise ValueError(f"unexpected port {v!r}")


def parse_listed_element(set_name: str, entry: Any) -> Tuple[Elem, Optional[str]]:
    """One listed element of one of our maps -> (element, owner key or None)."""
    val, data = entry
    comment = None
    if isinstance(val, dict) and "elem" in val:
        comment = val["elem"].get("comment")
        val = val["elem"]["val"]
    parts = val["concat"] if isinstance(val, dict) and "concat" in val else [val]
    key = comment[len(COMMENT_PREFIX) :] if isinstance(comment, str) and comment.startswith(COMMENT_PREFIX) else None
    spec = _MAPS_BY_NAME[set_name]
    parts = list(parts)
    host = _listed_addr(parts.pop(0)) if spec.host else None
    src = _listed_net(parts.pop(0)) if spec.sourced else None
    proto, port = parts
    gparts = data["concat"] if isinstance(data, dict) else data
    guest, gport = gparts
    e = FwdElem(
        spec.family,
        _listed_proto(proto),
        host,
        _listed_port(port),
        src,
        _listed_addr(guest),
        _listed_port(gport),
    )
    return e, key


def _markers(listing: Sequence[dict]) -> List[Tuple[str, str]]:
    """(guest key, value) of the elements of set `guests` in a table listing."""
    out = []
    for o in listing:
        s = o.get("set")
        if not s or s.get("name") != GUESTS_SET or s.get("table") != TABLE or s.get("family") != FAMILY:
            continue
        for entry in s.get("elem") or ():
            e = entry.get("elem", {}) if isinstance(entry, dict) else {}
            c, v = e.get("comment"), e.get("val")
            if isinstance(c, str) and c.startswith(COMMENT_PREFIX) and isinstance(v, str):
                out.append((c[len(COMMENT_PREFIX) :], v))
    return out


def _marker_owners(listing: Sequence[dict]) -> List[str]:
    """Guest keys named by the elements of set `guests` in a table listing."""
    return [k for k, _v in _markers(listing)]


def _set_items(listing: Sequence[dict]) -> Iterable[Tuple[str, Any]]:
    """(map name, raw element) for every element of our maps in a table listing."""
    for o in listing:
        s = o.get("map")
        if not s or s.get("table") != TABLE or s.get("family") != FAMILY:
            continue
        name = s.get("name")
        if name not in _MAPS_BY_NAME:
            continue
        for entry in s.get("elem") or ():
            yield name, entry


# --------------------------------------------------------------------------


class NftablesBackend(Backend):
    """Forwards as map elements in table inet vnethook (see module docstring)."""

    name = "nftables"

    def __init__(self) -> None:
        self._ctx = None
        self._rendered: Optional[Tuple[Tuple[Forward, ...], Dict[str, Elem]]] = None

    # -- libnftables plumbing

    def _nft(self):
        if self._ctx is None:
            try:
                import nftables  # noqa: PLC0415 - lazy on purpose
            except ImportError as exc:  # pragma: no cover - depends on the host
                raise FirewallError(
                    "the nftables backend needs the nftables Python binding "
                    "(Debian: python3-nftables) under the system Python"
                ) from exc
            ctx = nftables.Nftables()
            ctx.set_handle_output(True)
            self._ctx = ctx
            # Closed by a detached child after we exit (nfnetlink.hold_past_exit):
            # with many guests, closing it ourselves waits for the deleted
            # elements' RCU grace period (README, Performance: measured).
            _hold_socket_past_exit(ctx)
        return self._ctx

    def _run(self, cmds: List[dict]) -> Tuple[int, Any, str]:
        if not cmds:
            return 0, None, ""
        rc, out, err = self._nft().json_cmd({"nftables": cmds})
        return rc, out, err or ""

    def _transaction(self, cmds: List[dict]) -> Optional[str]:
        """Run one atomic batch; the error text, or None on success."""
        rc, _out, err = self._run(cmds)
        return None if rc == 0 else (err.strip() or f"nft returned {rc}")

    def _write(self, cmds: List[dict]) -> Optional[str]:
        """Declare our maps, then run `cmds` (which may use them) as one batch."""
        rc, _out, err = self._nft().cmd(declarations())
        if rc != 0:
            # Never go on: a rule naming a map that is not ours-as-declared
            # can crash libnftables 1.0.x.
            return f"cannot declare table {FAMILY} {TABLE} (run `vnethook flush`?): {(err or '').strip()}"
        return self._transaction(cmds)

    def _list(self, obj: dict) -> Optional[List[dict]]:
        """A listing's objects, or None if the object does not exist."""
        rc, out, _err = self._run([{"list": obj}])
        if rc != 0 or not isinstance(out, dict):
            return None
        return [o for o in out.get("nftables", []) if "metainfo" not in o]

    def _list_table(self) -> Optional[List[dict]]:
        return self._list({"table": {"family": FAMILY, "name": TABLE}})

    def _list_libvirt_chain(self, family: str) -> Optional[List[dict]]:
        return self._list({"chain": {"family": family, "table": LIBVIRT_TABLE, "name": LIBVIRT_CHAIN}})

    def _libvirt_fixes(self) -> Tuple[List[dict], List[str]]:
        cmds: List[dict] = []
        problems: List[str] = []
        for fam in LIBVIRT_FAMILIES:
            listing = self._list_libvirt_chain(fam)
            if listing is None:
                problems.append(
                    f"chain {LIBVIRT_CHAIN} of table {fam} {LIBVIRT_TABLE} not found "
                    "(libvirt not started, or not using nftables): accept rule not installed"
                )
                continue
            cmds += libvirt_fix_commands(fam, listing)
        return cmds, problems

    def _guest_elements(
        self, key: str, want: Optional[Dict[str, Elem]] = None
    ) -> Tuple[Dict[str, Elem], List[str], List[str]]:
        """Slow path: the key's elements as found in our table, the values of
        its markers, and which wanted elements another owner already holds.
        """
        listing = self._list_table()
        found: Dict[str, Elem] = {}
        if listing is None:
            return found, [], []
        marker = [v for k, v in _markers(listing) if k == key]
        wanted_keys = {(e.set_name, json.dumps(e.key_json())): t for t, e in (want or {}).items()}
        clashes: List[str] = []
        for set_name, entry in _set_items(listing):
            try:
                e, owner = parse_listed_element(set_name, entry)
            except (ValueError, TypeError, KeyError):
                continue
            if owner == key:
                found[e.canonical()] = e
            elif (set_name, json.dumps(e.key_json())) in wanted_keys:
                clashes.append(f"{e.canonical()} (owned by {owner or 'nobody: untagged'})")
        return found, marker, sorted(clashes)

    # -- Backend interface

    layout = "maps"

    def render_rules(self, key: str, forwards: Sequence[Forward]) -> Dict[str, Any]:
        """render_elements(), remembered for the last forwards: the engine
        renders for the record, then apply() for the batch (a 1000-port
        range is 1000 elements)."""
        tf = tuple(forwards)
        if self._rendered is None or self._rendered[0] != tf:
            self._rendered = (tf, render_elements(tf))
        return self._rendered[1]

    def canonical(self, rules: Dict[str, Any]) -> List[str]:
        return sorted(rules)

    def list_owned(self, key: str, want: Dict[str, Any]) -> Owned:
        """The guest's elements by their comment, its markers, and which
        wanted elements another owner holds (refused by plan())."""
        found, markers, clashes = self._guest_elements(key, want)
        return Owned(found, [TABLE], (markers, clashes))

    def plan(self, key: str, old: Dict[str, Any], new: Dict[str, Any], owned: Optional[Owned]) -> List[Unit]:
        """One transaction: element deletions and additions, the guest's
        marker, and (when adding) the base and libvirt's accept.

        Re-adding what is already there is a no-op for identical elements,
        and restores them if someone flushed our table. Without a listing,
        the old marker's delete fails the batch unless `old` is what is
        installed as this guest's (guest_marker); an empty `old` means
        nothing was installed, so there is no marker to delete. `undo` stays
        empty: the transaction is the whole change.
        """
        if owned is None:
            markers = [marker_command("delete", key, old)] if old else []
        else:
            values, clashes = owned.context
            if clashes and new:
                raise FirewallError(
                    f"nftables: cannot apply forwards of {key}: already forwarded for another guest: "
                    + "; ".join(clashes[:5])
                    + (f"; and {len(clashes) - 5} more" if len(clashes) > 5 else "")
                )
            markers = [marker_command("delete", key, value=v) for v in values]
        gone = [e for t, e in old.items() if t not in new] if new else list(old.values())
        cmds = element_commands("delete", gone) + markers
        if new:
            fixes, _problems = self._libvirt_fixes()
            cmds = base_commands() + fixes + cmds + self._adds(key, new)
        return [Unit(TABLE, TABLE, tuple(cmds))] if cmds else []

    @staticmethod
    def _adds(key: str, want: Dict[str, Elem]) -> List[dict]:
        return element_commands("add", want.values(), key) + [marker_command("add", key, want)]

    def commit(self, units: List[Unit]) -> None:
        """Each unit is one transaction; one that adds declares our maps first."""
        done: List[Unit] = []
        for u in units:
            if u.part == "teardown":
                self._teardown_if_empty()
                continue
            cmds = list(u.do)
            adds = any("add" in c for c in cmds)
            err = self._write(cmds) if adds else self._transaction(cmds)
            if err is not None:
                what = "apply" if adds else "remove"
                raise CommitError(f"nftables: cannot {what} forwards: {err}", done)
            done.append(u)

    def teardown_units(self, scope: Any) -> List[Unit]:
        """Whether any guest is left is read from set `guests` (cheap), not
        tested by a failing batch: _teardown_if_empty()."""
        return [Unit(TABLE, "teardown", ())]

    def _list_guests_set(self) -> Optional[str]:
        """Set `guests` in nft's text form (cheap), or None if it is missing."""
        rc, out, _err = self._nft().cmd(f"list set {FAMILY} {TABLE} {GUESTS_SET}")
        return (out or "") if rc == 0 else None

    def _table_exists(self) -> bool:
        # `list tables` makes libnftables 1.0.x fetch every set element of
        # every table: only asked when the cheap `list set` failed.
        if self._list_guests_set() is not None:
            return True
        rc, out, _err = self._nft().cmd(f"list tables {FAMILY}")
        return rc == 0 and f"table {FAMILY} {TABLE}" in (out or "").splitlines()

    def _teardown_if_empty(self) -> None:
        """Remove table and accepts once no guest has forwards (see module doc)."""
        guests = self._list_guests_set()
        if guests is not None:
            if "elements = {" in guests:
                return
        elif self._table_exists():
            return  # our table without the marker set: not ours to judge, leave it
        self.flush()

    def snapshot(self) -> Snapshot:
        snap = Snapshot()
        listing = self._list_table()
        if listing is None:
            # Nothing installed is a fine base, unless an accept was left behind.
            for fam in LIBVIRT_FAMILIES:
                if any((o.get("rule") or {}).get("comment") == TAG for o in self._list_libvirt_chain(fam) or ()):
                    snap.base_ok = False
                    snap.problems.append(
                        f"accept rule in {fam} {LIBVIRT_TABLE} {LIBVIRT_CHAIN} without table {FAMILY} {TABLE}"
                    )
            return snap
        else:
            self._check_table(listing, snap)
            for set_name, entry in _set_items(listing):
                try:
                    e, owner = parse_listed_element(set_name, entry)
                except (ValueError, TypeError, KeyError):
                    snap.problems.append(f"unreadable element in {set_name}: {entry!r}")
                    continue
                if owner is None:
                    snap.problems.append(f"untagged element in {set_name}: {e.canonical()}")
                    continue
                snap.guests.setdefault(owner, set()).add(e.canonical())
            markers = set(_marker_owners(listing))
            for k in sorted(set(snap.guests) - markers):
                snap.problems.append(f"guest {k} has forwards but no element in set {GUESTS_SET}")
            for k in sorted(markers - set(snap.guests)):
                snap.problems.append(f"guest {k} has an element in set {GUESTS_SET} but no forwards")
        for fam in LIBVIRT_FAMILIES:
            chain = self._list_libvirt_chain(fam)
            where = f"{fam} {LIBVIRT_TABLE} {LIBVIRT_CHAIN}"
            if chain is None:
                snap.problems.append(f"chain {where} not found (libvirt not started?): no accept rule")
                continue
            if libvirt_fix_commands(fam, chain):
                snap.base_ok = False
                snap.problems.append(f"accept rule missing, duplicated or not at the top of {where}")
        return snap

    @staticmethod
    def _check_table(listing: List[dict], snap: Snapshot) -> None:
        chains = {o["chain"]["name"] for o in listing if "chain" in o}
        sets = {o["map"]["name"] for o in listing if "map" in o}
        counts: Dict[str, int] = {}
        for o in listing:
            if "rule" in o:
                counts[o["rule"]["chain"]] = counts.get(o["rule"]["chain"], 0) + 1
        expected: Dict[str, int] = {}
        for r in base_rules():
            c = r["add"]["rule"]["chain"]
            expected[c] = expected.get(c, 0) + 1
        for name, _hook in CHAINS:
            if name not in chains:
                snap.base_ok = False
                snap.problems.append(f"chain {name} missing from table {FAMILY} {TABLE}")
            elif counts.get(name, 0) != expected.get(name, 0):
                snap.base_ok = False
                snap.problems.append(
                    f"chain {name} of table {FAMILY} {TABLE} has {counts.get(name, 0)} rules, "
                    f"expected {expected.get(name, 0)}"
                )
        for name in _MAPS_BY_NAME:
            if name not in sets:
                snap.base_ok = False
                snap.problems.append(f"map {name} missing from table {FAMILY} {TABLE}")
        if not any(o.get("set", {}).get("name") == GUESTS_SET for o in listing):
            snap.base_ok = False
            snap.problems.append(f"set {GUESTS_SET} missing from table {FAMILY} {TABLE}")

    def flush(self) -> None:
        err = None
        for _attempt in range(2):
            cmds: List[dict] = [
                # add+delete: deletes the table whether or not it exists.
                {"add": {"table": {"family": FAMILY, "name": TABLE}}},
                {"delete": {"table": {"family": FAMILY, "name": TABLE}}},
            ]
            for fam in LIBVIRT_FAMILIES:
                for o in self._list_libvirt_chain(fam) or ():
                    r = o.get("rule")
                    if r and r.get("comment") == TAG:
                        cmds.append(
                            {
                                "delete": {
                                    "rule": {
                                        "family": fam,
                                        "table": LIBVIRT_TABLE,
                                        "chain": LIBVIRT_CHAIN,
                                        "handle": r["handle"],
                                    }
                                }
                            }
                        )
            err = self._transaction(cmds)
            if err is None:
                return
        raise FirewallError(f"nftables: cannot flush: {err}")

    def ensure_base(self) -> None:
        if not self._table_exists():
            self.flush()  # nothing installed: only drop accepts left behind, if any
            return
        err = None
        for _attempt in range(2):
            fixes, _problems = self._libvirt_fixes()
            err = self._write(base_commands() + fixes)
            if err is None:
                return
        raise FirewallError(f"nftables: cannot create base chains: {err}")
