"""Ports declared in a guest's own <metadata>, with a real libvirtd (issue 14).

A guest whose ports exist only in its domain XML: started, reached from the
external netns, stopped, and the firewall is exactly as before (all three
backends). Broken metadata under `warn` (the guest starts, its valid
forwards work, the error is logged, the map's other guests are untouched)
and under `block` (only that guest's start fails). Conflicts between the
YAML and a guest's metadata (the YAML wins) and between two guests'
metadata (the one running first wins), as the hook decides them and as
`vnethook check` reports them.
"""

from __future__ import annotations

import re
import time

import pytest

from sandbox import mac_for
from vnethook_env import VnethookEnv

pytestmark = pytest.mark.e2e

HOST_EXT = "198.51.100.1"
NS = "http://vnethook.org/xmlns/ports/1.0"


def _reach(ext, port=8080, timeout=2):
    return ext.connect_tcp(HOST_EXT, port, "ping", timeout=timeout)


def _running(sb, name) -> bool:
    return name in sb.virsh("list", "--name").split()


def _define_with_metadata(sb, name, mac, forwards, attrs=""):
    """define_domain, then the same XML again with a <vnethook:ports> in its
    <metadata> (as `virsh dumpxml | virsh define` brings it along)."""
    sb.define_domain(name, macs=[mac])
    xml = sb.virsh("dumpxml", name)
    body = "".join(f if f.startswith("<") else f"<vnethook:forward>{f}</vnethook:forward>" for f in forwards)
    meta = (f'<metadata><vnethook:ports xmlns:vnethook="{NS}"{attrs}>{body}</vnethook:ports></metadata>')
    assert f"<name>{name}</name>" in xml
    xml = xml.replace(f"<name>{name}</name>", f"<name>{name}</name>{meta}", 1)
    sb.virsh_define("define", xml)
    assert NS in sb.virsh("dumpxml", name)


def _guest(sb, name, mac, reply, port=80):
    g = sb.add_guest_netns(name, mac)
    g.dhcp(hostname=name)  # a lease from a "previous boot", valid at start
    g.serve_tcp(port, reply)
    return g


@pytest.fixture
def vh(sandbox, tmp_path):
    env = VnethookEnv(sandbox, tmp_path)
    env.install()
    sandbox.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    return env


def test_ports_only_in_metadata_start_reach_stop_exactly(sandbox, vh):
    sb = sandbox
    vh.write_map("settings: {on_error: warn}\n")  # no guests: the metadata is all there is
    mac = mac_for(60)
    _define_with_metadata(sb, "meta1", mac, ["8080:80", "5353:53/udp"])
    g = _guest(sb, "meta1", mac, "meta1 tcp")
    g.serve_udp(53, "meta1 udp")
    ext = sb.add_external()
    before = vh.foreign_rules()
    sb.start("meta1")
    r = _reach(ext, 8080)
    assert r.ok and r.data == "meta1 tcp", r
    u = ext.send_udp(HOST_EXT, 5353, "q")
    assert u.ok and u.data == "meta1 udp", u
    assert not _reach(ext, 8081, timeout=1).ok  # nothing beyond what it declares

    st = vh.status_json()
    (g_st,) = st["guests"]
    assert g_st["domain"] == "meta1" and g_st["drift"] == [] and st["problems"] == [], st
    assert len(g_st["installed"]) == 2
    cp = vh.run(vh.cli_argv("plan", "meta1"))
    assert re.search(r"domain meta1 metadata line \d+", cp.stdout), cp.stdout
    cp = vh.run(vh.cli_argv("doctor", "meta1", "8080"), check=False)
    assert cp.returncode == 0 and "meta1: *:8080 -> " in cp.stdout, cp.stdout
    cp = vh.run(vh.cli_argv("sync"))
    assert "0 updated, 0 removed, 1 unchanged" in cp.stdout, cp.stdout  # the status file reads the same
    cp = vh.run(vh.cli_argv("check"))
    assert "2 forward(s) in the metadata of 1 domain(s)" in cp.stdout, cp.stdout
    assert "error" not in vh.log_text().lower(), vh.log_text()

    # save/restore: the restore hook prints nothing (its stdout would replace
    # the XML), and the forward comes back once, not twice
    if sb.firewall_backend == "iptables" and sb.iptables == "nft":
        ours = sorted(vh.our_rules())
        # a daemon restart: `reconnect` reads the metadata again, changes nothing, kills nothing
        sb.restart_libvirtd()
        assert _running(sb, "meta1") and sorted(vh.our_rules()) == ours
        assert _reach(ext, 8080).data == "meta1 tcp"
        saved = str(vh.tmp / "meta1.save")
        sb.virsh("save", "meta1", saved)
        assert not _reach(ext, 8080, timeout=1).ok and vh.our_rules() == []
        sb.virsh("restore", saved)
        assert sorted(vh.our_rules()) == ours  # back at `started`, once
        # QEMU announces a restored NIC's MAC (RARP self-announce): the bridge
        # learns it on the new tap until the test's guest netns, which carries
        # the same MAC, speaks again. A real guest has no such twin.
        sb.wait_for(lambda: g.ping("192.0.2.1", timeout=1) and _reach(ext, 8080, timeout=0.5).ok,
                    timeout=10, what="the forward after restore")
        time.sleep(1.5)  # the announce rounds are over (QEMU's default: 5 within a second)
        g.ping("192.0.2.1", timeout=1)
        assert _reach(ext, 8080).data == "meta1 tcp"
        assert sorted(vh.our_rules()) == ours

    sb.destroy("meta1")
    assert not _reach(ext, 8080, timeout=1).ok
    assert vh.our_rules() == [] and vh.records() == []
    vh.assert_same_foreign(before)


@pytest.fixture
def sb(make_sandbox):
    return make_sandbox("iptables")


def test_broken_metadata_warn_then_block(sb, tmp_path):
    vh = VnethookEnv(sb, tmp_path)
    vh.install()
    sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    vh.write_map("guests:\n  web1: [8080:80]\n")
    ext = sb.add_external()
    m_web, m_bad, m_ok = mac_for(61), mac_for(62), mac_for(63)
    sb.define_domain("web1", macs=[m_web])
    _guest(sb, "web1", m_web, "web1")
    _define_with_metadata(sb, "bad1", m_bad, ["9090:90", "99999:80", '<vnethook:forward hostport="9091"/>'])
    _guest(sb, "bad1", m_bad, "bad1", port=90)
    sb.start("web1")

    # warn: bad1 starts; its valid forward works, the broken ones are logged
    sb.start("bad1")
    assert _running(sb, "bad1")
    assert _reach(ext, 8080).data == "web1"
    assert _reach(ext, 9090).data == "bad1"
    log = vh.log_text()
    assert re.search(r"domain bad1: metadata line \d+: <vnethook:forward>: host port 99999 out of range", log), log
    assert "unknown attribute 'hostport' (did you mean 'host_port'?)" in log
    assert "Traceback" not in log
    st = vh.status_json()
    assert any("domain bad1: metadata line" in p for p in st["problems"]), st["problems"]
    cp = vh.run(vh.cli_argv("check"), check=False)
    assert cp.returncode == 1 and "domain bad1: metadata line" in cp.stderr, cp.stderr

    # block: only bad1's own start fails
    vh.write_map("settings: {on_error: block}\nguests:\n  web1: [8080:80]\n")
    sb.destroy("bad1")
    cp = sb.run(["virsh", "-c", "qemu:///system", "start", "bad1"], check=False, timeout=120)
    assert cp.returncode != 0 and not _running(sb, "bad1"), cp.stdout
    assert "host port 99999 out of range" in cp.stderr, cp.stderr  # libvirt quotes the hook
    assert not _reach(ext, 9090, timeout=1).ok
    _define_with_metadata(sb, "ok1", m_ok, ["7070:80"])
    _guest(sb, "ok1", m_ok, "ok1")
    sb.start("ok1")  # a guest with valid metadata starts under block
    assert _reach(ext, 7070).data == "ok1"
    assert _reach(ext, 8080).data == "web1" and _running(sb, "web1")
    for name in ("ok1", "web1"):
        sb.destroy(name)
    assert vh.our_rules() == [] and vh.records() == []


def test_conflicts_yaml_wins_then_the_guest_running_first(sb, tmp_path):
    vh = VnethookEnv(sb, tmp_path)
    vh.install()
    sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    vh.write_map("guests:\n  web1: [8080:80]\n")
    ext = sb.add_external()
    m_web, m1, m2 = mac_for(64), mac_for(65), mac_for(66)
    _define_with_metadata(sb, "web1", m_web, ["8085:80"])  # in the YAML and in its metadata: the union
    _guest(sb, "web1", m_web, "web1")
    _define_with_metadata(sb, "m1", m1, ["8080:80", "8081:80"])  # 8080 is the YAML's
    _guest(sb, "m1", m1, "m1")
    _define_with_metadata(sb, "m2", m2, ["8081:80", "8082:80"])  # 8081 is m1's, running first
    _guest(sb, "m2", m2, "m2")
    for name in ("web1", "m1", "m2"):
        sb.start(name)
        assert _running(sb, name)  # warn: conflicts never stop a guest
    assert _reach(ext, 8080).data == "web1"
    assert _reach(ext, 8081).data == "m1"
    assert _reach(ext, 8082).data == "m2"
    assert _reach(ext, 8085).data == "web1"
    cp = vh.run(vh.cli_argv("ports", "m2"))
    assert re.search(r"m2\s+-\s+domain m2 metadata line \d+\s+refused: forward of tcp port 8081", cp.stdout), cp.stdout
    assert re.search(r"m2\s+\*:8082 -> \S+\s+domain m2 metadata line \d+\s+active", cp.stdout), cp.stdout
    log = vh.log_text()
    assert re.search(r"domain m1: metadata line \d+: <vnethook:forward>: forward of tcp port 8080 on every host "
                     r"address overlaps tcp port 8080 on every host address of guest 'web1' at \S+/ports.yaml:2", log), log
    assert re.search(r"domain m2: metadata line \d+: <vnethook:forward>: forward of tcp port 8081 .* of guest 'm1' "
                     r"at domain m1 metadata line \d+", log), log

    # sync, status and check see the same decisions (nothing moves)
    cp = vh.run(vh.cli_argv("sync"), check=False)
    assert "0 updated, 0 removed, 3 unchanged" in cp.stdout, cp.stdout
    cp = vh.run(vh.cli_argv("check"), check=False)
    assert cp.returncode == 1
    assert "of guest 'web1' at" in cp.stderr and "of guest 'm1' at domain m1 metadata line" in cp.stderr, cp.stderr
    assert "2 problem(s) in domain metadata" in cp.stderr

    # a restart of m1 makes it the newcomer: running m2 declares 8081, so m1
    # is refused it; m2 was refused it at its own start, and gets it at the
    # next sync (the timer's, or by hand), which ranks by who runs first
    sb.destroy("m1")
    sb.start("m1")
    assert not _reach(ext, 8081, timeout=1).ok
    vh.run(vh.cli_argv("sync"), check=False)
    assert _reach(ext, 8081).data == "m2"
    # under block, the newcomer with a conflict does not start
    vh.write_map("settings: {on_error: block}\nguests:\n  web1: [8080:80]\n")
    sb.destroy("m1")
    cp = sb.run(["virsh", "-c", "qemu:///system", "start", "m1"], check=False, timeout=120)
    assert cp.returncode != 0 and not _running(sb, "m1")
    assert _reach(ext, 8081).data == "m2" and _reach(ext, 8080).data == "web1"
    for name in ("m2", "web1"):
        sb.destroy(name)
    assert vh.our_rules() == [] and vh.records() == []


