"""Waiting for a change in a few directories (Linux inotify, via libc).

The lease watcher used to look at the lease files' stamps every 250 ms;
most of the time from a lease to its forward was that sleep. libvirt's
leases helper replaces `<bridge>.status` by a rename, so one inotify watch
on the directory wakes the watcher as the lease lands. The stdlib has no
inotify; the three libc calls are small enough to call through ctypes.
Anything unusual (no libc symbol, the directory missing, the watch limit
reached) leaves `wait` sleeping its timeout, so callers keep polling.
"""

from __future__ import annotations

import os
import select
import struct

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Dict, Iterable, Optional

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

# A file written, or renamed or deleted in place: what a lease update does.
CHANGES = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


def parse_events(buf: bytes) -> "list[tuple[int, int, bytes]]":
    """(wd, mask, name) for each whole event in `buf`; a truncated tail is
    dropped rather than read past the end."""
    out = []
    off = 0
    while off + _EVENT.size <= len(buf):
        wd, mask, _cookie, n = _EVENT.unpack_from(buf, off)
        end = off + _EVENT.size + n
        if end > len(buf):
            break
        out.append((wd, mask, buf[off + _EVENT.size:end].rstrip(b"\0")))
        off = end
    return out


class DirWatch:
    """inotify watches on directories that may come and go."""

    def __init__(self, dirs: "Iterable[str]", mask: int = CHANGES):
        self.dirs = list(dirs)
        self.mask = mask
        self.fd: "Optional[int]" = None
        self._wds: "Dict[int, str]" = {}
        self._add_watch = None
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            init1 = libc.inotify_init1
            self._add_watch = libc.inotify_add_watch
            self._add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
            fd = init1(IN_NONBLOCK | IN_CLOEXEC)
        except (OSError, AttributeError, ImportError):
            return
        if fd >= 0:
            self.fd = fd
            self.rearm()

    @property
    def complete(self) -> bool:
        """Every directory is watched: no need to poll."""
        return self.fd is not None and len(self._wds) == len(self.dirs)

    def rearm(self) -> None:
        """Watch the directories that exist now and were not watched yet."""
        if self.fd is None or self._add_watch is None:
            return
        watched = set(self._wds.values())
        for d in self.dirs:
            if d in watched:
                continue
            wd = self._add_watch(self.fd, os.fsencode(d), self.mask | IN_ONLYDIR)
            if wd >= 0:
                self._wds[wd] = d

    def wait(self, timeout: float) -> bool:
        """Sleep until a change or `timeout` seconds; True on a change."""
        timeout = max(0.0, timeout)
        if self.fd is None:
            select.select([], [], [], timeout)
            return False
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return False
        changed = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not buf:
                break
            for wd, mask, _name in parse_events(buf):
                changed = True
                if mask & IN_IGNORED:  # the directory went; rearm adds it back when it returns
                    self._wds.pop(wd, None)
        return changed

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self._wds.clear()
