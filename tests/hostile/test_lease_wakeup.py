"""A late lease reaches the firewall as it lands, not at the next poll.

The watcher is started with a 60 s polling period and a 60 s repair
check: only its inotify watch on the lease directory can make it act
within seconds. Real rules, real
packets; the lease files are written as libvirt's helper writes them
(a temp file renamed over `<bridge>.status`).
"""

from __future__ import annotations

import subprocess
import time

from netns import A

MAC = "52:54:00:00:07:00"


def _answers(host, who: str) -> bool:
    r = host.topo.connect("ext", A["host_ext4"], 8000, timeout=0.5)
    return r.ok and r.who == who


def _wait(host, who: str, within: float) -> float:
    t0 = time.monotonic()
    while not _answers(host, who):
        assert time.monotonic() - t0 < within, f"the forward did not reach {who} within {within} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_late_and_changed_lease_wake_the_watcher(host):
    host.topo.server("g1", "g1", "80")
    host.topo.server("g2", "g2", "80")
    host.write_map({"g0": "[8000:80]"})
    p = host.started("g0", [MAC])
    assert p.returncode == 0, p.stderr
    assert not _answers(host, "g1")  # no lease yet: nothing forwarded
    w = subprocess.Popen(host.cli_argv("watch", "--interval", "60", "--repair-every", "60", "--idle-exit", "60", "--max-seconds", "120"),
                         env=host.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # its first pass (nothing to do) is over
        host.set_leases([{"ip-address": A["g1_4"], "mac-address": MAC, "expiry-time": 0}])
        first = _wait(host, "g1", within=5)
        # dnsmasq gives the MAC another address (a new lease after expiry)
        host.set_leases([{"ip-address": A["g2_4"], "mac-address": MAC, "expiry-time": 0}])
        second = _wait(host, "g2", within=5)
        print(f"lease to forward with inotify (60 s poll): {first * 1000:.0f} ms, re-lease {second * 1000:.0f} ms")
        assert not _answers(host, "g1")
        assert w.poll() is None, w.stderr.read().decode() if w.stderr else ""
    finally:
        w.terminate()
        w.wait(10)
    assert host.stopped("g0", [MAC]).returncode == 0
    assert host.ours() == []
