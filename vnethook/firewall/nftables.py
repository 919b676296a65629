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
- Two renderings, one per kind of object. The base (table, maps, chains
  and their fixed rules, and the accept in libvirt's chain) is nft text,
  one idempotent batch: ``add table/chain/map`` are idempotent, ``flush
  chain`` + ``add rule`` make the rules so without listing anything. The
  elements (and markers, below) are netlink messages (nl.py), one
  function for add and delete: a guest's change is one nf_tables
  transaction of element additions and deletions, sent by this process.
- Why netlink for the elements: they are what every event changes, and
  their encoding is simple (the fields of the key, each padded to 32
  bits). Going through libnftables instead means importing its Python
  binding (which imports json, re, enum and ctypes) and having it parse
  JSON and fetch its cache on every event: the difference between
  meeting and missing the hook's time budget (README, Performance).
- Starting a guest checks the base cheaply instead of rewriting it: each
  of our chains must hold as many rules and jumps as the base gives it
  (NFTA_CHAIN_USE, one GETCHAIN each), and libvirt's forward chains must
  start with exactly our current accept (a dump of that one chain). Only
  when something is amiss (first guest, a flushed table or chain, a
  libvirt reload that put its jumps above ours) does the base text go out,
  through the `nft` binary (libvirt's nftables backend runs it too; it
  costs less to start than the binding costs to import), or the binding
  when it is loaded already or there is no binary. The slow path (by
  comment, after a failed fast path) always re-sends it.
- When the last guest goes, everything goes (table and libvirt accepts),
  so a host without forwards carries nothing of ours. "Last" is known
  without listing the maps: set ``guests`` holds one marker element per
  guest that has forwards (an IPv6-typed 128-bit hash of the key and of
  its elements, with the key as comment); one dump of that set tells
  whether this guest's marker is the only one, and then the table and the
  accepts are deleted in the removal's own transaction.
- The record holds forwards, not elements, and ``delete element`` names
  only an element's key, whoever's comment it carries. A change or removal
  from the record therefore deletes the guest's marker for exactly the
  elements the record renders to, in the same transaction: it exists only
  if those are what this guest's last change installed, so a record that
  names another guest's element fails the batch, and the slow path finds
  the guest's elements by their comment instead.

The ``nftables`` binding is imported lazily, for listings (the slow path,
sync, status): the fast paths never pay for it.
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from vnethook import addr
from vnethook.firewall import nfnetlink as nl
from vnethook.firewall.base import (
    TAG,
    CommitError,
    FirewallError,
    Owned,
    Snapshot,
    Unit,
)
from vnethook.firewall.converge import Backend
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
_PROTO_BY_NAME = {v: k for k, v in _PROTO_NUMBERS.items()}
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

    def key_bytes(self) -> Tuple[bytes, Optional[bytes]]:
        """The element's key as nf_tables stores it, and its end (interval
        maps: the last source address; None for hash maps). Each field of
        a concatenation fills whole 32-bit registers: addresses as they
        are, the protocol number and the port (big-endian) zero-padded."""
        import _socket
        import _struct

        af = _socket.AF_INET if self.family == 4 else _socket.AF_INET6
        head = _socket.inet_pton(af, self.host) if self.host is not None else b""
        tail = bytes((_PROTO_BY_NAME[self.protocol], 0, 0, 0)) + _struct.pack("!H", self.host_port) + b"\0\0"
        if self.source is None:
            return head + tail, None
        net, _, plen = self.source.partition("/")
        lo = _socket.inet_pton(af, net)
        bits = len(lo) * 8
        last = int.from_bytes(lo, "big") | ((1 << (bits - int(plen))) - 1)
        return head + lo + tail, head + last.to_bytes(len(lo), "big") + tail

    def data_bytes(self) -> bytes:
        import _socket
        import _struct

        af = _socket.AF_INET if self.family == 4 else _socket.AF_INET6
        return _socket.inet_pton(af, self.guest) + _struct.pack("!H", self.guest_port) + b"\0\0"


Elem = FwdElem


def _bracket(addr: str, family: int) -> str:
    return f"[{addr}]" if family == 6 else addr


# --------------------------------------------------------------------------
# Pure rendering: forwards -> elements -> netlink messages (one function for add and delete).


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


# nf_tables messages, as nfnetlink.transaction() takes them: (nfproto
# family, NFT_MSG_*, nlmsg flags, attributes, what it does in words).
# A netlink attribute's length is 16 bits: the elements of one message stay
# well below 64 KiB (an IPv6 element with sources and comment: ~130 bytes).
_PER_MESSAGE = 256


def _comment(key: str) -> bytes:
    """libnftnl's user data for an element comment: type 0, length, text."""
    text = (COMMENT_PREFIX + key).encode() + b"\0"
    return bytes((0, len(text))) + text


def _elem_attrs(key: bytes, key_end: Optional[bytes], data: Optional[bytes], comment: Optional[bytes]) -> bytes:
    out = nl.nested(1, nl.attr(1, key))  # NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE }
    if key_end is not None:
        out += nl.nested(10, nl.attr(1, key_end))  # NFTA_SET_ELEM_KEY_END
    if data is not None:
        out += nl.nested(2, nl.attr(1, data))  # NFTA_SET_ELEM_DATA
    if comment is not None:
        out += nl.attr(6, comment)  # NFTA_SET_ELEM_USERDATA
    return nl.nested(1, out)  # NFTA_LIST_ELEM


def _set_elem_ops(op: str, set_name: str, items: List[bytes]) -> List[tuple]:
    kind, flags = (nl.NFT_MSG_NEWSETELEM, nl.NLM_F_CREATE) if op == "add" else (nl.NFT_MSG_DELSETELEM, 0)
    head = nl.name_attr(1, TABLE) + nl.name_attr(2, set_name)  # NFTA_SET_ELEM_LIST_TABLE, _SET
    what = f"{op} elements of {FAMILY} {TABLE} {set_name}"
    return [(nl.FAMILY[FAMILY], kind, flags, head + nl.nested(3, b"".join(items[i:i + _PER_MESSAGE])), what)
            for i in range(0, len(items), _PER_MESSAGE)]


def element_ops(op: str, elems: Iterable[Elem], key: Optional[str] = None) -> List[tuple]:
    """Add (with the guest's comment) or delete elements: messages per map,
    in a fixed order. One function for both directions; `delete element`
    names only the key (and, for interval maps, its end)."""
    by_set: Dict[str, List[bytes]] = {}
    comment = _comment(key) if op == "add" and key is not None else None
    for e in elems:
        k, k_end = e.key_bytes()
        item = _elem_attrs(k, k_end, e.data_bytes() if op == "add" else None, comment)
        by_set.setdefault(e.set_name, []).append(item)
    return [m for name, items in sorted(by_set.items()) for m in _set_elem_ops(op, name, items)]


def marker_ops(op: str, key: str, elements: Iterable[str] = (), value: Optional[str] = None) -> List[tuple]:
    """Add or delete the guest's element of set `guests` (its value given,
    or the marker of `elements`)."""
    import _socket

    raw = _socket.inet_pton(_socket.AF_INET6, value or guest_marker(key, elements))
    return _set_elem_ops(op, GUESTS_SET, [_elem_attrs(raw, None, None, _comment(key) if op == "add" else None)])


def table_ops(op: str) -> List[tuple]:
    """Create (no-op if it exists) or delete our table."""
    if op == "add":
        return [(nl.FAMILY[FAMILY], nl.NFT_MSG_NEWTABLE, nl.NLM_F_CREATE, nl.name_attr(1, TABLE), f"add table {FAMILY} {TABLE}")]
    return [(nl.FAMILY[FAMILY], nl.NFT_MSG_DELTABLE, 0, nl.name_attr(1, TABLE), f"delete table {FAMILY} {TABLE}")]


def delete_rule_op(family: str, handle: int) -> tuple:
    """Delete one rule of libvirt's forward chain by handle (our accept)."""
    import _struct

    return (nl.FAMILY[family], nl.NFT_MSG_DELRULE, 0,
            nl.name_attr(1, LIBVIRT_TABLE) + nl.name_attr(2, LIBVIRT_CHAIN) + nl.attr(3, _struct.pack("!Q", handle)),
            f"delete rule {handle} of {family} {LIBVIRT_TABLE} {LIBVIRT_CHAIN}")


# The base: our table, maps, chains and their fixed rules, in nft's text
# syntax (see declarations() for why text). Applied as one idempotent text
# batch whenever the cheap check (base_problems) finds anything amiss.

_MARK_MATCH = f"ct mark & {MARK:#010x} == {MARK:#010x}"
_MASQ_MATCH = f"ct mark & {MASQ:#010x} == {MASQ:#010x}"
_MARK_SET = f"ct mark set ct mark | {MARK:#010x}"
ACCEPT_RULE = f"{_MARK_MATCH} accept"


def _translate_rule(spec: MapSpec) -> str:
    key = []
    if spec.host:
        key.append(f"{spec.proto} daddr")
    if spec.sourced:
        key.append(f"{spec.proto} saddr")
    keys = " . ".join(key + ["meta l4proto", "th dport"])
    loopback = "127.0.0.0/8" if spec.family == 4 else "::1"
    # The protocol test is needed by nft before `th dport`, and skips other
    # protocols early; "any host address" means non-loopback (opt-in).
    guard = "" if spec.host else f"{spec.proto} daddr != {loopback} "
    return (f"meta l4proto {{ {', '.join(PROTOCOLS)} }} {guard}{keys} @{spec.name} "
            f"{_MARK_SET} dnat {spec.proto} to {keys} map @{spec.name}")


def base_rules() -> List[Tuple[str, str]]:
    """(chain, rule) of our chains' fixed rules, in order."""
    rules = [
        # A loopback destination arriving from outside is never translated:
        # a forward bound to 127.0.0.1 is the host's own (output hook only).
        ("prerouting", "ip daddr 127.0.0.0/8 return"),
        ("prerouting", "ip6 daddr ::1 return"),
        ("prerouting", "jump translate"),
        ("output", "jump translate"),
        ("translate", "fib daddr type != local return"),
    ]
    # Order matters: the most specific map first.
    rules += [("translate", _translate_rule(spec)) for spec in MAPS]
    # Cheapest test first (this base chain sees every packet); then: the
    # DNATed destination is routed out of the input interface.
    rules.append(("hairpin", f"{_MARK_MATCH} ct state new fib daddr . iif oif exists "
                             f"ct mark set ct mark | {MASQ:#010x}"))
    rules += [
        ("postrouting", f"{_MARK_MATCH} ip saddr 127.0.0.0/8 masquerade"),
        ("postrouting", f"{_MARK_MATCH} ip6 saddr ::1 masquerade"),
        ("postrouting", f"{_MASQ_MATCH} masquerade"),
    ]
    return rules


def expected_use() -> Dict[str, int]:
    """What nf_tables counts as each chain's use when the base is intact:
    its rules plus the jumps to it (NFTA_CHAIN_USE)."""
    use = {name: 0 for name, _hook in CHAINS}
    for chain, rule in base_rules():
        use[chain] += 1
        if rule.startswith("jump "):
            use[rule.split()[1]] += 1
    return use


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


def base_text() -> str:
    """Create (idempotently) table, maps, chains, and reset the chains' rules."""
    lines = [declarations().rstrip("\n")]
    for name, hook in CHAINS:
        spec = f" {{ type {hook[0]} hook {hook[1]} priority {hook[2]}; policy accept; }}" if hook else ""
        lines.append(f"add chain {FAMILY} {TABLE} {name}{spec}")
    lines += [f"flush chain {FAMILY} {TABLE} {name}" for name, _hook in CHAINS]
    lines += [f"add rule {FAMILY} {TABLE} {chain} {rule}" for chain, rule in base_rules()]
    return "\n".join(lines) + "\n"


def accept_fix_text(family: str, delete: Sequence[int], insert: bool) -> str:
    """Delete our rules `delete` (handles) from libvirt's forward chain and,
    if `insert`, put today's accept at its top (`insert` without a position)."""
    where = f"{family} {LIBVIRT_TABLE} {LIBVIRT_CHAIN}"
    lines = [f"delete rule {where} handle {h}" for h in delete]
    if insert:
        lines.append(f'insert rule {where} {ACCEPT_RULE} comment "{TAG}"')
    return "".join(line + "\n" for line in lines)


def is_current_accept(parts: Sequence[Tuple[str, list]]) -> bool:
    """Whether a rule's expressions (nl.rule_parts) are today's accept:
    ct mark loaded, masked with MARK, compared equal to MARK, accept."""
    import _struct

    def value(attrs: list, kind: int) -> Optional[bytes]:
        nested = nl.one(attrs, kind)  # { NFTA_DATA_VALUE }
        return nested[4:8] if nested is not None and len(nested) == 8 and nested[2:4] == b"\1\0" else None

    if [n for n, _a in parts] != ["ct", "bitwise", "cmp", "immediate"]:
        return False
    (_n1, ct), (_n2, bitwise), (_n3, cmp), (_n4, imm) = parts
    mark = _struct.pack("=I", MARK)
    verdict = nl.one(imm, 2) or b""  # NFTA_IMMEDIATE_DATA { NFTA_DATA_VERDICT { NFTA_VERDICT_CODE } }
    return (
        nl.one(ct, 2) == _struct.pack("!I", 3)  # NFTA_CT_KEY: NFT_CT_MARK
        and value(bitwise, 4) == mark and value(bitwise, 5) == b"\0\0\0\0"  # mask, xor
        and nl.one(cmp, 2) == b"\0\0\0\0" and value(cmp, 3) == mark  # NFT_CMP_EQ
        and len(verdict) == 12 and verdict.endswith(_struct.pack("!I", 1))  # NF_ACCEPT
    )


def accept_fixes(rules: Sequence[Tuple[int, Optional[str], list]]) -> Tuple[List[int], bool]:
    """From libvirt's forward chain (nl.rule_parts, in order): which
    of our rules to delete and whether to insert the accept, so that
    exactly one current accept stays, at the top."""
    ours = [r for r in rules if r[1] == TAG]
    keep = ours[0] if ours and rules[0] is ours[0] and is_current_accept(ours[0][2]) else None
    return [r[0] for r in ours if r is not keep], keep is None


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

    # -- libnftables (listings, and text batches when no nft binary is at hand)

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
            # Closed by a detached child after we exit (nl.hold_past_exit):
            # with many guests, closing it ourselves waits for the deleted
            # elements' RCU grace period (README, Performance: measured).
            nl.hold_past_exit(ctx)
        return self._ctx

    def _list(self, obj: dict) -> Optional[List[dict]]:
        """A listing's objects, or None if the object does not exist."""
        rc, out, _err = self._nft().json_cmd({"nftables": [{"list": obj}]})
        if rc != 0 or not isinstance(out, dict):
            return None
        return [o for o in out.get("nftables", []) if "metainfo" not in o]

    def _list_table(self) -> Optional[List[dict]]:
        return self._list({"table": {"family": FAMILY, "name": TABLE}})

    def _text(self, text: str) -> Optional[str]:
        """Run an nft text batch (one transaction); the error, or None.

        The `nft` binary (libvirt's nftables backend runs it too) when the
        binding is not loaded yet: starting it costs less than importing
        the binding. Else, or without the binary, the binding.
        """
        if self._ctx is None:
            from vnethook.firewall.tools import find_tool, run_tool

            try:
                tool = find_tool("nft", "nftables")
            except FirewallError:
                tool = None
            if tool is not None:
                status, _out, err, _ = run_tool([tool, "-f", "-"], text.encode())
                return None if status == 0 else (err.strip() or f"nft exited with {status}")
        rc, _out, err = self._nft().cmd(text)
        return None if rc == 0 else ((err or "").strip() or f"nft returned {rc}")

    # -- cheap checks over netlink

    @staticmethod
    def _libvirt_rules() -> Dict[str, Optional[List[tuple]]]:
        """Each family's libvirt forward chain as nfnetlink.rule_parts (one
        dump of that chain), or None if it is not there (or unreadable)."""
        out: Dict[str, Optional[List[tuple]]] = {}
        for fam in LIBVIRT_FAMILIES:
            raw = nl.chain_rules(fam, LIBVIRT_TABLE, LIBVIRT_CHAIN)
            parsed = [nl.rule_parts(r) for r in raw or ()]
            rules = [r for r in parsed if r is not None]
            out[fam] = rules if raw is not None and len(rules) == len(parsed) else None
        return out

    def _accept_problems(self) -> Tuple[str, List[str]]:
        """The text that leaves exactly one current accept at the top of
        libvirt's forward chains, and what is wrong there (empty: nothing)."""
        fixes, problems = [], []
        for fam, rules in self._libvirt_rules().items():
            if rules is None:
                problems.append(
                    f"chain {LIBVIRT_CHAIN} of table {fam} {LIBVIRT_TABLE} not found "
                    "(libvirt not started, or not using nftables): no accept rule"
                )
                continue
            delete, insert = accept_fixes(rules)
            if delete or insert:
                fixes.append(accept_fix_text(fam, delete, insert))
                problems.append(f"accept rule missing, duplicated or not at the top of "
                                f"{fam} {LIBVIRT_TABLE} {LIBVIRT_CHAIN}")
        return "".join(fixes), problems

    def _base_intact(self) -> bool:
        """Our chains exist and hold as many rules and jumps as the base has
        (NFTA_CHAIN_USE: one GETCHAIN each, cost independent of the guests)."""
        return all(nl.chain_use("inet", TABLE, name) == n for name, n in expected_use().items())

    def _our_accepts(self) -> List[tuple]:
        """Delete messages for every rule of ours in libvirt's forward chains."""
        return [delete_rule_op(fam, r[0]) for fam, rules in self._libvirt_rules().items()
                for r in rules or () if r[1] == TAG]

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
        wanted_keys = {(e.set_name, e.key_bytes()) for e in (want or {}).values()}
        clashes: List[str] = []
        for set_name, entry in _set_items(listing):
            try:
                e, owner = parse_listed_element(set_name, entry)
            except (ValueError, TypeError, KeyError):
                continue
            if owner == key:
                found[e.canonical()] = e
            elif (set_name, e.key_bytes()) in wanted_keys:
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
        """The base when it needs anything (a text batch), then one netlink
        transaction: element deletions and additions and the guest's marker.

        Re-adding what is already there is a no-op for identical elements.
        Without a listing, the old marker's delete fails the batch unless
        `old` is what is installed as this guest's (guest_marker); an empty
        `old` means nothing was installed, so there is no marker to delete.
        The fast path checks the base cheaply (chain use counts, libvirt's
        chains) and sends its text only when something is amiss; the slow
        path always re-sends it. `undo` stays empty: the base is idempotent
        and the transaction is the whole change.
        """
        if owned is None:
            markers = marker_ops("delete", key, old) if old else []
        else:
            values, clashes = owned.context
            if clashes and new:
                raise FirewallError(
                    f"nftables: cannot apply forwards of {key}: already forwarded for another guest: "
                    + "; ".join(clashes[:5])
                    + (f"; and {len(clashes) - 5} more" if len(clashes) > 5 else "")
                )
            markers = [m for v in values for m in marker_ops("delete", key, value=v)]
        gone = [e for t, e in old.items() if t not in new] if new else list(old.values())
        ops = element_ops("delete", gone) + markers
        units = []
        if new:
            ops += element_ops("add", new.values(), key) + marker_ops("add", key, new)
            fixes, _problems = self._accept_problems()
            if owned is not None or fixes or not self._base_intact():
                units.append(Unit(TABLE, "base", (base_text() + fixes,)))
        if ops:
            units.append(Unit(TABLE, TABLE, tuple(ops)))
        return units

    def commit(self, units: List[Unit]) -> None:
        """Units in order: the base's text batch, the teardown check, or one
        netlink transaction."""
        done: List[Unit] = []
        for u in units:
            if u.part == "teardown":
                self._teardown_if_empty()
                continue
            if u.part == "base":
                err = self._text("".join(u.do))
                if err is not None:
                    # Never go on: a rule naming a map that is not
                    # ours-as-declared can crash libnftables 1.0.x.
                    raise CommitError(f"nftables: cannot create table {FAMILY} {TABLE} and its chains "
                                      f"(run `vnethook flush`?): {err}", done)
            else:
                err = nl.transaction(list(u.do))
                if err is not None:
                    what = "apply" if any(op[1] == nl.NFT_MSG_NEWSETELEM for op in u.do) else "remove"
                    raise CommitError(f"nftables: cannot {what} forwards: {err}", done)
            done.append(u)

    def last_guest(self, scope: Any, key: str, old: Dict[str, Any]) -> Optional[bool]:
        """Whether this guest's marker is the only element of set `guests`
        (one dump of that set); then the removal deletes the table in its
        own transaction (teardown_units with `last`)."""
        import _socket

        keys = nl.set_keys("inet", TABLE, GUESTS_SET)
        if keys is None:
            return None
        mine = _socket.inet_pton(_socket.AF_INET6, guest_marker(key, old))
        if mine not in keys:
            return None  # the fast path fails on the marker anyway
        return len(keys) == 1

    def teardown_units(self, scope: Any, last: bool = False) -> List[Unit]:
        """`last` (last_guest() said so): delete the table and our accepts,
        joined to the removal's transaction. Else a step that reads set
        `guests` first (_teardown_if_empty): deleting a table never fails
        while other guests' elements are in it."""
        if last:
            return [Unit(TABLE, TABLE, tuple(table_ops("delete") + self._our_accepts()))]
        return [Unit(TABLE, "teardown", ())]

    def _teardown_if_empty(self) -> None:
        """Remove table and accepts once no guest has forwards (see module doc)."""
        keys = nl.set_keys("inet", TABLE, GUESTS_SET)
        if keys:
            return
        if keys is None and nl.table_exists("inet", TABLE) is not False:
            return  # our table without the marker set (or no answer): not ours to judge, leave it
        self.flush()

    def snapshot(self) -> Snapshot:
        snap = Snapshot()
        listing = self._list_table()
        if listing is None:
            # Nothing installed is a fine base, unless an accept was left behind.
            left = {op[0] for op in self._our_accepts()}
            for fam in LIBVIRT_FAMILIES:
                if nl.FAMILY[fam] in left:
                    snap.base_ok = False
                    snap.problems.append(
                        f"accept rule in {fam} {LIBVIRT_TABLE} {LIBVIRT_CHAIN} without table {FAMILY} {TABLE}"
                    )
            return snap
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
        fixes, problems = self._accept_problems()
        if fixes:
            snap.base_ok = False
        snap.problems += problems
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
        for c, _rule in base_rules():
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
        """Our table (whether or not it exists: add, then delete) and our
        accepts, in one netlink transaction; tried twice (a rule libvirt
        deleted in between)."""
        err = None
        for _attempt in range(2):
            err = nl.transaction(table_ops("add") + table_ops("delete") + self._our_accepts())
            if err is None:
                return
        raise FirewallError(f"nftables: cannot flush: {err}")

    def ensure_base(self) -> None:

        if nl.table_exists("inet", TABLE) is False:
            self.flush()  # nothing installed: only drop accepts left behind, if any
            return
        err = None
        for _attempt in range(2):
            fixes, _problems = self._accept_problems()
            err = self._text(base_text() + fixes)
            if err is None:
                return
        raise FirewallError(f"nftables: cannot create base chains: {err}")
