"""Firewall backends: a driver per firewall (base.py: the interface) under
the generic change logic (converge.py).

Importing this package is cheap on purpose: the hook imports it on every
event, and only the chosen backend's module (and, for nftables, its
binding) is loaded, by get_backend().
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Tuple

    from vnethook.firewall.converge import Backend

import os

from vnethook.firewall.base import FirewallError

# json, re, shutil and subprocess are imported inside detect()'s helpers:
# detection runs once and is cached, the hook's every run imports this.

BACKENDS = {
    "iptables-nft": ("vnethook.firewall.iptables_nft", "IptablesNftBackend"),
    "iptables-legacy": ("vnethook.firewall.iptables_legacy", "IptablesLegacyBackend"),
    "nftables": ("vnethook.firewall.nftables", "NftablesBackend"),
}

_SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


def get_backend(name: str) -> Backend:
    try:
        module, cls = BACKENDS[name]
    except KeyError:
        raise FirewallError(f"unknown firewall backend {name!r} "
                            f"(known: {', '.join(sorted(BACKENDS))})") from None
    return getattr(__import__(module, fromlist=[cls]), cls)()


def _network_conf_backend(path: str) -> Optional[str]:
    """firewall_backend from libvirt's network.conf, or None when unset."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    import re

    value = None
    for line in text.splitlines():
        m = re.match(r'\s*firewall_backend\s*=\s*"([^"]*)"', line)
        if m:
            value = m.group(1).strip()
    return value


def _run(argv) -> Optional[str]:
    import shutil
    import subprocess

    tool = shutil.which(argv[0], path=f"{os.environ.get('PATH', '')}:{_SBIN}")
    if not tool:
        return None
    try:
        p = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def _has_libvirt_nft_table() -> bool:
    # One named table, not `list tables`: nftables 1.0.x fetches every rule
    # and element of every table for that, so its cost grows with the host's
    # whole ruleset instead of staying constant.
    return any(_run(["nft", "list", "table", fam, "libvirt_network"]) is not None for fam in ("ip", "ip6"))


def detect(paths, iptables: str = "/usr/sbin/iptables") -> Tuple[str, str]:
    """Which backend matches the firewall libvirt uses here, and why.

    libvirt's REJECT decides; our accept must live in the same place, so
    this follows libvirt's configuration and what it actually created.
    """
    conf = _network_conf_backend(paths.network_conf)
    if conf == "nftables":
        return "nftables", "network.conf sets firewall_backend=nftables"
    said = ("network.conf sets firewall_backend=iptables" if conf == "iptables"
            else "network.conf does not set firewall_backend")
    if _has_libvirt_nft_table():
        return "nftables", f"{said}, but libvirt's nftables table ip libvirt_network exists"
    real = os.path.realpath(iptables)
    base = os.path.basename(real)
    if "legacy" in base:
        return "iptables-legacy", f"{said}; iptables is iptables-legacy ({iptables} -> {base})"
    if "nft" in base:
        return "iptables-nft", (f"{said}; iptables is iptables-nft ({iptables} -> {base}); "
                                "libvirt has no nftables table")
    legacy = _run(["iptables-legacy-save", "-t", "filter"]) or ""
    if ":LIBVIRT_FWI " in legacy:
        return "iptables-legacy", f"{said}; libvirt's LIBVIRT_FWI chain is in the legacy tables"
    return "iptables-nft", f"{said}; {iptables} -> {real} is neither flavour by name, assuming nft"
