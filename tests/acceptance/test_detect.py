"""detect() against real firewalls in a namespace, and get_backend()'s laziness."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from acceptance_support import REPO, _why_not

from netns import PY, Topology

SNIPPET = """
import json, sys
sys.path.insert(0, {repo!r})
from vnethook.firewall import detect
from vnethook.paths import Paths
print(json.dumps(detect(Paths(config='/nonexistent', libvirt_root={root!r}, state_dir='/nonexistent'),
                        iptables={iptables!r})))
"""


@pytest.fixture
def topo(request):
    why = _why_not()
    if why:
        pytest.skip(why)
    t = Topology()
    request.addfinalizer(t.teardown)
    t.build()
    return t


def _detect(topo, root, iptables="/usr/sbin/iptables"):
    code = SNIPPET.format(repo=REPO, root=str(root), iptables=iptables)
    return tuple(json.loads(topo.exec("host", PY, "-c", code).stdout))


def _conf(tmp_path, text):
    d = tmp_path / "etc" / "libvirt"
    d.mkdir(parents=True, exist_ok=True)
    (d / "network.conf").write_text(text)
    return tmp_path


def test_detect_network_conf_nftables(topo, tmp_path):
    root = _conf(tmp_path, '# comment\nfirewall_backend = "nftables"\n')
    name, why = _detect(topo, root)
    assert name == "nftables" and "firewall_backend=nftables" in why


def test_detect_libvirt_nft_table_wins(topo, tmp_path):
    topo.load_libvirt("nftables")
    name, why = _detect(topo, _conf(tmp_path, "#firewall_backend = \"nftables\"\n"))
    assert name == "nftables" and "libvirt_network" in why


def test_detect_iptables_flavour_from_symlink(topo, tmp_path):
    topo.load_libvirt("iptables-nft")
    root = _conf(tmp_path, 'firewall_backend = "iptables"\n')
    name, why = _detect(topo, root)
    real = os.path.basename(os.path.realpath("/usr/sbin/iptables"))
    expected = "iptables-legacy" if "legacy" in real else "iptables-nft"
    assert name == expected and real in why
    link = tmp_path / "iptables"
    link.symlink_to("/usr/sbin/xtables-legacy-multi")
    assert _detect(topo, root, str(link))[0] == "iptables-legacy"


def test_detect_legacy_chains_when_name_unclear(topo, tmp_path):
    topo.load_libvirt("iptables-legacy")
    fake = tmp_path / "iptables-wrapper"
    fake.write_text("#!/bin/sh\n")
    name, why = _detect(topo, _conf(tmp_path, ""), str(fake))
    assert name == "iptables-legacy" and "LIBVIRT_FWI" in why


def test_importing_package_loads_no_binding():
    code = ("import sys; sys.path.insert(0, %r); import vnethook.firewall; "
            "import vnethook.firewall.iptables_nft, vnethook.firewall.localnet; "
            "print(sorted(m for m in ('iptc', 'nftables', 'yaml', 'lxml') if m in sys.modules))" % REPO)
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
