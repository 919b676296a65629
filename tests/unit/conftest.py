"""Fixtures shared by the unit tests that run hook events in-process."""

from __future__ import annotations

import os

import pytest

from vnethook.paths import Paths


@pytest.fixture
def hook_env(tmp_path, monkeypatch):
    """A private port map, state directory and libvirt tree (no firewall),
    pointed at by the VNETHOOK_* variables, as the hook reads them. These
    events run in the root namespace: no lease watcher may be left behind
    (the tests' maps say lease_watch: off), which is checked afterwards."""
    cfg = tmp_path / "etc"
    cfg.mkdir()
    os.chmod(cfg, 0o755)
    root = tmp_path / "root"
    for d in ("run/libvirt/qemu", "run/libvirt/network", "var/lib/libvirt/dnsmasq", "etc/libvirt/qemu"):
        (root / d).mkdir(parents=True)
    state = tmp_path / "state"
    monkeypatch.setenv("VNETHOOK_CONFIG", str(cfg))
    monkeypatch.setenv("VNETHOOK_STATE_DIR", str(state))
    monkeypatch.setenv("VNETHOOK_LIBVIRT_ROOT", str(root))
    monkeypatch.setenv("VNETHOOK_LOG", "stderr")
    paths = Paths(config=str(cfg), libvirt_root=str(root), state_dir=str(state))
    yield paths
    from vnethook.watch import stop_watcher, watcher_running

    assert not watcher_running(paths), "a test started a lease watcher"
    stop_watcher(paths)
