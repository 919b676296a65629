"""Next to Docker and ufw: their iptables FORWARD policy DROP must not eat our forwards.

Real rules, real packets. The host carries a Docker-like filter table
(DOCKER-USER, isolation chains, FORWARD jumps; tests/acceptance/rulesets)
loaded through the iptables flavour Docker would use next to this backend,
with FORWARD's policy set to DROP as dockerd sets it. A ufw-like host has
ufw's chains and the same policy but no DOCKER-USER. vnethook's one static
accept (ct-marked DNAT only) goes into DOCKER-USER or the head of FORWARD;
what the managers do on restart or reload must not undo it, `status` must
agree with the traffic, and nothing else may become reachable.
"""

from __future__ import annotations

import pytest
from hostile_support import reaches_g1
from netns import A

MAP = {"g0": "{address: 192.0.2.10, forward: [8000:80, 5300:53/udp]}"}
MAC = "52:54:00:00:05:00"


def _ipt(host, *args, v6=True):
    flavour = "legacy" if host.backend == "iptables-legacy" else "nft"
    for fam in ("", "6") if v6 else ("",):
        host.topo.exec("host", f"ip{fam}tables-{flavour}", *args)


def _ours_anywhere(host):
    return [ln for text in host.dump().values() for ln in text.splitlines() if "vnethook:forward" in ln]


def _wipe(host):
    """`nft flush ruleset` (firewalld's reload, nftables.service), and on a
    legacy host the x_tables it does not reach: every table, everyone's."""
    host.topo.exec("host", "nft", "flush", "ruleset")
    if host.backend == "iptables-legacy":
        for t in ("iptables-legacy", "ip6tables-legacy"):
            for table in ("filter", "nat"):
                host.topo.exec("host", t, "-t", table, "-F")
                host.topo.exec("host", t, "-t", table, "-X")


@pytest.fixture
def served(host):
    host.topo.server("g1", "g1", "80")
    host.topo.server("g1", "g1u", "53", proto="udp")
    return host


def test_docker_drop_policy_and_restart(served):
    host = served
    _ipt(host, "-P", "FORWARD", "DROP")
    baseline = host.foreign()
    host.write_map(MAP)
    p = host.started("g0", [MAC])
    assert p.returncode == 0, p.stderr
    assert reaches_g1(host)
    rc, st = host.status()
    assert rc == 0 and not st["problems"], st["problems"]
    # In DOCKER-USER, first, on both families.
    for view in (v for k, v in host.dump().items() if k.endswith("save") and "DOCKER-USER" in v):
        lines = [ln for ln in view.splitlines() if ln.startswith("-A DOCKER-USER")]
        if any("vnethook:forward" in ln for ln in lines):
            assert "vnethook:forward" in lines[0]
    # NAT isolation: the guest's own address and an unmapped port stay closed.
    assert not host.topo.connect("ext", A["g1_4"], 80).ok
    assert not host.topo.connect("ext", A["host_ext4"], 8001).ok
    # dockerd restart: Docker deletes and re-inserts its jumps at the top of FORWARD.
    for chain in ("DOCKER-ISOLATION-STAGE-1", "DOCKER-USER"):
        _ipt(host, "-D", "FORWARD", "-j", chain, v6=chain == "DOCKER-USER")
        _ipt(host, "-I", "FORWARD", "1", "-j", chain, v6=chain == "DOCKER-USER")
    baseline = host.foreign()  # Docker's own rules moved; nothing else may change
    assert reaches_g1(host)
    rc, st = host.status()
    assert rc == 0 and not st["problems"], st["problems"]  # no false alarm
    doc = host.cli("doctor")
    assert doc.returncode == 0, doc.stdout.decode()
    assert host.stopped("g0", [MAC]).returncode == 0
    assert _ours_anywhere(host) == []
    assert host.foreign() == baseline


