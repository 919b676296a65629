"""route_localnet bookkeeping against a stand-in /proc tree (pure file logic).

The real-kernel side is covered by test_loopback_forward_host_only.
"""

from __future__ import annotations

import json

from acceptance_support import REPO  # noqa: F401  (puts the repo on sys.path)

from vnethook.firewall.sysctl import STATE_FILE, ensure_localnet


def _proc(tmp_path, values):
    for br, v in values.items():
        d = tmp_path / "proc" / br
        d.mkdir(parents=True)
        (d / "route_localnet").write_text(v + "\n")
    return str(tmp_path / "proc")


def _val(proc, br):
    with open(f"{proc}/{br}/route_localnet") as f:
        return f.read().strip()


def test_sets_only_needed_and_restores_originals(tmp_path):
    proc = _proc(tmp_path, {"virbr0": "0", "virbr1": "1", "eth0": "0"})
    state = str(tmp_path / "state")
    ensure_localnet(state, {"virbr0", "virbr1"}, proc=proc)
    assert (_val(proc, "virbr0"), _val(proc, "virbr1"), _val(proc, "eth0")) == ("1", "1", "0")
    with open(f"{state}/{STATE_FILE}") as f:
        assert json.load(f) == {"virbr0": "0", "virbr1": "1"}
    # A later call (another process) drops virbr1: its original "1" stays "1".
    ensure_localnet(state, {"virbr0"}, proc=proc)
    assert (_val(proc, "virbr0"), _val(proc, "virbr1")) == ("1", "1")
    ensure_localnet(state, set(), proc=proc)
    assert _val(proc, "virbr0") == "0"
    assert not (tmp_path / "state" / STATE_FILE).exists()


def test_missing_bridge_is_not_an_error(tmp_path):
    proc = _proc(tmp_path, {"virbr0": "0"})
    state = str(tmp_path / "state")
    assert ensure_localnet(state, {"virbr9"}, proc=proc) == {}
    ensure_localnet(state, {"virbr0"}, proc=proc)
    (tmp_path / "proc" / "virbr0" / "route_localnet").unlink()
    (tmp_path / "proc" / "virbr0").rmdir()  # the bridge went away
    assert ensure_localnet(state, set(), proc=proc) == {}


def test_refuses_global_names(tmp_path):
    import pytest

    for bad in ("all", "default", "../x", ""):
        with pytest.raises(ValueError):
            ensure_localnet(str(tmp_path), {bad}, proc=str(tmp_path))
