"""IP address text in the forms `ipaddress` prints, mostly without importing it.

Why: every event that changes something reads addresses (the network's
subnets, leases, the records) and renders them into rules, and importing
ipaddress (with functools and collections) costs such an event more than
that work. The addresses libvirt, dnsmasq and vnethook's own records hold
are nearly always canonical already, and inet_ntop(inet_pton(text)) ==
text proves it in C. Whatever is not proven so (another spelling, an IPv4
address embedded in IPv6, where the two printers differ, a scope, a
netmask that is not a plain prefix, any error) goes to ipaddress, so every
answer and every error message is ipaddress' own.
"""

from __future__ import annotations

import _socket

_AF = {4: _socket.AF_INET, 6: _socket.AF_INET6}
_BITS = {4: 32, 6: 128}


def packed(text: str, family: int) -> "bytes | None":
    """The bytes of `text` if it is an address of `family` in the exact form
    ipaddress prints (compressed); None when unsure."""
    if family == 6 and "." in text:
        return None
    try:
        raw = _socket.inet_pton(_AF[family], text)
        return raw if _socket.inet_ntop(_AF[family], raw) == text else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _text(raw: bytes, family: int) -> "str | None":
    out = _socket.inet_ntop(_AF[family], raw)
    return None if family == 6 and "." in out else out


def from_bytes(raw: bytes) -> str:
    """str(ipaddress.ip_address(raw)) of 4 or 16 bytes."""
    fam = 4 if len(raw) == 4 else 6
    text = _text(raw, fam) if len(raw) in (4, 16) else None
    if text is not None:
        return text
    import ipaddress

    return str(ipaddress.ip_address(raw))


def family(text: str) -> int:
    """ipaddress.ip_address(text).version (ValueError as it raises)."""
    for fam in (4, 6):
        if packed(text, fam) is not None:
            return fam
    import ipaddress

    return ipaddress.ip_address(text).version


def compressed(text: str) -> str:
    """ipaddress.ip_address(text).compressed."""
    if packed(text, 4) is not None or packed(text, 6) is not None:
        return text
    import ipaddress

    return ipaddress.ip_address(text).compressed


def _split(cidr: str) -> "tuple[int, int, int] | None":
    """(family, address as int, prefix length) of a canonical "addr/len"."""
    addr, slash, plen = cidr.partition("/")
    fam = 6 if ":" in addr else 4
    raw = packed(addr, fam)
    if raw is None or not slash or not plen.isdigit() or str(int(plen)) != plen or int(plen) > _BITS[fam]:
        return None
    return fam, int.from_bytes(raw, "big"), int(plen)


def _mask(fam: int, plen: int) -> int:
    bits = _BITS[fam]
    return ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)


def network(cidr: str) -> str:
    """ipaddress.ip_network(cidr, strict=False).compressed ("addr/len")."""
    got = _split(cidr)
    if got is not None:
        fam, value, plen = got
        text = _text((value & _mask(fam, plen)).to_bytes(_BITS[fam] // 8, "big"), fam)
        if text is not None:
            return f"{text}/{plen}"
    import ipaddress

    return ipaddress.ip_network(cidr, strict=False).compressed


def in_network(text: str, cidr: str) -> bool:
    """ipaddress.ip_address(text) in ipaddress.ip_network(cidr, strict=False)
    (False across families)."""
    got = _split(cidr)
    if got is not None:
        fam, value, plen = got
        raw = packed(text, fam)
        if raw is not None:
            mask = _mask(fam, plen)
            return int.from_bytes(raw, "big") & mask == value & mask
        other = 4 if fam == 6 else 6
        if packed(text, other) is not None:
            return False
    import ipaddress

    return ipaddress.ip_address(text) in ipaddress.ip_network(cidr, strict=False)


def interface(address: str, mask: str) -> "tuple[int, str, int, str]":
    """(version, address, prefix length, network) of ipaddress.ip_interface(
    f"{address}/{mask}"), where `mask` is a prefix length or, for IPv4, a
    netmask or hostmask, all as ipaddress prints them (ValueError as it raises)."""
    fam = 4 if packed(address, 4) is not None else 6 if packed(address, 6) is not None else 0
    plen = None
    if fam and mask.isdigit() and str(int(mask)) == mask and int(mask) <= _BITS[fam]:
        plen = int(mask)
    elif fam == 4 and packed(mask, 4) is not None:
        m = int.from_bytes(_socket.inet_pton(_socket.AF_INET, mask), "big")
        n = 32 - (((m ^ 0xFFFFFFFF) + 1).bit_length() - 1)  # a netmask's prefix length
        if m == _mask(4, n) and m:
            plen = n
    if plen is not None:
        return fam, address, plen, network(f"{address}/{plen}")
    import ipaddress

    iface = ipaddress.ip_interface(f"{address}/{mask}")
    return iface.version, str(iface.ip), iface.network.prefixlen, str(iface.network)