def test_publish_unpublish_ports_save_restore(sb, tmp_path):
    import os

    from sandbox import PYTHON
    from vnethook_env import INSTALLED, REPO

    vh = VnethookEnv(sb, tmp_path)
    vh.install()
    sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    vh.write_map("guests:\n  web1: [7070:80]\n")
    ext = sb.add_external()
    mac = mac_for(67)
    sb.define_domain("pub1", macs=[mac])
    g = _guest(sb, "pub1", mac, "pub1")
    before = vh.foreign_rules()
    sb.start("pub1")
    assert not _reach(ext, 8080, timeout=1).ok

    cp = vh.run(vh.cli_argv("publish", "pub1", "8080:80", "5353:53/udp"))
    assert "published 8080:80/tcp in the live and config metadata of pub1" in cp.stdout, cp.stdout
    assert re.search(r"reachable now: \*:8080 -> 192\.0\.2\.\d+:80/tcp \(on every host address, from anywhere\)",
                     cp.stdout), cp.stdout
    assert _reach(ext, 8080).data == "pub1"
    assert NS in sb.virsh("dumpxml", "pub1") and NS in sb.virsh("dumpxml", "pub1", "--inactive")
    ours = sorted(vh.our_rules())
    cp = vh.run(vh.cli_argv("publish", "pub1", "8080:80"))  # again: nothing changes, nothing doubles
    assert sorted(vh.our_rules()) == ours
    cp = vh.run(vh.cli_argv("ports", "pub1"))
    assert re.search(r"pub1\s+\*:8080 -> 192\.0\.2\.\d+:80/tcp\s+domain pub1 metadata line \d+\s+active", cp.stdout), cp.stdout

    # refused before anything is written: a bad spec, a conflict with the map
    cp = vh.run(vh.cli_argv("publish", "pub1", "99999:80"), check=False)
    assert cp.returncode == 1 and "'99999:80': host port 99999 out of range" in cp.stderr, cp.stderr
    cp = vh.run(vh.cli_argv("publish", "pub1", "7070:80"), check=False)
    assert cp.returncode == 1 and "of guest 'web1' at" in cp.stderr and "nothing was changed" in cp.stderr, cp.stderr
    assert "7070" not in sb.virsh("dumpxml", "pub1")

    # --map: a drop-in instead of the metadata
    cp = vh.run(vh.cli_argv("publish", "--map", "pub1", "9090:80"))
    dropin = vh.cfg / "ports.d" / "pub1.yaml"
    assert dropin.exists() and "9090:80/tcp" in dropin.read_text()
    assert _reach(ext, 9090).data == "pub1"
    cp = vh.run(vh.cli_argv("ports"))
    assert re.search(rf"pub1\s+\*:9090 -> \S+\s+{re.escape(str(dropin))}:\d+\s+active", cp.stdout), cp.stdout
    vh.run(vh.cli_argv("unpublish", "--map", "pub1", "9090:80"))
    assert not dropin.exists() and not _reach(ext, 9090, timeout=1).ok

    # migrate and restore hook events print nothing (stdout would replace the XML)
    xml = sb.virsh("dumpxml", "pub1")
    hook = "/etc/libvirt/hooks/qemu.d/vnethook" if INSTALLED else os.path.join(REPO, "hooks", "qemu")
    for op in ("migrate", "restore"):
        cp = sb.run([PYTHON, hook, "pub1", op, "begin", "-"], input=xml, env=vh.env)
        assert cp.returncode == 0 and cp.stdout == "", (op, cp)

    # save/restore: the metadata comes back with the guest, the forward once
    saved = str(vh.tmp / "pub1.save")
    sb.virsh("save", "pub1", saved)
    assert vh.our_rules() == []
    sb.virsh("restore", saved)
    assert sorted(vh.our_rules()) == ours
    # (QEMU's RARP self-announce of the restored NIC: see the first test)
    sb.wait_for(lambda: g.ping("192.0.2.1", timeout=1) and _reach(ext, 8080, timeout=0.5).ok,
                timeout=10, what="the published forward after restore")

    cp = vh.run(vh.cli_argv("unpublish", "pub1", "8080:80", "5353:53/udp"))
    assert "no longer reachable" in cp.stdout, cp.stdout
    assert not _reach(ext, 8080, timeout=1).ok
    assert NS not in sb.virsh("dumpxml", "pub1") and NS not in sb.virsh("dumpxml", "pub1", "--inactive")
    assert vh.our_rules() == []

    # a guest that is not running: --config only, applied at its start
    sb.destroy("pub1")
    cp = vh.run(vh.cli_argv("publish", "pub1", "8443:80"))
    assert "config metadata of pub1" in cp.stdout and "live" not in cp.stdout, cp.stdout
    assert "not running" in cp.stdout
    sb.start("pub1")
    sb.wait_for(lambda: g.ping("192.0.2.1", timeout=1) and _reach(ext, 8443, timeout=0.5).ok,
                timeout=10, what="the forward published while stopped")
    sb.destroy("pub1")
    assert vh.our_rules() == [] and vh.records() == []
    vh.assert_same_foreign(before)


def test_a_late_lease_reaches_a_metadata_guest_through_the_watcher(sb, tmp_path):
    vh = VnethookEnv(sb, tmp_path)
    vh.install()
    sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    vh.write_map("settings: {lease_watch: waiter}\n")
    ext = sb.add_external()
    mac = mac_for(68)
    _define_with_metadata(sb, "late1", mac, ["8080:80"])
    sb.start("late1")  # no lease yet: the forward waits, the hook starts the watcher
    g = sb.add_guest_netns("late1", mac)
    g.serve_tcp(80, "late1")
    assert vh.records_of("late1")["waiting"], vh.records()
    assert not _reach(ext, 8080, timeout=1).ok
    g.dhcp(hostname="late1")
    sb.wait_for(lambda: _reach(ext, 8080, timeout=0.5).ok, timeout=10, what="the metadata forward after the lease")
    assert _reach(ext, 8080).data == "late1"
    sb.destroy("late1")
    assert vh.our_rules() == [] and vh.records() == []
