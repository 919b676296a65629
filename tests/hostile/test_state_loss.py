"""The state directory missing, unwritable or corrupt; libvirt files vanishing.

Records live on tmpfs and can be lost or damaged; the firewall, where every
rule carries its guest's tag, is the ground truth vnethook rebuilds from
(engine._recover_if_needed + backend.snapshot()). Throughout, no rule is
duplicated, none is orphaned, and other people's rules stay as they were.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import threading
import time

from hostile_support import status_xml

MACS = {"g0": "52:54:00:00:04:00", "g1": "52:54:00:00:04:01"}


def _map(port_base=8000):
    return {g: f"{{address: 192.0.2.{10 + i}, forward: [{port_base + i}:80, 5300{i}:53/udp]}}"
            for i, g in enumerate(MACS)}


def _reference(host):
    assert host.cli("flush").returncode == 0
    assert host.cli("sync").returncode == 0
    return collections.Counter(host.ours())


def _no_dupes(host):
    c = collections.Counter(host.ours())
    assert all(n == 1 for n in c.values()), [l for l, n in c.items() if n > 1]
    return c


def test_state_dir_missing_is_rebuilt_from_the_firewall(host):
    baseline = host.foreign()
    host.write_map(_map())
    for g, m in MACS.items():
        assert host.started(g, [m]).returncode == 0
    before = _no_dupes(host)
    shutil.rmtree(host.state)
    # A re-plan with a changed map, then a removal: both must find the rules by tag.
    host.write_map(_map(9000))
    p = host.started("g0", [MACS["g0"]])
    assert p.returncode == 0 and b"recovered" in p.stderr, p.stderr
    got = _no_dupes(host)
    assert not any("8000" in l for l in got) and any("9000" in l for l in got)
    shutil.rmtree(host.state)
    p = host.stopped("g1", [MACS["g1"]])
    assert p.returncode == 0
    got = _no_dupes(host)
    assert not any("8001" in l or "53001" in l for l in got), p.stderr.decode()
    assert any("9000" in l for l in got)
    assert host.cli("sync").returncode == 0
    assert _no_dupes(host) == _reference(host)
    assert host.foreign() == baseline
    assert before  # sanity: there was something to lose


def test_corrupt_records_fall_back_to_tags(host):
    baseline = host.foreign()
    host.write_map(_map())
    for g, m in MACS.items():
        assert host.started(g, [m]).returncode == 0
    recs = host.records()
    garbage = [b"", b"{", b"\x00\xff" * 100, b'{"rules": "not a list"}', b"[]"]
    for i, key in enumerate(sorted(recs)):
        (host.state / "guests" / f"{key}.json").write_bytes(garbage[i % len(garbage)])
    # g0 is stopped with a corrupt record: its rules go, g1's stay.
    assert host.stopped("g0", [MACS["g0"]]).returncode == 0
    got = _no_dupes(host)
    assert not any("8000" in l for l in got) and any("8001" in l for l in got)
    # g1 re-planned with a corrupt record: replaced, not doubled.
    host.write_map(_map(9000))
    assert host.started("g1", [MACS["g1"]]).returncode == 0
    got = _no_dupes(host)
    assert any("9001" in l for l in got) and not any("8001" in l for l in got)
    for key in list(host.records()):
        (host.state / "guests" / f"{key}.json").write_bytes(b"\xff")
    p = host.cli("sync")
    assert p.returncode == 0, p.stderr
    assert _no_dupes(host) == _reference(host)
    assert host.foreign() == baseline


def test_unwritable_state_dir_changes_nothing_and_says_so(host):
    baseline = host.foreign()
    host.write_map(_map())
    assert host.started("g0", [MACS["g0"]]).returncode == 0
    good = host.dump()
    moved = host.tmp / "state-away"
    os.rename(host.state, moved)
    host.state.write_text("not a directory\n")  # every write below it fails (ENOTDIR)
    for g in MACS:
        p = host.started(g, [MACS[g]])
        assert p.returncode == 0 and p.stdout == b"" and b"Traceback" not in p.stderr
        assert str(host.state).encode() in p.stderr, p.stderr
    p = host.stopped("g0", [MACS["g0"]])
    assert p.returncode == 0 and b"Traceback" not in p.stderr
    assert host.dump() == good  # no record could be written: no rule was touched
    s = host.cli("sync")
    assert s.returncode != 0 and b"Traceback" not in s.stderr
    assert host.dump() == good
    # Writable again but empty: sync rebuilds from the tags and converges.
    host.state.unlink()
    host.run_domain("g0", [MACS["g0"]])
    host.run_domain("g1", [MACS["g1"]])
    assert host.cli("sync").returncode == 0
    assert _no_dupes(host) == _reference(host)
    assert host.foreign() == baseline
    shutil.rmtree(moved)


def test_status_and_lease_files_vanishing_mid_read(host):
    """libvirt rewrites and removes its files while vnethook reads them: a
    churner replaces/removes the status and lease files as fast as it can
    while hooks and syncs run; every run exits cleanly, and once the churn
    stops, sync converges."""
    host.write_map({"g0": "[8000:80]", "g1": "{address: 192.0.2.11, forward: [8001:80]}"})
    leases = [{"ip-address": "192.0.2.10", "mac-address": MACS["g0"], "expiry-time": 0}]
    stop = threading.Event()
    churned = [0]

    def churn():
        import json

        lp = host.lease_path()
        sp = host.status_path("g0")
        while not stop.is_set():
            for path, text in ((lp, json.dumps(leases)), (sp, status_xml("g0", [MACS["g0"]]))):
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(text)
                os.replace(tmp, path)
            time.sleep(0.001)
            for path in (lp, sp):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            # half-written (a writer that does not rename)
            lp.write_text(json.dumps(leases)[:17])
            sp.write_text(status_xml("g0", [MACS["g0"]])[:150])
            churned[0] += 1

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        host.run_domain("g1", [MACS["g1"]])
        for i in range(12):
            for argv, data in (
                (host.hook_argv("qemu", "g0", "started"), host.run_domain("g0", [MACS["g0"]])),
                (host.cli_argv("sync"), b""),
                (host.hook_argv("qemu", "g1", "reconnect"), host.run_domain("g1", [MACS["g1"]])),
            ):
                import subprocess

                p = subprocess.run(argv, input=data, capture_output=True, env=host.env, cwd="/", timeout=60)
                assert b"Traceback" not in p.stderr, p.stderr.decode()[-2000:]
                if "hooks" in argv[-5]:
                    assert p.returncode == 0, p.stderr
            _no_dupes(host)
    finally:
        stop.set()
        t.join(5)
    assert churned[0] > 10
    host.run_domain("g0", [MACS["g0"]])
    host.set_leases(leases)
    assert host.cli("sync").returncode == 0
    got = _no_dupes(host)
    assert any("192.0.2.10" in l for l in got) and any("192.0.2.11" in l for l in got)
    assert got == _reference(host)


def _tamper(host, key, edit):
    path = host.state / "guests" / f"{key}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_tampered_records_are_refused_and_sync_recovers(host):
    """A record whose fields would inject into a batch is refused (said in
    the log) before any batch; one that claims another guest's forwards
    renders to this guest's tagged rules only (nftables: its elements are
    checked to be tagged as its own first). Either way the rules are found
    by tag and nobody else's are touched."""
    baseline = host.foreign()
    host.write_map(_map())
    for g, m in MACS.items():
        assert host.started(g, [m]).returncode == 0
    reference = _no_dupes(host)
    keys = sorted(host.records())
    others = host.records()[keys[1]]["forwards"]

    def inject(data):
        data["forwards"][0]["guest_address"] = "192.0.2.10\n-A FORWARD -j ACCEPT"

    def foreign(data):
        data["forwards"] += [dict(f, domain=data["domain"]) for f in others]

    def layout(data):
        data["layout"] = "a layout of another release"

    for edit in (inject, foreign, layout):
        _tamper(host, keys[0], edit)
        host.write_map(_map(9000))
        p = host.started("g0", [MACS["g0"]])
        assert p.returncode == 0, p.stderr
        assert edit is foreign or b"by tag" in p.stderr, p.stderr
        got = _no_dupes(host)
        assert not any(":8000" in l or "dport 8000" in l for l in got)
        assert any("9000" in l for l in got) and any("8001" in l for l in got)  # g1's rules untouched
        assert host.foreign() == baseline
        host.write_map(_map())
        assert host.started("g0", [MACS["g0"]]).returncode == 0
    # A tampered forward field (the bridge) and a foreign backend name.
    _tamper(host, keys[0], lambda d: d["forwards"][0].update(bridge="virbr0/../../x"))
    _tamper(host, keys[1], lambda d: d.update(backend="/bin/sh"))
    p = host.cli("sync")
    assert p.returncode == 0 and p.stderr.count(b"refused") >= 2, p.stderr
    assert _no_dupes(host) == reference
    assert host.stopped("g0", [MACS["g0"]]).returncode == 0
    assert host.stopped("g1", [MACS["g1"]]).returncode == 0
    assert host.ours() == []
    assert host.foreign() == baseline


