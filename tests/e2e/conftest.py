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
# Debian 12's own libvirt 9.0 (iptables backend, iptables-nft), run from a
# second root (libvirt_root.py); only for tests marked libvirt9, so that
# the suite stays lean: the scenarios where libvirt's version matters.
LIBVIRT9 = "libvirt-9.0"


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: needs root and a real libvirtd (runs a private one)")
    config.addinivalue_line("markers", "libvirt9: also runs on Debian 12's stock libvirt 9.0")


def pytest_generate_tests(metafunc):
    """firewall_backend: every backend of the installed libvirt, plus
    libvirt 9.0's iptables for tests marked libvirt9."""
    if "firewall_backend" in metafunc.fixturenames:
        values = list(BACKENDS)
        # (not for the installed package: it is installed on this host, not
        # in the 9.0 root)
        if (metafunc.definition.get_closest_marker("libvirt9")
                and os.environ.get("VNETHOOK_E2E_INSTALLED") != "1"):
            values.append(LIBVIRT9)
        metafunc.parametrize("firewall_backend", values)


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


@pytest.fixture
def sandbox(make_sandbox, firewall_backend):
    """A sandbox per firewall backend (the test runs once for each)."""
    if firewall_backend == "iptables-legacy":
        return make_sandbox("iptables", iptables="legacy")
    if firewall_backend == LIBVIRT9:
        return make_sandbox("iptables", libvirt="9.0")
    return make_sandbox(firewall_backend)
