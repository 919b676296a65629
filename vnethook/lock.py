"""One lock for every change vnethook makes.

libvirt starts several guests at once and runs their hooks concurrently;
sync and the lease waiter run on their own. Each read-modify-write of a
guest's record and rules happens under this lock, so no update is lost.
The firewall tools take their own xtables lock as well (-w).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time


class LockTimeout(Exception):
    pass


DEFAULT_TIMEOUT = 120.0


def default_timeout() -> float:
    """VNETHOOK_LOCK_TIMEOUT (seconds) or 120. A hook that cannot get the
    lock in time gives up without failing the event; a removal stays
    pending and is retried (state.mark_removal)."""
    try:
        t = float(os.environ.get("VNETHOOK_LOCK_TIMEOUT") or DEFAULT_TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT
    return t if t > 0 else DEFAULT_TIMEOUT


def acquire(fd: int, timeout: float) -> bool:
    """An exclusive flock on `fd`, waiting up to `timeout` seconds (0: one
    try). False when it timed out; other errors raise. The one wait loop
    for vnethook's lock, the watcher's and the xtables lock: a blocking
    flock could not be bounded without a signal."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EINTR):
                raise
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.05)


class Lock:
    def __init__(self, path: str, timeout: "float | None" = None):
        self.path = path
        self.timeout = default_timeout() if timeout is None else timeout
        self.fd = -1

    def __enter__(self) -> "Lock":
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if acquire(self.fd, self.timeout):
                return self
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        os.close(self.fd)
        self.fd = -1
        raise LockTimeout(f"could not take {self.path} within {self.timeout:.0f}s")

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing releases the flock
            self.fd = -1
