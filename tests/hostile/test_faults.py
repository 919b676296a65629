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

from conftest import NETWORK, hook_data

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
            from conftest import domain_xml

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
    from conftest import domain_xml

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
