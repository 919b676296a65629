"""One way to replace a file: write a temp file beside it, then rename.

Hooks run concurrently and can be killed at any point, so every file
vnethook writes (records, caches, hooks) must be seen either whole-old or
whole-new, never torn. Only `os`: the hook's hot path uses this.
"""

from __future__ import annotations

import os


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp)  # left by a killed run with our pid, long ago
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # not narrowed by the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise
