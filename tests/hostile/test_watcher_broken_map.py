"""A broken map must not make the lease watcher spin, flood or stay forever.

Found in the wild (a test left a hook-started watcher behind): with a map
that does not load, the watcher's round clock stopped, its wait fell to
zero and it burned a whole core for its 24 h lifetime, logging the map's
error at every round. On a host that is what a typo in ports.yaml does
while a guest waits for its lease. Now: it sleeps between rounds (the
repair period), says the error once per distinct error, applies the map
as soon as it is fixed, and exits when idle like a watcher with a good map.
Measured with the kernel's own CPU accounting of the real process.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from hostile_support import FakeHost

MAC1 = "52:54:00:00:0b:01"

BROKEN = "guests:\n  web1: [8080:80\n"  # an unclosed flow list


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _watch(host: FakeHost, idle_exit: float) -> subprocess.Popen:
    return subprocess.Popen(
        host.cli_argv("watch", "--interval", "0.25", "--repair-every", "0.5",
                      "--idle-exit", str(idle_exit), "--max-seconds", "60"),
        env=host.env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("backend", ["nftables"], indirect=True)
def test_broken_map_watcher_sleeps_says_once_then_applies_the_fix(host):
    host.write_raw(BROKEN)
    host.run_domain("web1", [MAC1])  # a running guest: the watcher must stay
    w = _watch(host, idle_exit=60)
    try:
        time.sleep(1.0)  # past its first repair period
        c0, t0 = _cpu_seconds(w.pid), time.monotonic()
        time.sleep(3.0)
        used = _cpu_seconds(w.pid) - c0
        wall = time.monotonic() - t0
        assert w.poll() is None, "the watcher left while a guest runs"
        # a busy loop burns ~1 s per second; sleeping rounds a few ms
        assert used < 0.25 * wall, f"the watcher used {used:.2f}s of CPU in {wall:.1f}s"
        host.write_map({"web1": "[8080:80]"})
        host.set_leases([{"ip-address": "192.0.2.55", "mac-address": MAC1, "expiry-time": 0}])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b"192.0.2.55" not in host.cli("status").stdout:
            time.sleep(0.1)
        assert b"192.0.2.55" in host.cli("status").stdout, "the fixed map was not applied"
    finally:
        w.terminate()
        _, err = w.communicate(timeout=10)
    said = err.decode(errors="replace").count("port map is invalid")
    assert said == 1, err.decode(errors="replace")


@pytest.mark.parametrize("backend", ["nftables"], indirect=True)
def test_broken_map_watcher_exits_when_no_guest_runs(host):
    host.write_raw(BROKEN)
    w = _watch(host, idle_exit=1.0)
    try:
        w.wait(timeout=10)
    except subprocess.TimeoutExpired:
        w.kill()
        w.communicate()
        raise AssertionError("the watcher stayed with a broken map and no guest running") from None
    w.communicate()
