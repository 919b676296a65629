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


class Lock:
    def __init__(self, path: str, timeout: "float | None" = None):
        self.path = path
        self.timeout = default_timeout() if timeout is None else timeout
        self.fd = -1

    def __enter__(self) -> "Lock":
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.timeout
        delay = 0.002
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                os.close(self.fd)
                self.fd = -1
                raise LockTimeout(f"could not take {self.path} within {self.timeout:.0f}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing releases the flock
            self.fd = -1
