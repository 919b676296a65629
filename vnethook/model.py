"""The data every layer shares: one planned forward, and the guest key.

A Forward is the unit the planner produces and the firewall backends render.
It carries everything a backend needs, so that no backend ever reads config,
libvirt state or leases itself: backends turn data into rules, nothing more.

Only stdlib here: the hook's fast paths import this module.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

PROTOCOLS = ("tcp", "udp", "sctp")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def guest_key(domain: str) -> str:
    """Return a short, collision-resistant, firewall- and filename-safe key.

    Domain names are arbitrary text (spaces, quotes, unicode, 200+ chars).
    The key is a readable prefix of the name plus a hash of the *whole*
    name, so two long names that share a prefix never collide, and the key
    fits in iptables comments, nft comments and state file names.
    """
    digest = hashlib.sha256(domain.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    prefix = _UNSAFE.sub("_", domain)[:16].strip("._-") or "g"
    return f"{prefix}-{digest}"


@dataclass(frozen=True)
class Forward:
    """One published port (or port range) of one guest NIC, for one family.

    host_address None means: traffic addressed to any of the host's own
    non-loopback addresses (never traffic merely passing through the host).
    Ranges are inclusive; host and guest ranges have the same length and map
    by offset (host_ports[0]+i -> guest_ports[0]+i).
    `origin` ("file:line") is for messages only and is ignored by equality.
    """

    domain: str
    mac: str
    network: str
    bridge: str
    subnet: str  # the guest network's CIDR for this family, e.g. "192.0.2.0/24"
    family: int  # 4 or 6
    guest_address: str
    protocol: str  # tcp | udp | sctp
    host_address: Optional[str]
    host_ports: Tuple[int, int]
    guest_ports: Tuple[int, int]
    sources: Tuple[str, ...] = ()  # CIDRs allowed to connect; empty = anyone
    origin: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        return guest_key(self.domain)

    @property
    def is_range(self) -> bool:
        return self.host_ports[0] != self.host_ports[1]

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

    def describe(self) -> str:
        hp = _ports(self.host_ports)
        gp = _ports(self.guest_ports)
        host = self.host_address or ("*" if self.family == 4 else "[*]")
        if self.family == 6 and self.host_address:
            host = f"[{self.host_address}]"
        ga = self.guest_address if self.family == 4 else f"[{self.guest_address}]"
        src = f" from {','.join(self.sources)}" if self.sources else ""
        return f"{host}:{hp} -> {ga}:{gp}/{self.protocol}{src}"


def _ports(p: Tuple[int, int]) -> str:
    return str(p[0]) if p[0] == p[1] else f"{p[0]}-{p[1]}"
