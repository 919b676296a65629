"""The guest key: a short, safe, collision-resistant name for a domain.

Kept in its own stdlib-only module because the hook's fast paths need it
before anything else is imported (hashlib loads OpenSSL, a costly import;
the builtin _sha256/_sha2 modules cost nothing).
"""

from __future__ import annotations

try:  # Python <= 3.11
    from _sha256 import sha256 as _sha256
except ImportError:  # pragma: no cover - Python >= 3.12
    try:
        from _sha2 import sha256 as _sha256
    except ImportError:
        from hashlib import sha256 as _sha256

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def guest_key(domain: str) -> str:
    """Return `<readable prefix>-<12 hex of sha256(full name)>`.

    Domain names are arbitrary text (spaces, quotes, unicode, 200+ chars).
    The prefix keeps keys readable in `iptables -S` and state file names;
    the hash of the *whole* name keeps two long names that share a prefix
    apart. The result is at most 29 characters of [A-Za-z0-9_.-].
    """
    digest = _sha256(domain.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    prefix = "".join(c if c in _SAFE else "_" for c in domain[:16]).strip("._-") or "g"
    return f"{prefix}-{digest}"
