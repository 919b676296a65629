"""SIGKILL at random points of apply, remove and sync; concurrent hooks.

vnethook writes a pending record before each change and the firewall batch
is atomic, so a kill anywhere must leave something the next `vnethook sync`
turns into exactly the desired state: no duplicate, no orphan, and other
people's rules (libvirt's, a docker-like set, an admin's rule and table)
byte-identical. "Exactly" is checked against a reference: the same desired
state installed from scratch (flush + sync) on the same host.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import time

import pytest

from hostile_support import NETWORK, hook_data

GUESTS = [f"g{i}" for i in range(4)]
MAC = {g: f"52:54:00:00:02:{i:02x}" for i, g in enumerate(GUESTS)}
ITERATIONS = int(os.environ.get("VNETHOOK_HOSTILE_KILLS", "50"))


def _map(version: int):
    out = {}
    for i, g in enumerate(GUESTS):
        fw = [f"{8000 + 10 * i}:80", f"{30000 + 100 * i}-{30009 + 100 * i}:40000-40009/udp"]
        if version == 1:
            fw = [f"{8001 + 10 * i}:80", f"{9000 + i}:{9000 + i}"] + ([fw[1]] if i % 2 else [])
        out[g] = f"{{address: [192.0.2.{10 + i}, '2001:db8:1::{10 + i}'], forward: [{', '.join(fw)}]}}"
    return out


def _counter(lines):
    return collections.Counter(lines)


class Scenario:
    def __init__(self, host, rng):
        self.h = host
        self.rng = rng
        self.version = 0
        self.running = set()
        self.refs = {}
        host.write_map(_map(0))

    def set_version(self, v):
        if v != self.version:
            self.version = v
            self.h.write_map(_map(v))

    def op(self):
        """Change the desired state, and return the argv that enacts it."""
        h, rng = self.h, self.rng
        kind = rng.choice(["started", "started", "stopped", "sync", "network"])
        if kind == "stopped" and not self.running:
            kind = "started"
        if rng.random() < 0.4:
            self.set_version(1 - self.version)
        if kind == "started":
            g = rng.choice(GUESTS)
            self.running.add(g)
            return "apply", h.hook_argv("qemu", g, "started"), h.run_domain(g, [MAC[g]])
        if kind == "stopped":
            g = rng.choice(sorted(self.running))
            self.running.discard(g)
            h.stop_domain(g)
            from hostile_support import domain_xml

            return "remove", h.hook_argv("qemu", g, "stopped", "end"), domain_xml(g, [MAC[g]]).encode()
        if kind == "network":
            return "sync", h.hook_argv("network", NETWORK, "started"), hook_data().encode()
        return "sync", h.cli_argv("sync"), b""

    def reference(self):
        """Our rules for the current desired state, installed from scratch."""
        key = (self.version, frozenset(self.running))
        if key not in self.refs:
            assert self.h.cli("flush").returncode == 0
            p = self.h.cli("sync")
            assert p.returncode == 0, p.stderr
            self.refs[key] = _counter(self.h.ours())
        return self.refs[key]


def _popen(host, argv, data):
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=host.env, cwd="/")
    return p


def _timed(host, argv, data):
    t = time.monotonic()
    p = subprocess.run(argv, input=data, capture_output=True, env=host.env, cwd="/")
    assert p.returncode == 0, p.stderr
    return time.monotonic() - t


@pytest.mark.slow
def test_sigkill_anywhere_then_sync_converges_exactly(host, record_property):
    seed = int(os.environ.get("VNETHOOK_HOSTILE_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    s = Scenario(host, rng)
    baseline = host.foreign()
    # Typical durations of each kind of run, measured here.
    typical = {}
    for g in GUESTS:
        s.running.add(g)
        typical["apply"] = _timed(host, host.hook_argv("qemu", g, "started"), host.run_domain(g, [MAC[g]]))
    typical["sync"] = _timed(host, host.cli_argv("sync"), b"")
    s.set_version(1)
    typical["sync"] = max(typical["sync"], _timed(host, host.cli_argv("sync"), b""))
    g = GUESTS[0]
    host.stop_domain(g)
    s.running.discard(g)
    from hostile_support import domain_xml

    typical["remove"] = _timed(host, host.hook_argv("qemu", g, "stopped", "end"), domain_xml(g, [MAC[g]]).encode())
    killed = finished = 0
    for i in range(ITERATIONS):
        what, argv, data = s.op()
        delay = rng.uniform(0, typical[what])
        p = _popen(host, argv, data)
        try:
            p.stdin.write(data)
            p.stdin.close()
        except BrokenPipeError:
            pass
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        else:
            finished += 1
        p.wait(timeout=60)
        p.stdout.close()
        p.stderr.close()
        sync = host.cli("sync")
        ctx = f"seed={seed} iteration={i} {what} delay={delay:.3f}s: {sync.stderr.decode()[-800:]}"
        assert sync.returncode == 0, ctx
        dump = host.dump()
        got = _counter(host.ours(dump))
        assert all(n == 1 for n in got.values()), ("duplicates", ctx, [l for l, n in got.items() if n > 1])
        assert host.foreign(dump) == baseline, ctx
        st = host.cli("status", "--json")
        status = json.loads(st.stdout)
        assert st.returncode == 0, (ctx, status)
        assert {g["domain"] for g in status["guests"]} == s.running, ctx
        assert got == s.reference(), ctx
    record_property("kills", killed)
    record_property("finished_before_kill", finished)
    print(f"{host.backend}: {ITERATIONS} iterations, {killed} killed mid-run, seed {seed}, typical {typical}")


# --------------------------------------------------------------------------- concurrency

MANY = [f"c{i:02d}" for i in range(25)]


def _many_map():
    return {g: f"{{address: 192.0.2.{30 + i}, forward: [{7000 + i}:80, {7100 + i}:{7100 + i}/udp]}}"
            for i, g in enumerate(MANY)}


@pytest.mark.slow
def test_fifty_concurrent_hooks_across_25_guests(host, record_property):
    """Guests 0-6 stop, 7-12 restart (daemon restart: port-created + reconnect)
    and 13-24 start (started twice: libvirt never does, a stuck retry might),
    all 50 hooks at once, while an admin adds rules with `iptables -w` in
    the same tables. Only the final desired state may remain."""
    from hostile_support import domain_xml

    host.write_map(_many_map())
    mac = {g: f"52:54:00:00:03:{i:02x}" for i, g in enumerate(MANY)}
    for g in MANY[:13]:
        assert host.started(g, [mac[g]]).returncode == 0
    baseline = host.foreign()
    from test_broken_config import port_xml

    calls = []
    for g in MANY[:7]:
        host.stop_domain(g)
        x = domain_xml(g, [mac[g]]).encode()
        calls += [(host.hook_argv("qemu", g, "stopped", "end"), x), (host.hook_argv("qemu", g, "release", "end"), x)]
    for g in MANY[7:13]:
        x = host.run_domain(g, [mac[g]])
        calls += [(host.hook_argv("network", NETWORK, "port-created"), port_xml(g, mac[g])),
                  (host.hook_argv("qemu", g, "reconnect"), x)]
    for g in MANY[13:]:
        x = host.run_domain(g, [mac[g]])
        calls += [(host.hook_argv("qemu", g, "started"), x), (host.hook_argv("qemu", g, "started"), x)]
    random.Random(7).shuffle(calls)
    assert len(calls) == 50
    tool = "iptables-legacy" if host.backend == "iptables-legacy" else "iptables-nft"
    admin = [host.topo.ns["host"]]
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=host.env, cwd="/") for argv, _ in calls]
    writers = [subprocess.Popen(["ip", "netns", "exec", admin[0], tool, "-w", "-A", "INPUT", "-s",
                                 f"198.51.100.{200 + i}", "-j", "ACCEPT"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(20)]
    for p, (_, data) in zip(procs, calls):
        p.stdin.write(data)
        p.stdin.close()
    t = time.monotonic()
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    elapsed = time.monotonic() - t
    for w in writers:
        assert w.wait(timeout=120) == 0, w.stderr.read()
        w.stdout.close()
        w.stderr.close()
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    for (argv, _), (rc, out, err) in zip(calls, results):
        assert rc == 0 and out == b"", (argv, err)
        assert b"error" not in err and b"Traceback" not in err, (argv, err.decode()[-1500:])
    want = set(MANY[7:])
    assert {r["domain"] for r in host.records().values()} == want
    got = _counter(host.ours())
    assert all(n == 1 for n in got.values()), [l for l, n in got.items() if n > 1]
    # Every admin rule made it, once: nobody replaced a table without the lock.
    saved = host.topo.exec("host", f"{tool}-save", "-t", "filter").stdout
    for i in range(20):
        assert saved.count(f"-A INPUT -s 198.51.100.{200 + i}/32 -j ACCEPT") == 1, i
        host.topo.exec("host", tool, "-w", "-D", "INPUT", "-s", f"198.51.100.{200 + i}", "-j", "ACCEPT")
    assert host.foreign() == baseline
    st = host.cli("status", "--json")
    assert st.returncode == 0, st.stdout
    # Exactly what a from-scratch install of that state gives.
    assert host.cli("flush").returncode == 0
    assert host.cli("sync").returncode == 0
    assert _counter(host.ours()) == got
    record_property("concurrent_hooks", len(calls))
    print(f"{host.backend}: 50 concurrent hooks + 20 iptables -w writers in {elapsed:.1f}s")


# --------------------------------------------------------------------------- a kill between two steps

@pytest.mark.parametrize("backend", ["iptables-nft", "iptables-legacy"], indirect=True)
def test_backend_remove_after_half_done_removal_drops_the_base(host, tmp_path):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "acceptance"))
    from hostile_support import BRIDGE
    from vnethook.model import Forward, guest_key

    state = str(tmp_path / "drive")
    os.makedirs(state)
    fw = Forward(domain="web", mac="52:54:00:00:00:01", network="default", bridge=BRIDGE,
                 subnet="192.0.2.0/24", family=4, guest_address="192.0.2.10", protocol="tcp",
                 host_address=None, host_ports=(8080, 8080), guest_ports=(80, 80))
    key = guest_key("web")
    baseline = host.foreign()
    rec = host.topo.drive("apply", host.backend, key, state, forwards=[fw])["record"]
    tool = "iptables-legacy" if host.backend == "iptables-legacy" else "iptables-nft"
    for r in rec:  # what the killed removal got done: the guest's rules, not the base
        fam, table, _, spec = r.split(" ", 3)
        host.topo.exec("host", tool if fam == "4" else tool.replace("iptables", "ip6tables"), "-w", "-t", table,
                       "-D", *spec.replace('"', "").split(" "))
    host.topo.drive("remove", host.backend, key, state, "--no-previous")
    assert host.ours() == []
    assert host.foreign() == baseline


@pytest.mark.parametrize("backend", ["iptables-nft", "iptables-legacy"], indirect=True)
def test_sync_drops_a_base_left_by_a_removal_killed_before_teardown(host):
    """The engine's side of the above: after such a kill, `vnethook sync` leaves nothing of ours."""
    baseline = host.foreign()
    host.write_map({"web": "{address: 192.0.2.10, forward: [8080:80]}"})
    assert host.started("web", ["52:54:00:00:00:01"]).returncode == 0
    (key, rec), = host.records().items()
    from vnethook import state as records
    from vnethook.firewall import get_backend

    tool = "iptables-legacy" if host.backend == "iptables-legacy" else "iptables-nft"
    for r in get_backend(host.backend).render(key, records.forwards_of(rec)):
        fam, table, _, spec = r.split(" ", 3)
        host.topo.exec("host", tool if fam == "4" else tool.replace("iptables", "ip6tables"), "-w", "-t", table,
                       "-D", *spec.replace('"', "").split(" "))
    rec["pending"] = True  # killed after the pending write and the rule deletion
    (host.state / "guests" / f"{key}.json").write_text(json.dumps(rec))
    host.stop_domain("web")
    assert host.ours() != []  # the base is still there
    p = host.cli("sync")
    assert p.returncode == 0, p.stderr
    assert host.ours() == [] and host.records() == {}
    assert host.foreign() == baseline