def test_untrusted_state_dir_is_set_aside_and_rebuilt(host):
    baseline = host.foreign()
    host.write_map(_map())
    for g, m in MACS.items():
        assert host.started(g, [m]).returncode == 0
    reference = _no_dupes(host)
    guests = host.state / "guests"
    os.chmod(guests, 0o777)
    p = host.cli("sync")
    assert p.returncode == 0, p.stderr
    assert b"writable by group and others" in p.stderr and b"set aside" in p.stderr, p.stderr
    assert _no_dupes(host) == reference
    assert (os.stat(guests).st_mode & 0o777) == 0o700 and sorted(host.records()) == sorted(_keys(host))
    aside = [d for d in os.listdir(host.state) if d.startswith("guests.untrusted-")]
    assert len(aside) == 1
    # A record file someone else may write: refused, found by tag, replaced.
    key = sorted(host.records())[0]
    os.chmod(guests / f"{key}.json", 0o646)
    host.write_map(_map(9000))
    p = host.started("g0", [MACS["g0"]])
    assert p.returncode == 0 and b"writable by others" in p.stderr, p.stderr
    got = _no_dupes(host)
    assert any("9000" in l for l in got) and not any("8000" in l for l in got)
    # The state directory itself a symlink: nothing is changed, and it says so.
    shutil.rmtree(host.state / aside[0])
    real = host.tmp / "state-real"
    os.rename(host.state, real)
    os.symlink(real, host.state)
    before = host.dump()
    p = host.stopped("g1", [MACS["g1"]])
    assert p.returncode == 0 and b"symlink" in p.stderr and b"Traceback" not in p.stderr, p.stderr
    assert host.dump() == before
    os.unlink(host.state)
    os.rename(real, host.state)
    assert host.cli("sync").returncode == 0
    assert host.foreign() == baseline


