"""The data every layer shares: one planned forward, and the guest key.

A Forward is the unit the planner produces and the firewall backends render.
It carries everything a backend needs, so that no backend ever reads config,
libvirt state or leases itself: backends turn data into rules, nothing more.

Only stdlib here: the hook's fast paths import this module.
"""

from __future__ import annotations

from vnethook.keys import guest_key  # noqa: F401  (re-exported)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PROTOCOLS = ("tcp", "udp", "sctp")


class Value:
    """A stand-in for @dataclass (frozen or not) that costs nothing to import.

    dataclasses pulls in inspect (a large import: see README, Performance), and every module on the hook's
    path holds a few plain records. Subclasses list their fields as class
    annotations, in order; a class attribute is the field's default, and
    `factory(list)` makes a fresh default per instance. Equality, hash
    (frozen only) and repr follow the fields, like a dataclass's.
    """

    __slots__ = ()
    _fields: tuple = ()
    _defaults: dict = {}
    _frozen = True

    def __init_subclass__(cls, frozen: bool = True, **kw):
        super().__init_subclass__(**kw)
        own = tuple(cls.__dict__.get("__annotations__", {}))
        fields = tuple(f for f in cls._fields if f not in own) + own
        defaults = dict(cls._defaults)
        for f in own:
            if f in cls.__dict__:
                defaults[f] = cls.__dict__[f]
        cls._fields, cls._defaults, cls._frozen = fields, defaults, frozen
        if not frozen:
            cls.__hash__ = None  # type: ignore[assignment]  # like a mutable dataclass
        else:
            cls.__hash__ = Value.__hash__  # type: ignore[method-assign]

    def __init__(self, *args, **kw):
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__} takes {len(fields)} arguments, got {len(args)}")
        s = object.__setattr__
        for name, v in zip(fields, args):
            s(self, name, v)
        for name in fields[len(args):]:
            if name in kw:
                v = kw.pop(name)
            elif name in self._defaults:
                v = self._defaults[name]
                if isinstance(v, _Factory):
                    v = v.make()
            else:
                raise TypeError(f"{type(self).__name__}() missing argument {name!r}")
            s(self, name, v)
        if kw:
            raise TypeError(f"{type(self).__name__}() got unexpected arguments {sorted(kw)}")

    def __setattr__(self, name, value):
        if self._frozen:
            raise AttributeError(f"{type(self).__name__} is immutable")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        if self._frozen:
            raise AttributeError(f"{type(self).__name__} is immutable")
        object.__delattr__(self, name)

    def _astuple(self) -> tuple:
        return tuple(getattr(self, f) for f in self._fields)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._astuple() == other._astuple()

    def __hash__(self):
        return hash(self._astuple())

    def __repr__(self):
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({inner})"


class _Factory:
    """A per-instance default for a Value field (like field(default_factory=...))."""

    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make

_FIELDS = (
    "domain",
    "mac",
    "network",
    "bridge",
    "subnet",
    "family",
    "guest_address",
    "protocol",
    "host_address",
    "host_ports",
    "guest_ports",
    "sources",
)


def factory(make) -> "Any":
    """`field: List[str] = factory(list)`: typed as the field's own type."""
    return _Factory(make)


