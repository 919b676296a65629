"""Fixtures: one fresh libvirt-like host (netns) per test and backend.

Each backend runs against the libvirt ruleset it is meant for: iptables-nft
and iptables-legacy against libvirt's iptables rules loaded through that
flavour, nftables against libvirt's `ip/ip6 libvirt_network` tables.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional, Sequence, Tuple

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from acceptance_support import (  # noqa: E402
    A, BACKENDS, BRIDGE, NFTABLES_MODULE, REPO, SUBNET4, SUBNET6, Topology, _why_not, fwd, key,
)

@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    why = _why_not()
    if why:
        pytest.skip(why)
    if request.param == "nftables" and not os.path.exists(NFTABLES_MODULE):
        pytest.skip("nftables backend not implemented yet")
    return request.param


@pytest.fixture
def net(request, backend) -> Topology:
    topo = Topology()
    request.addfinalizer(topo.teardown)
    topo.build()
    topo.load_libvirt(backend)
    return topo


@pytest.fixture
def state(tmp_path) -> str:
    d = tmp_path / "state"
    d.mkdir()
    return str(d)


__all__ = ["A", "fwd", "key"]
