"""`virsh save`/`restore` and `managedsave`: the forward comes back, once.

Saving a guest stops its QEMU (libvirt runs qemu `stopped` and `release`,
network `port-deleted`); restoring runs `restore` (a filter whose stdout
would replace the domain XML: vnethook must print nothing), `prepare`,
`port-created`, `start` and `started`. `managedsave` then `start` goes the
same way through libvirt's own save file. After each, the published port
answers again from outside, every rule of vnethook's exists exactly once,
and while the guest is saved nothing of it is left in the firewall.
With the forwards in the YAML map, and only in the guest's own metadata
(the saved image carries the domain XML, metadata included).
"""

from __future__ import annotations

import collections
import os

import pytest

from sandbox import Sandbox, mac_for
from vnethook_env import VnethookEnv

pytestmark = pytest.mark.e2e

HOST_EXT = "198.51.100.1"
BACKENDS = ("iptables", "nftables")
NS = "http://vnethook.org/xmlns/ports/1.0"


@pytest.fixture(params=BACKENDS)
def sb(make_sandbox, request):
    return make_sandbox(request.param)


def _dups(rules):
    return [r for r, n in collections.Counter(rules).items() if n > 1]


@pytest.mark.parametrize("declared", ["map", "metadata"])
def test_save_restore_and_managedsave_keep_the_port(sb: Sandbox, tmp_path, declared):
    vh = VnethookEnv(sb, tmp_path)
    vh.install()
    sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    mac = mac_for(0x61)
    sb.define_domain("sguest", macs=[mac])
    if declared == "map":
        vh.write_map("guests:\n  sguest: [8080:80, 5353:53/udp]\n")
    else:
        sb.virsh("metadata", "sguest", "--uri", NS, "--key", "vnethook", "--set",
                 "<ports><forward>8080:80</forward><forward>5353:53/udp</forward></ports>",
                 "--config")
    g = sb.add_guest_netns("sguest", mac)
    g.dhcp(hostname="sguest")
    g.pin_mac()  # the restored QEMU announces the same MAC from its tap
    g.serve_tcp(80, "sguest tcp")
    g.serve_udp(53, "sguest udp")
    ext = sb.add_external()
    foreign = vh.foreign_rules()
    sb.start("sguest")
    assert ext.connect_tcp(HOST_EXT, 8080).data == "sguest tcp"
    installed = vh.our_rules()
    assert installed and not _dups(installed)

    saved = os.path.join(sb.tmpdir, "sguest.save")
    for how in ("save", "managedsave"):
        if how == "save":
            sb.virsh("save", "sguest", saved)
        else:
            sb.virsh("managedsave", "sguest")
        assert "sguest" not in sb.virsh("list", "--name").split()
        assert not ext.connect_tcp(HOST_EXT, 8080, timeout=1).ok, f"port open while {how}d"
        assert vh.records() == [], how
        assert vh.status_json()["guests"] == [], how  # status agrees: nothing forwarded
        assert not [r for r in vh.our_rules() if "192.0.2." in r], how
        if how == "save":
            sb.virsh("restore", saved)
        else:
            sb.virsh("start", "sguest")  # from libvirt's managed save file
            assert "sguest" in sb.virsh("list", "--name").split()
        assert ext.connect_tcp(HOST_EXT, 8080).data == "sguest tcp", how
        assert ext.send_udp(HOST_EXT, 5353).data == "sguest udp", how
        rules = vh.our_rules()
        assert not _dups(rules), f"duplicated after {how}: {_dups(rules)}"
        assert sorted(rules) == sorted(installed), how
        assert vh.status_json()["guests"][0]["drift"] == [], how
    sb.destroy("sguest")
    assert vh.records() == []
    vh.assert_same_foreign(foreign)
    assert "Traceback" not in vh.log_text()