def test_ufw_like_forward_policy_and_reload(served):
    host = served
    # No Docker: take its jump to DOCKER-USER away; ufw's chains and policy instead.
    _ipt(host, "-D", "FORWARD", "-j", "DOCKER-USER")
    for c in ("ufw-before-forward", "ufw-user-forward", "ufw-after-forward"):
        _ipt(host, "-N", c)
        _ipt(host, "-A", "FORWARD", "-j", c)
    _ipt(host, "-A", "ufw-before-forward", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")
    _ipt(host, "-A", "ufw-before-forward", "-j", "ufw-user-forward")
    _ipt(host, "-P", "FORWARD", "DROP")
    baseline = host.foreign()
    host.write_map(MAP)
    assert host.started("g0", [MAC]).returncode == 0
    assert reaches_g1(host)
    rc, st = host.status()
    assert rc == 0 and not st["problems"], st["problems"]
    # `ufw reload` rebuilds only ufw's own chains; `ufw disable && enable`
    # takes its jumps away and puts them back (MANAGE_BUILTINS=no).
    for c in ("ufw-before-forward", "ufw-user-forward", "ufw-after-forward"):
        _ipt(host, "-F", c)
    _ipt(host, "-A", "ufw-before-forward", "-j", "ufw-user-forward")
    assert reaches_g1(host)
    for c in ("ufw-before-forward", "ufw-user-forward", "ufw-after-forward"):
        _ipt(host, "-D", "FORWARD", "-j", c)
    for c in ("ufw-after-forward", "ufw-user-forward", "ufw-before-forward"):
        _ipt(host, "-I", "FORWARD", "1", "-j", c)
    baseline = host.foreign()
    assert reaches_g1(host)
    assert host.status()[0] == 0
    assert host.stopped("g0", [MAC]).returncode == 0
    assert _ours_anywhere(host) == []
    assert host.foreign() == baseline


def test_status_names_a_drop_it_cannot_fix(served):
    """An admin's unconditional DROP at the head of FORWARD: traffic fails, and
    status says so by name instead of `ok`."""
    host = served
    host.write_map(MAP)
    assert host.started("g0", [MAC]).returncode == 0
    assert reaches_g1(host)
    flavour = "legacy" if host.backend == "iptables-legacy" else "nft"
    host.topo.exec("host", f"iptables-{flavour}", "-I", "FORWARD", "1", "-d", "192.0.2.0/24", "-j", "DROP")
    assert not host.topo.connect("ext", A["host_ext4"], 8000).ok
    rc, st = host.status()
    assert rc == 1 and any("-d 192.0.2.0/24 -j DROP" in p for p in st["problems"]), st["problems"]
    doc = host.cli("doctor", "g0", "8000")
    out = doc.stdout.decode()
    assert doc.returncode == 1 and "FAIL" in out and "-d 192.0.2.0/24 -j DROP" in out and "fix:" in out, out
    text = host.cli("status").stdout.decode()
    assert "BLOCKED" in text and " ok " not in text, text
    host.topo.exec("host", f"iptables-{flavour}", "-D", "FORWARD", "-d", "192.0.2.0/24", "-j", "DROP")
    assert reaches_g1(host) and host.status()[0] == 0
    doc = host.cli("doctor", "g0", "8000")
    assert doc.returncode == 0 and b"FAIL" not in doc.stdout, doc.stdout.decode()
    assert b"g0: *:8000 -> 192.0.2.10:80/tcp installed" in doc.stdout


def test_watcher_repairs_a_flushed_ruleset(served):
    """`nft flush ruleset` (nftables.service's usual config) wipes libvirt's
    tables and ours; libvirt rebuilds its own on its next reload. Without
    systemd, the watcher the hook starts notices our rules are gone and puts
    them back with no manual step."""
    import subprocess
    import time

    host = served
    host.write_map(MAP)
    assert host.started("g0", [MAC]).returncode == 0
    assert reaches_g1(host)
    w = subprocess.Popen(host.cli_argv("watch", "--interval", "0.1", "--idle-exit", "60", "--max-seconds", "60"),
                         env=host.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        _wipe(host)
        host.topo.load_libvirt(host.backend)  # libvirt's reload rebuilds its own rules
        t0 = time.monotonic()
        while not reaches_g1(host):
            assert time.monotonic() - t0 < 8, "the watcher did not repair the forwards"
            time.sleep(0.2)
        assert host.status()[0] == 0
    finally:
        w.terminate()
        w.wait(10)


def test_status_names_a_native_nft_forward_policy_drop(served):
    """An admin's own nftables table with a forward chain, policy drop (a
    common /etc/nftables.conf): every forwarded connection dies there. vnethook
    does not touch someone else's table; status and doctor name it, and once
    the admin accepts DNATed traffic there it is fine again."""
    host = served
    host.write_map(MAP)
    assert host.started("g0", [MAC]).returncode == 0
    assert reaches_g1(host)
    nft = ("table inet admin_fw {\n chain forward {\n  type filter hook forward priority 0; policy drop;\n"
           "  ct state established,related accept\n }\n}\n")
    host.topo.exec("host", "nft", "-f", "-", input=nft)
    try:
        assert not host.topo.connect("ext", A["host_ext4"], 8000).ok
        rc, st = host.status()
        assert rc == 1 and "dropped: nft inet admin_fw chain forward (hook forward) policy drop" in st["problems"], st
        doc = host.cli("doctor", "g0")
        assert doc.returncode == 1 and b"admin_fw" in doc.stdout
        host.topo.exec("host", "nft", "insert", "rule", "inet", "admin_fw", "forward", "ct", "status", "dnat", "accept")
        assert reaches_g1(host)
        rc, st = host.status()
        assert rc == 0 and not st["problems"], st["problems"]
    finally:
        host.topo.exec("host", "nft", "delete", "table", "inet", "admin_fw", check=False)


@pytest.mark.parametrize("event", ["reconnect", "sync"])
def test_after_the_tables_were_wiped_every_forward_comes_back(served, event):
    """firewalld's reload (or `nft flush ruleset`) deletes vnethook's rules
    together with libvirt's, and libvirt builds its own again; the records
    still say what was installed. The next event must add everything, base
    and guest rules: `reconnect` (libvirtd restarted meanwhile) trusts the
    record and takes the fast path, which re-created only the base in this
    release's first version of it (found by reading, proven here); `sync`
    (firewalld's listener, the watcher, the timer) lists first. Real packets
    before and after, the same rules as before with none twice, `status`
    agreeing, and a port the map does not publish still closed."""
    host = served
    host.write_map(MAP)
    assert host.started("g0", [MAC]).returncode == 0
    assert reaches_g1(host)
    before = host.ours()
    _wipe(host)
    host.topo.load_libvirt(host.backend)
    assert not reaches_g1(host)
    rc, st = host.status()
    assert rc == 1, st  # it says the forwards are gone
    if event == "reconnect":
        p = host.hook("qemu", "g0", "reconnect", host.run_domain("g0", [MAC]))
    else:
        p = host.cli("sync")
    assert p.returncode == 0, p.stderr
    assert reaches_g1(host)
    # (the Docker-like chains that held our other accept went with the wipe)
    mine = [ln for ln in host.ours() if "vnethook:forward" not in ln]
    assert sorted(mine) == sorted(ln for ln in before if "vnethook:forward" not in ln)
    assert len(set(mine)) == len(mine)
    rc, st = host.status()
    assert rc == 0 and st["problems"] == [], st
    assert not host.topo.connect("ext", A["host_ext4"], 8001).ok