class Forward:
    """One published port (or port range) of one guest NIC, for one family.

    host_address None means: traffic addressed to any of the host's own
    non-loopback addresses (never traffic merely passing through the host).
    Ranges are inclusive; host and guest ranges have the same length and map
    by offset (host_ports[0]+i -> guest_ports[0]+i).
    `origin` ("file:line") is for messages only and is ignored by equality.

    A plain slotted class rather than a dataclass: importing dataclasses
    (and inspect with it) would cost every hook run more than its work.
    """

    __slots__ = _FIELDS + ("origin", "_id")
    # For the type checker (bare annotations: no class attribute is made).
    domain: str
    mac: str
    network: str
    bridge: str
    subnet: str
    family: int
    guest_address: str
    protocol: str
    host_address: "str | None"
    host_ports: "tuple[int, int]"
    guest_ports: "tuple[int, int]"
    sources: "tuple[str, ...]"
    origin: str
    _id: tuple

    def __init__(
        self,
        domain: str,
        mac: str,
        network: str,
        bridge: str,
        subnet: str,  # the guest network's CIDR for this family, e.g. "192.0.2.0/24"
        family: int,  # 4 or 6
        guest_address: str,
        protocol: str,  # tcp | udp | sctp
        host_address: "str | None",
        host_ports: "tuple[int, int]",
        guest_ports: "tuple[int, int]",
        sources: "tuple[str, ...]" = (),  # CIDRs allowed to connect; empty = anyone
        origin: str = "",
    ):
        s = object.__setattr__
        s(self, "domain", domain)
        s(self, "mac", mac)
        s(self, "network", network)
        s(self, "bridge", bridge)
        s(self, "subnet", subnet)
        s(self, "family", int(family))
        s(self, "guest_address", guest_address)
        s(self, "protocol", protocol)
        s(self, "host_address", host_address)
        s(self, "host_ports", (int(host_ports[0]), int(host_ports[1])))
        s(self, "guest_ports", (int(guest_ports[0]), int(guest_ports[1])))
        s(self, "sources", tuple(sources))
        s(self, "origin", origin)
        s(self, "_id", tuple(getattr(self, f) for f in _FIELDS))

    def __setattr__(self, name, value):
        raise AttributeError("Forward is immutable")

    def __eq__(self, other):
        return isinstance(other, Forward) and self._id == other._id

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self._id)

    def __lt__(self, other):
        return _sortable(self._id) < _sortable(other._id)

    def __repr__(self):
        return f"Forward({self.describe()!r}, domain={self.domain!r}, mac={self.mac!r})"

    def replace(self, **changes) -> "Forward":
        d = {f: getattr(self, f) for f in _FIELDS}
        d["origin"] = self.origin
        d.update(changes)
        return Forward(**d)

    @property
    def key(self) -> str:
        return guest_key(self.domain)

    @property
    def is_loopback(self) -> bool:
        """A forward bound to 127.0.0.0/8 or ::1: reachable from the host only."""
        a = self.host_address
        return a is not None and (a.startswith("127.") or a == "::1")

    def to_dict(self) -> dict:
        return {
            "domain": self.domain,
            "mac": self.mac,
            "network": self.network,
            "bridge": self.bridge,
            "subnet": self.subnet,
            "family": self.family,
            "guest_address": self.guest_address,
            "protocol": self.protocol,
            "host_address": self.host_address,
            "host_ports": list(self.host_ports),
            "guest_ports": list(self.guest_ports),
            "sources": list(self.sources),
            "origin": self.origin,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Forward":
        return cls(
            domain=d["domain"],
            mac=d["mac"],
            network=d["network"],
            bridge=d["bridge"],
            subnet=d["subnet"],
            family=int(d["family"]),
            guest_address=d["guest_address"],
            protocol=d["protocol"],
            host_address=d.get("host_address"),
            host_ports=(int(d["host_ports"][0]), int(d["host_ports"][1])),
            guest_ports=(int(d["guest_ports"][0]), int(d["guest_ports"][1])),
            sources=tuple(d.get("sources") or ()),
            origin=d.get("origin", ""),
        )

    @classmethod
    def from_record(cls, d: dict) -> "Forward":
        """from_dict for what was read back from disk: every field checked
        (a record decides what is removed and is rendered into batches)."""
        f = cls.from_dict(d)
        for name in ("domain", "mac", "network", "bridge", "subnet", "guest_address", "protocol", "origin"):
            if not isinstance(getattr(f, name), str):
                raise ValueError(f"{name}: not a string")
        # Names may hold anything libvirt allows; what reaches the firewall may not.
        if not all(v.isprintable() for v in (f.bridge, f.subnet, f.guest_address, f.protocol)):
            raise ValueError("control characters")
        if f.family not in (4, 6) or f.protocol not in ("tcp", "udp", "sctp"):
            raise ValueError(f"family/protocol {f.family}/{f.protocol}")
        if not 0 < len(f.bridge) < 16 or any(c in f.bridge for c in "/: \t") or f.bridge in (".", ".."):
            raise ValueError(f"bridge {f.bridge!r}")
        _check_addr(f.guest_address, f.family)
        if f.host_address is not None:
            _check_addr(f.host_address, f.family)
        for net in (f.subnet,) + f.sources:
            _check_net(net)
        (hlo, hhi), (glo, ghi) = f.host_ports, f.guest_ports
        if not (0 < hlo <= hhi <= 65535 and 0 < glo <= ghi <= 65535 and hhi - hlo == ghi - glo):
            raise ValueError(f"ports {hlo}-{hhi} -> {glo}-{ghi}")
        return f

    def describe(self) -> str:
        hp = _ports(self.host_ports)
        gp = _ports(self.guest_ports)
        host = self.host_address or ("*" if self.family == 4 else "[*]")
        if self.family == 6 and self.host_address:
            host = f"[{self.host_address}]"
        ga = self.guest_address if self.family == 4 else f"[{self.guest_address}]"
        src = f" from {','.join(self.sources)}" if self.sources else ""
        return f"{host}:{hp} -> {ga}:{gp}/{self.protocol}{src}"


def _check_addr(text: object, family: "int | None") -> int:
    """The family of an address string (ValueError if it is none).

    _socket.inet_pton, not ipaddress or socket: the `stopped` hook reads
    records, and either module costs more to import than the whole check.
    """
    import _socket

    if not isinstance(text, str):
        raise ValueError(f"address {text!r}")
    for fam, af in ((4, _socket.AF_INET), (6, _socket.AF_INET6)):
        if family in (None, fam):
            try:
                _socket.inet_pton(af, text)
                return fam
            except OSError:
                pass
    raise ValueError(f"address {text!r} is not IPv{family or '4/6'}")


def _check_net(text: object) -> None:
    if not isinstance(text, str):
        raise ValueError(f"network {text!r}")
    addr, _, plen = text.partition("/")
    fam = _check_addr(addr, None)
    if plen and not (plen.isdigit() and int(plen) <= (32 if fam == 4 else 128)):
        raise ValueError(f"network {text!r}")


def _sortable(t):
    return tuple("" if v is None else v for v in t)


def _ports(p) -> str:
    return str(p[0]) if p[0] == p[1] else f"{p[0]}-{p[1]}"
