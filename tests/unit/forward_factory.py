"""One Forward for the firewall unit tests, any field overridden by keyword.

Named uniquely (not conftest): several conftest.py files exist under tests/.
"""

from __future__ import annotations

from typing import Any

from vnethook.model import Forward


def fwd(**kw: Any) -> Forward:
    d: dict = dict(domain="web1", mac="52:54:00:00:00:01", network="default", bridge="virbr0",
                   subnet="192.0.2.0/24", family=4, guest_address="192.0.2.10", protocol="tcp",
                   host_address=None, host_ports=(8080, 8080), guest_ports=(80, 80), origin="ports.yaml:3")
    d.update(kw)
    return Forward(**d)
