"""The lease watcher's wakeups: inotify on the lease directory, and the
token that keeps an exiting watcher from missing a hook that relies on it.

Real inotify, real flock, real files in a tmp dir; nothing is mocked.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from vnethook import watch
from vnethook.inotify import IN_MOVED_TO, DirWatch, parse_events
from vnethook.paths import Paths


@pytest.fixture
def paths(tmp_path):
    return Paths(config=str(tmp_path / "etc"), libvirt_root=str(tmp_path / "root"),
                 state_dir=str(tmp_path / "run" / "vnethook"))


def _replace(path: str, text: str) -> None:
    """What libvirt's leases helper does: write a temp file, rename it over."""
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def test_parse_events_drops_a_truncated_tail():
    one = struct.pack("iIII", 3, IN_MOVED_TO, 0, 8) + b"a.status"
    assert parse_events(one) == [(3, IN_MOVED_TO, b"a.status")]
    assert parse_events(one + one[:20]) == [(3, IN_MOVED_TO, b"a.status")]
    assert parse_events(one[:10]) == []
    padded = struct.pack("iIII", 1, IN_MOVED_TO, 0, 16) + b"b.status" + b"\0" * 8
    assert parse_events(padded) == [(1, IN_MOVED_TO, b"b.status")]


def test_dirwatch_wakes_on_a_replaced_lease_file(tmp_path):
    d = tmp_path / "dnsmasq"
    d.mkdir()
    w = DirWatch([str(d)])
    try:
        assert w.complete
        assert w.wait(0.05) is False  # nothing happened: slept the timeout
        t0 = time.monotonic()
        _replace(str(d / "virbr0.status"), "[]")
        assert w.wait(5) is True
        assert time.monotonic() - t0 < 5
        assert w.wait(0.05) is False  # drained: one change, one wakeup
    finally:
        w.close()


def test_dirwatch_follows_a_directory_that_comes_later(tmp_path):
    d = tmp_path / "dnsmasq"
    w = DirWatch([str(d)])
    try:
        assert not w.complete  # missing: the caller polls
        d.mkdir()
        w.rearm()
        assert w.complete
        d.rmdir()
        assert w.wait(5) is True  # the directory going is a change too
        assert not w.complete
        d.mkdir()
        w.rearm()
        _replace(str(d / "virbr0.status"), "[]")
        assert w.wait(5) is True
    finally:
        w.close()


def test_exiting_watcher_stays_for_a_hook_that_came_meanwhile(paths):
    fd = watch._take_lock(paths)
    assert fd is not None
    seen = watch._read_want(paths)
    # A hook between the watcher's last look and its exit: it writes its
    # token, sees the lock held, and spawns nothing.
    watch.want_watcher(paths)
    assert watch.watcher_running(paths)
    fd2 = watch.release_or_stay(paths, fd, seen)
    assert fd2 is not None, "the watcher exited although a hook relied on it"
    assert watch.watcher_running(paths)
    with open(watch._lock_path(paths)) as f:
        assert f.read().strip() == str(os.getpid())
    os.close(fd2)


def test_exiting_watcher_goes_when_nobody_asked(paths):
    watch.want_watcher(paths)
    fd = watch._take_lock(paths)
    seen = watch._read_want(paths)
    assert watch.release_or_stay(paths, fd, seen) is None
    assert not watch.watcher_running(paths)


def test_exiting_watcher_leaves_the_lock_to_a_new_one(paths):
    fd = watch._take_lock(paths)
    seen = watch._read_want(paths)
    # The hook came after the release in real life; here a second watcher
    # already holds the lock when the first one looks: it must not wait.
    os.close(fd)
    other = watch._take_lock(paths)
    watch.want_watcher(paths)
    fd_again = watch._take_lock(paths)
    assert fd_again is None
    assert watch.release_or_stay(paths, os.open(os.devnull, os.O_RDONLY), seen) is None
    os.close(other)


def test_tokens_differ_even_within_one_clock_tick(paths):
    watch.want_watcher(paths)
    a = watch._read_want(paths)
    watch.want_watcher(paths)
    assert watch._read_want(paths) != a
