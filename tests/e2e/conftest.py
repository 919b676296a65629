"""Shared e2e fixtures: a private real libvirtd per test (see sandbox.py).

Every e2e test is marked `e2e` and skipped, with the reason, where the
machine cannot run a sandbox (not root, libvirt or QEMU missing).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sandbox import Sandbox, missing_requirements  # noqa: E402

# libvirt's firewall_backend, and for iptables which iptables the host runs
BACKENDS = ("iptables", "nftables", "iptables-legacy")


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: needs root and a real libvirtd (runs a private one)")


def pytest_collection_modifyitems(config, items):
    why = missing_requirements()
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.e2e)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def make_sandbox(tmp_path):
    """Factory: make_sandbox(firewall_backend=..., hooks=..., env=...) -> an
    open Sandbox, closed at teardown whatever the test did."""
    opened = []

    def factory(firewall_backend: str = "iptables", **kwargs) -> Sandbox:
        d = tmp_path / f"sandbox{len(opened)}"
        sb = Sandbox(firewall_backend=firewall_backend, tmpdir=str(d), **kwargs)
        opened.append(sb)
        sb.open()
        return sb

    yield factory
    for sb in opened:
        sb.close()


@pytest.fixture(params=BACKENDS)
def firewall_backend(request):
    return request.param


@pytest.fixture
def sandbox(make_sandbox, firewall_backend):
    """A sandbox per firewall backend (the test runs once for each)."""
    if firewall_backend == "iptables-legacy":
        return make_sandbox("iptables", iptables="legacy")
    return make_sandbox(firewall_backend)
