"""route_localnet and guard bookkeeping against a stand-in /proc tree.

Pure file logic: the guard is a recorder here (what it does to packets is
proven in tests/acceptance/test_loopback.py, against a real kernel).
"""

from __future__ import annotations

import json
import os

import pytest

from vnethook.firewall.localnet import STATE_FILE, GuardError, ensure, guard_commands


class Guard:
    """Where the guard would be: records the order of calls."""

    def __init__(self, fail: bool = False):
        self.on = False
        self.fail = fail
        self.calls = []

    def set(self, on):
        self.calls.append(on)
        if self.fail:
            raise GuardError("nft: refused")
        self.on = on

    def present(self):
        return self.on


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
    g = Guard()
    assert ensure(state, {"virbr0", "virbr1"}, proc=proc, guard=g) == []
    assert (_val(proc, "virbr0"), _val(proc, "virbr1"), _val(proc, "eth0")) == ("1", "1", "0")
    with open(f"{state}/{STATE_FILE}") as f:
        assert json.load(f) == {"saved": {"virbr0": "0", "virbr1": "1"}, "guard": True}
    # A later call (another process) drops virbr1: its original "1" stays "1".
    ensure(state, {"virbr0"}, proc=proc, guard=g)
    assert (_val(proc, "virbr0"), _val(proc, "virbr1")) == ("1", "1")
    assert g.calls == [True]  # the guard is in already: not touched again
    ensure(state, set(), proc=proc, guard=g)
    assert _val(proc, "virbr0") == "0"
    assert g.calls == [True, False] and not g.on
    assert not (tmp_path / "state" / STATE_FILE).exists()


def test_guard_first_and_no_localnet_without_it(tmp_path):
    proc = _proc(tmp_path, {"virbr0": "0"})
    state = str(tmp_path / "state")
    problems = ensure(state, {"virbr0"}, proc=proc, guard=Guard(fail=True))
    assert _val(proc, "virbr0") == "0"
    assert problems and "loopback forwards on virbr0 are off" in problems[0]


def test_guard_removed_only_after_every_bridge_is_back(tmp_path):
    proc = _proc(tmp_path, {"virbr0": "0"})
    state = str(tmp_path / "state")
    seen = []

    class Watching(Guard):
        def set(self, on):
            seen.append((on, _val(proc, "virbr0")))
            super().set(on)

    g = Watching()
    ensure(state, {"virbr0"}, proc=proc, guard=g)
    ensure(state, set(), proc=proc, guard=g)
    assert seen == [(True, "0"), (False, "0")]


@pytest.mark.parametrize("content", [b"{not json", b'{"saved": {"virbr0": "1; rm"}}', b"[1, 2]",
                                     b'{"saved": {"../all": "0"}}'])
def test_corrupt_state_fails_closed(tmp_path, content):
    """Lost originals never leave a libvirt bridge at 1 that nothing needs."""
    proc = _proc(tmp_path, {"virbr0": "1", "virbr1": "1", "docker0": "1"})
    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_FILE).write_bytes(content)
    os.chmod(state / STATE_FILE, 0o600)
    g = Guard()
    g.on = True  # a guard that a lost file may have left
    problems = ensure(str(state), {"virbr1"}, managed={"virbr0", "virbr1"}, proc=proc, guard=g)
    assert (_val(proc, "virbr0"), _val(proc, "virbr1"), _val(proc, "docker0")) == ("0", "1", "1")
    assert any("unreadable" in p for p in problems)
    ensure(str(state), set(), managed={"virbr0", "virbr1"}, proc=proc, guard=g)
    assert (_val(proc, "virbr0"), _val(proc, "virbr1")) == ("0", "0")  # not docker0: not libvirt's
    assert not g.on and not (state / STATE_FILE).exists()


def test_lost_state_is_corrected_by_sync(tmp_path):
    proc = _proc(tmp_path, {"virbr0": "1"})
    state = str(tmp_path / "state")
    g = Guard()
    assert ensure(state, set(), managed={"virbr0"}, proc=proc, guard=g) == []  # a hook: trusts the file
    assert _val(proc, "virbr0") == "1"
    problems = ensure(state, set(), managed={"virbr0"}, verify=True, proc=proc, guard=g)
    assert _val(proc, "virbr0") == "0" and problems


def test_sync_reinstalls_a_flushed_guard(tmp_path):
    proc = _proc(tmp_path, {"virbr0": "0"})
    state = str(tmp_path / "state")
    g = Guard()
    ensure(state, {"virbr0"}, proc=proc, guard=g)
    g.on = False  # `nft flush ruleset`
    ensure(state, {"virbr0"}, proc=proc, guard=g)
    assert not g.on  # a hook trusts the state file
    ensure(state, {"virbr0"}, verify=True, proc=proc, guard=g)
    assert g.on


def test_state_file_of_another_owner_or_mode_is_not_trusted(tmp_path):
    proc = _proc(tmp_path, {"virbr0": "1"})
    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_FILE).write_text(json.dumps({"saved": {"virbr0": "1"}, "guard": False}))
    os.chmod(state / STATE_FILE, 0o666)
    problems = ensure(str(state), set(), managed={"virbr0"}, proc=proc, guard=Guard())
    assert _val(proc, "virbr0") == "0" and problems


def test_old_format_is_read(tmp_path):
    proc = _proc(tmp_path, {"virbr0": "1"})
    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_FILE).write_text(json.dumps({"virbr0": "0"}))
    os.chmod(state / STATE_FILE, 0o600)
    assert ensure(str(state), set(), proc=proc, guard=Guard()) == []
    assert _val(proc, "virbr0") == "0"


def test_missing_bridge_is_not_an_error(tmp_path):
    proc = _proc(tmp_path, {"virbr0": "0"})
    state = str(tmp_path / "state")
    g = Guard()
    assert ensure(state, {"virbr9"}, proc=proc, guard=g) == []
    ensure(state, {"virbr0"}, proc=proc, guard=g)
    (tmp_path / "proc" / "virbr0" / "route_localnet").unlink()
    (tmp_path / "proc" / "virbr0").rmdir()  # the bridge went away
    assert ensure(state, set(), proc=proc, guard=g) == []


def test_refuses_global_names(tmp_path):
    for bad in ("all", "default", "../x", "", "x" * 16):
        with pytest.raises(ValueError):
            ensure(str(tmp_path), {bad}, proc=str(tmp_path), guard=Guard())


def test_guard_commands_are_one_idempotent_transaction():
    on, off = guard_commands(True), guard_commands(False)
    assert on.startswith("add table ip vnethook_guard\n") and "flush chain" in on
    assert on.count("drop") == 2 and "priority raw" in on
    assert off == "add table ip vnethook_guard\ndelete table ip vnethook_guard\n"
