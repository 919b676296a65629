"""Helpers shared by the acceptance tests (a uniquely named module: several
test directories have a conftest.py, so `from conftest import` is ambiguous)."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(HERE))

from netns import A, BRIDGE, SUBNET4, SUBNET6, Topology  # noqa: E402
from vnethook.model import Forward, guest_key  # noqa: E402

BACKENDS = ["iptables-nft", "iptables-legacy", "nftables"]
NFTABLES_MODULE = os.path.join(REPO, "vnethook", "firewall", "nftables.py")
TOOLS = ["ip", "iptables-nft-restore", "ip6tables-nft-restore", "iptables-legacy-restore",
         "ip6tables-legacy-restore", "nft"]


def _why_not() -> Optional[str]:
    if os.geteuid() != 0:
        return "acceptance tests need root (network namespaces, firewall)"
    missing = [t for t in TOOLS if not shutil.which(t, path="/usr/sbin:/sbin:/usr/bin:/bin")]
    if missing:
        return "acceptance tests need " + ", ".join(missing)
    if not os.path.exists("/usr/bin/python3"):
        return "acceptance tests need /usr/bin/python3"
    return None



def fwd(domain: str = "web", guest: str = "192.0.2.10", proto: str = "tcp",
        host: Optional[str] = None, hp: Tuple[int, int] = (8080, 8080),
        gp: Tuple[int, int] = (80, 80), sources: Sequence[str] = (), family: int = 4,
        mac: str = "52:54:00:00:00:01") -> Forward:
    return Forward(domain=domain, mac=mac, network="default", bridge=BRIDGE,
                   subnet=SUBNET4 if family == 4 else SUBNET6, family=family,
                   guest_address=guest, protocol=proto, host_address=host,
                   host_ports=hp, guest_ports=gp, sources=tuple(sources), origin="test")


def key(domain: str = "web") -> str:
    return guest_key(domain)

__all__ = ["A", "BACKENDS", "NFTABLES_MODULE", "REPO", "_why_not", "fwd", "key"]
