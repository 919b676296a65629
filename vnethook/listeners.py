"""Which ports the host itself listens on, and which forwards would take them.

A forward's DNAT runs before the host's own sockets see a packet: a
`22:22` on every address takes sshd away from every client the forward
matches, and a `127.0.0.1:5432:5432` takes the host's own PostgreSQL away
from the host. That is sometimes meant, rarely; `check` and `status` say so
instead of letting the admin find out from a locked-out session.

Read from /proc/net/{tcp,tcp6,udp,udp6} of the current network namespace:
TCP sockets in LISTEN, UDP sockets that are bound but not connected.
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Iterable, List, Optional, Set, Tuple

    Listener = Tuple[str, Optional[str], int]  # protocol, address (None: any), port

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"


def _addr(hexaddr: str) -> "Optional[str]":
    """/proc/net's address (host-order 32-bit words) as text; None for the wildcard."""
    import socket

    raw = bytes.fromhex(hexaddr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if not any(words):
        return None
    if len(words) == 16 and words[:12] == b"\0" * 10 + b"\xff\xff":  # v4-mapped
        return socket.inet_ntop(socket.AF_INET, words[12:])
    return socket.inet_ntop(socket.AF_INET if len(words) == 4 else socket.AF_INET6, words)


def parse(text: str, protocol: str) -> "List[Listener]":
    """One /proc/net/{tcp,udp}[6] table -> its listening sockets."""
    want = _TCP_LISTEN if protocol == "tcp" else _UDP_UNCONNECTED
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 4 or parts[3] != want or ":" not in parts[1]:
            continue
        hexaddr, _, hexport = parts[1].rpartition(":")
        try:
            out.append((protocol, _addr(hexaddr), int(hexport, 16)))
        except ValueError:
            continue
    return out


def host_listeners(proc_net: str = "/proc/net") -> "Set[Listener]":
    out: "Set[Listener]" = set()
    for name, protocol in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
        try:
            with open(f"{proc_net}/{name}") as f:
                out.update(parse(f.read(), protocol))
        except OSError:
            continue
    return out


def taken(rules: "Iterable", listeners: "Set[Listener]") -> "List[str]":
    """A warning for each forward whose host ports include one the host listens on.

    `rules` are anything with protocol, host_address, host_ports and origin
    (config.PortRule, model.Forward). A wildcard forward matches every
    listener of its protocol except loopback ones; one bound to an address
    matches listeners on that address or on the wildcard.
    """
    out = []
    seen = set()
    for r in rules:
        lo, hi = r.host_ports
        for proto, addr, port in sorted(listeners, key=lambda x: (x[0], x[2], x[1] or "")):
            if proto != r.protocol or not lo <= port <= hi:
                continue
            if r.host_address is None:
                if addr is not None and (addr.startswith("127.") or addr == "::1"):
                    continue
            elif addr is not None and addr != r.host_address:
                continue
            where = r.host_address or "*"
            msg = (f"{r.origin}: warning: the host itself listens on {addr or '*'}:{port}/{proto}; "
                   f"this forward ({where}:{port}) takes that port away from the host's own service "
                   "for every connection it matches")
            if (r.origin, proto, port) not in seen:
                seen.add((r.origin, proto, port))
                out.append(msg)
    return out