def _keys(host):
    from vnethook.model import guest_key

    return [guest_key(g) for g in MACS]


def test_an_older_releases_records_are_used_or_found_by_tag(host):
    """Upgrade with guests running: records of the previous release hold the
    rendered rules and no layout. One whose rules are what its forwards
    render to now is used as is (no listing) and rewritten by sync without
    them; one whose rules differ is found by tag. Either way nothing is
    duplicated or left behind."""
    from vnethook import state as records
    from vnethook.firewall import get_backend

    be = get_backend(host.backend)
    baseline = host.foreign()
    host.write_map(_map())
    for g, m in MACS.items():
        assert host.started(g, [m]).returncode == 0
    reference = _no_dupes(host)
    keys = sorted(host.records())

    def old(rules=None):
        def edit(data):
            data.pop("layout")
            data["rules"] = rules if rules is not None else be.render(data["key"], records.forwards_of(data))
        return edit

    _tamper(host, keys[0], old())
    _tamper(host, keys[1], old(["4 nat -A VNETHOOK-DNAT -j ACCEPT"]))
    p = host.cli("sync")
    assert p.returncode == 0, p.stderr
    assert _no_dupes(host) == reference
    assert all("rules" not in r and r["layout"] == be.layout for r in host.records().values())
    _tamper(host, keys[0], old())
    _tamper(host, keys[1], old(["4 nat -A VNETHOOK-DNAT -j ACCEPT"]))
    p = host.stopped("g0", [MACS["g0"]])
    assert p.returncode == 0 and b"by tag" not in p.stderr, p.stderr
    assert not any("8000" in l for l in _no_dupes(host)) and any("8001" in l for l in host.ours())
    p = host.stopped("g1", [MACS["g1"]])
    assert p.returncode == 0 and b"by tag" in p.stderr, p.stderr
    assert host.ours() == [] and host.records() == {}
    assert host.foreign() == baseline
