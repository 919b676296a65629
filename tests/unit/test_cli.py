"""The CLI as a user runs it: check, plan (table and JSON), hook events that do nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(REPO, "tests", "fixtures", "libvirt-11.3")
STARTED = os.path.join(FIX, "hooks", "06-qemu-web1-started-begin-_.xml")


def _env(tmp_path, **extra):
    env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": REPO,
           "VNETHOOK_STATE_DIR": str(tmp_path / "state"), "VNETHOOK_LIBVIRT_ROOT": str(tmp_path / "root")}
    env.update(extra)
    return env


def _vnethook(tmp_path, *args, input=None, **env):
    return subprocess.run(["/usr/bin/python3", "-m", "vnethook", *args], capture_output=True, text=True,
                          env=_env(tmp_path, **env), cwd="/", input=input)


def _map(tmp_path, text):
    d = tmp_path / "etc"
    d.mkdir(mode=0o755, exist_ok=True)
    os.chmod(d, 0o755)
    (d / "ports.yaml").write_text(text)
    os.chmod(d / "ports.yaml", 0o644)
    return str(d)


def _libvirt_tree(tmp_path):
    root = tmp_path / "root"
    (root / "run/libvirt/network").mkdir(parents=True)
    (root / "var/lib/libvirt/dnsmasq").mkdir(parents=True)
    shutil.copy(os.path.join(FIX, "run-network-vnhnet.iptables.xml"), root / "run/libvirt/network/vnhnet.xml")


def test_check_example_config_passes(tmp_path):
    cp = _vnethook(tmp_path, "check", os.path.join(REPO, "config", "ports.yaml"))
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("OK:")


def test_check_reports_located_errors_and_exits_1(tmp_path):
    d = _map(tmp_path, "guests:\n  web1:\n    - 0:80\n    - 8080:80/icmp\n")
    cp = _vnethook(tmp_path, "check", "--config", d)
    assert cp.returncode == 1
    lines = [l for l in cp.stderr.splitlines() if "ports.yaml:" in l]
    assert len(lines) == 2 and lines[0].startswith(f"{d}/ports.yaml:3:") and lines[1].startswith(f"{d}/ports.yaml:4:")
    assert "Traceback" not in cp.stderr


def test_plan_table_and_json(tmp_path):
    _libvirt_tree(tmp_path)
    d = _map(tmp_path, "guests:\n  web1:\n    address: 192.0.2.60\n    forward: [8080:80, 5353:53/udp]\n")
    cp = _vnethook(tmp_path, "plan", "web1", "--domain-xml", STARTED, VNETHOOK_CONFIG=d)
    assert cp.returncode == 0, cp.stderr
    assert "address 192.0.2.60 for 52:54:00:e2:00:01 (from map)" in cp.stdout
    assert "*:8080" in cp.stdout and "192.0.2.60:80" in cp.stdout and "udp" in cp.stdout
    cp = _vnethook(tmp_path, "plan", "web1", "--domain-xml", STARTED, "--json", VNETHOOK_CONFIG=d)
    plan = json.loads(cp.stdout)
    assert plan["configured"] is True
    assert sorted((f["protocol"], f["host_ports"][0], f["guest_address"]) for f in plan["forwards"]) == [
        ("tcp", 8080, "192.0.2.60"), ("udp", 5353, "192.0.2.60")]
    assert not (tmp_path / "state" / "guests").exists() or not os.listdir(tmp_path / "state" / "guests"), \
        "plan must not change anything"


def test_plan_unconfigured_and_not_running(tmp_path):
    _libvirt_tree(tmp_path)
    d = _map(tmp_path, "guests:\n  other: [8080:80]\n")
    cp = _vnethook(tmp_path, "plan", "web1", "--domain-xml", STARTED, VNETHOOK_CONFIG=d)
    assert cp.returncode == 0 and "not in the port map" in cp.stdout
    cp = _vnethook(tmp_path, "plan", "web1", VNETHOOK_CONFIG=d)
    assert cp.returncode == 1 and "is neither running" in cp.stderr


def test_plan_shows_pending_forwards_with_the_reason(tmp_path):
    _libvirt_tree(tmp_path)
    d = _map(tmp_path, "guests:\n  web1: [8080:80, '127.0.0.1:5432:5432', 5353:53/udp]\n")
    # Running, but no address known yet (no lease, no static host, none in the map).
    cp = _vnethook(tmp_path, "plan", "web1", "--domain-xml", STARTED, VNETHOOK_CONFIG=d)
    assert cp.returncode == 0, cp.stderr
    pend = [ln for ln in cp.stdout.splitlines() if ln.strip().startswith("pending")]
    assert len(pend) == 3 and all("no IPv4 address yet for 52:54:00:e2:00:01" in ln for ln in pend), cp.stdout
    assert any("*:8080 -> ?:80/tcp" in ln for ln in pend) and any("127.0.0.1:5432" in ln for ln in pend)
    assert all("ports.yaml:2" in ln for ln in pend)
    js = json.loads(_vnethook(tmp_path, "plan", "web1", "--domain-xml", STARTED, "--json", VNETHOOK_CONFIG=d).stdout)
    assert len(js["pending"]) == 3 and js["forwards"] == []
    # Not running at all, network down: planned from its definition, each forward pending with why.
    qemu = tmp_path / "root" / "etc/libvirt/qemu"
    qemu.mkdir(parents=True)
    shutil.copy(STARTED, qemu / "web1.xml")
    os.unlink(tmp_path / "root/run/libvirt/network/vnhnet.xml")
    cp = _vnethook(tmp_path, "plan", "web1", VNETHOOK_CONFIG=d)
    assert cp.returncode == 0 and "planned from" in cp.stderr, cp.stderr
    pend = [ln for ln in cp.stdout.splitlines() if ln.strip().startswith("pending")]
    assert len(pend) == 3 and all("network 'vnhnet' is not running" in ln for ln in pend), cp.stdout


def test_filter_events_print_nothing(tmp_path):
    """migrate/restore: stdout would replace the domain XML."""
    d = _map(tmp_path, "guests:\n  web1: [8080:80]\n")
    with open(STARTED) as f:
        xml = f.read()
    for op in ("migrate", "restore", "prepare", "attach", "no-such-op"):
        cp = _vnethook(tmp_path, "hook", "qemu", "web1", op, "begin", "-", input=xml, VNETHOOK_CONFIG=d)
        assert cp.returncode == 0 and cp.stdout == "", (op, cp)


def test_broken_map_with_block_fails_prepare_with_the_message(tmp_path):
    d = _map(tmp_path, "settings:\n  on_error: block\nguests:\n  web1: [8080:80\n")
    cp = _vnethook(tmp_path, "hook", "qemu", "web1", "prepare", "begin", "-", input="<domain/>", VNETHOOK_CONFIG=d)
    assert cp.returncode == 1 and "on_error: block" in cp.stderr and "ports.yaml:" in cp.stderr
    # reconnect never fails: libvirt would kill the running guest
    cp = _vnethook(tmp_path, "hook", "qemu", "web1", "reconnect", "begin", "-", input="<domain/>", VNETHOOK_CONFIG=d)
    assert cp.returncode == 0
    # a guest not named in the broken map is not blocked
    cp = _vnethook(tmp_path, "hook", "qemu", "zzz", "prepare", "begin", "-", input="<domain/>", VNETHOOK_CONFIG=d)
    assert cp.returncode == 0
