"""Hook logs reach the journal with structured fields (systemd-python).

journald is not running here, so a datagram socket at the journal's path,
in a private mount namespace, stands in for it and records what vnethook's
`systemd._journal.sendv` sends: the real native journal protocol.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from acceptance_support import REPO, _why_not

FIX = os.path.join(REPO, "tests", "fixtures", "libvirt-11.3")


def test_started_logs_structured_fields_to_the_journal(tmp_path):
    why = _why_not()
    if why:
        pytest.skip(why)
    root = tmp_path / "root"
    (root / "run/libvirt/network").mkdir(parents=True)
    (root / "run/libvirt/qemu").mkdir(parents=True)
    (root / "var/lib/libvirt/dnsmasq").mkdir(parents=True)
    shutil.copy(os.path.join(FIX, "run-network-vnhnet.iptables.xml"), root / "run/libvirt/network/vnhnet.xml")
    cfg = tmp_path / "etc"
    cfg.mkdir(mode=0o755)
    os.chmod(cfg, 0o755)
    (cfg / "ports.yaml").write_text(
        "settings: {firewall: nftables}\nguests:\n  web1:\n    address: 192.0.2.60\n    forward: [8080:80/udp]\n")
    os.chmod(cfg / "ports.yaml", 0o644)
    cp = subprocess.run(
        ["unshare", "--mount", "--net", "--fork", "--propagation", "private", "/usr/bin/python3",
         os.path.join(REPO, "tests", "tools", "journal_probe.py"), REPO, str(root), str(cfg),
         str(tmp_path / "state"), os.path.join(FIX, "hooks", "06-qemu-web1-started-begin-_.xml")],
        capture_output=True, text=True, timeout=60, check=True)
    out = json.loads(cp.stdout)
    assert out["rc"] == 0 and out["stdout"] == "", out
    added = [m for m in out["messages"] if m.get("ACTION") == "add"]
    assert added, out
    m = added[0]
    print(m)
    assert m["SYSLOG_IDENTIFIER"] == "vnethook"
    assert m["DOMAIN"] == "web1"
    assert m["GUEST_ADDRESS"] == "192.0.2.60"
    assert m["HOST_PORT"] == "8080" and m["GUEST_PORT"] == "80" and m["PROTOCOL"] == "udp"
    assert m["BACKEND"] == "nftables"
    assert "8080" in m["MESSAGE"]
