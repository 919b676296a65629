"""Shared e2e fixtures: a private real libvirtd per test (see sandbox.py).

Every e2e test is marked `e2e` and skipped, with the reason, where the
machine cannot run a sandbox (not root, libvirt or QEMU missing).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guest_image  # noqa: E402
from sandbox import Sandbox, missing_requirements  # noqa: E402

# libvirt's firewall_backend, and for iptables which iptables the host runs
BACKENDS = ("iptables", "nftables", "iptables-legacy")
# Stock Debian roots with their own libvirt (libvirt_root.py): Debian 12's
# 9.0 (iptables backend only) and Debian 13's 11.3 (with Python 3.13,
# nftables 1.1, iptables 1.8.11), as "<distro>-<libvirt backend>". Only for
# tests marked `distros`, so that the suite stays lean: the scenarios where
# the host's versions matter.
DISTROS = ("debian12-iptables", "debian13-iptables", "debian13-nftables")


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: needs root and a real libvirtd (runs a private one)")
    config.addinivalue_line("markers", "distros(*which): also runs on stock Debian roots "
                            "(all of DISTROS, or those named)")


def pytest_generate_tests(metafunc):
    """firewall_backend: every backend of the installed libvirt, plus the
    stock distro roots for tests marked `distros`."""
    if "firewall_backend" in metafunc.fixturenames:
        values = list(BACKENDS)
        # (not for the installed package: it is installed on this host, not
        # in the 9.0 root)
        marker = metafunc.definition.get_closest_marker("distros")
        if marker and os.environ.get("VNETHOOK_E2E_INSTALLED") != "1":
            unknown = set(marker.args) - set(DISTROS)
            if unknown:
                raise ValueError(f"unknown distros {unknown}: one of {DISTROS}")
            values += list(marker.args or DISTROS)
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
    if firewall_backend in DISTROS:
        distro, backend = firewall_backend.split("-")
        return make_sandbox(backend, distro=distro)
    return make_sandbox(firewall_backend)


@pytest.fixture(scope="session")
def image():
    """The real guest (guest_image.py), built once; skipped, saying why,
    where its Debian packages cannot be had."""
    try:
        return guest_image.ensure()
    except guest_image.GuestUnavailable as e:
        pytest.skip(f"the guest's Debian packages cannot be obtained: {e}")
