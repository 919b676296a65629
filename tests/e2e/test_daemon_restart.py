"""No connection lost while libvirtd restarts or reloads its firewall.

On a daemon restart (and on SIGHUP) libvirt deletes and re-adds its own
rules with no hook call, then sends `reconnect` for each running guest.
A probe connects from outside every 50 ms through the whole event; every
failed connect is a connection a user lost.
"""

from __future__ import annotations

import time

import pytest

from outage import Probe
from sandbox import Sandbox, mac_for
from vnethook_env import VnethookEnv

pytestmark = [pytest.mark.e2e, pytest.mark.distros]

HOST_EXT = "198.51.100.1"


@pytest.fixture
def vh(sandbox: Sandbox, tmp_path):
    env = VnethookEnv(sandbox, tmp_path)
    env.install()
    sandbox.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    return env


ROUNDS = 3


def _libvirt_handles(sb: Sandbox) -> set:
    """Handles of libvirt's own rules (LIBVIRT_* chains, table
    libvirt_network): new handles show that libvirt deleted and re-added
    them, so the event really went through the window we probe."""
    out = sb.run(["nft", "-a", "list", "ruleset"]).stdout
    handles, ours, table_libvirt = set(), False, False
    for ln in out.splitlines():
        s = ln.strip()
        if s.startswith("table "):
            table_libvirt = "libvirt_network" in s
        if s.startswith("chain "):
            ours = table_libvirt or s.split()[1].startswith("LIBVIRT_")
        elif ours and "# handle" in s:
            handles.add(s)
    return handles
INTERVAL = 0.02  # seconds between two connects of the probe


@pytest.mark.parametrize("event", ["restart", "sighup"])
def test_no_connection_lost(sandbox, vh, event):
    sb = sandbox
    vh.write_map("guests:\n  web1: [8080:80]\n")
    mac = mac_for(31)
    sb.define_domain("web1", macs=[mac])
    g = sb.add_guest_netns("web1", mac)
    g.dhcp(hostname="web1")
    g.serve_tcp(80, "web1")
    sb.start("web1")
    ext = sb.add_external()
    sb.wait_for(lambda: ext.connect_tcp(HOST_EXT, 8080, "ping", timeout=0.5).ok, timeout=5, what="forward")
    rules = vh.our_rules()
    legacy_host = sb.iptables == "legacy"
    probe = Probe(sb, ext, HOST_EXT, 8080, interval=INTERVAL)
    lost = []
    try:
        for _ in range(ROUNDS):
            time.sleep(0.3)
            handles = None if legacy_host else _libvirt_handles(sb)
            t0 = time.monotonic()
            pid = sb.libvirtd_pid()
            if event == "restart":
                sb.restart_libvirtd()
                # The 1.5 s below cover `reconnect`, which the new daemon
                # sends once it is up: it must not cut anything either.
            else:
                sb.reload_libvirtd(settle=0.5)
            time.sleep(1.5)
            end = time.monotonic()
            tries = [ok for t, ok in probe.samples(t0) if t <= end]
            longest, _ = probe.outage(t0, end)
            lost.append(tries.count(False))
            print(f"libvirtd {event} ({sb.firewall_backend}, pid {pid}): {tries.count(False)} of "
                  f"{len(tries)} connects failed, longest outage {longest * 1000:.0f} ms, "
                  f"event {end - t0 - 1.5:.2f} s")
            if handles is not None:
                new = _libvirt_handles(sb)
                print(f"  libvirt re-added {len(new - handles)} of its {len(new)} rules")
                assert new - handles, "libvirt did not re-add its rules: the event was not the one probed"
            assert vh.our_rules() == rules, f"libvirtd {event} changed or duplicated vnethook's rules"
    finally:
        probe.stop()
    assert lost == [0] * ROUNDS, f"connections lost per libvirtd {event}: {lost}"
