"""Fixtures for hostile-condition tests: a fake libvirt host with real rules.

The hook and the CLI run as real subprocesses inside a netns host built by
tests/netns.py (libvirt's own ruleset for the backend, plus foreign rules),
against a fake VNETHOOK_LIBVIRT_ROOT tree shaped like libvirt 11.3's
(/run/libvirt/qemu/<dom>.xml domstatus, /run/libvirt/network/<net>.xml,
/var/lib/libvirt/dnsmasq/<bridge>.status). Nothing touches the root
namespace's firewall.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hostile_support import *  # noqa: E402,F401,F403
from hostile_support import BACKENDS, FakeHost, why_not_netns  # noqa: E402,F401


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    why = why_not_netns()
    if why:
        pytest.skip(why)
    return request.param


@pytest.fixture
def host(request, backend, tmp_path) -> FakeHost:
    topo = Topology()
    request.addfinalizer(topo.teardown)
    topo.build()
    topo.load_libvirt(backend)
    topo.load_foreign(backend)
    return FakeHost(topo, tmp_path, backend)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: many real-firewall iterations (fault injection, concurrency)")
