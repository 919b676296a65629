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


# A file whose mtime or ctime is this recent may change again within the
# same clock tick without its stat changing: the caches do not trust its
# stat alone (the config cache compares its content, the status-file cache
# does not keep it).
RACY_NS = 3_000_000_000


def read_trusted(path: str, limit: int) -> "bytes | None":
    """A file vnethook wrote (a cache), or None: missing, over `limit`
    bytes, or not to be trusted (distrust: a symlink, not a regular file,
    another owner, writable by others). Never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if distrust(st) or st.st_size > limit:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        return data if len(data) <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)


def distrust(st: os.stat_result, kind: str = "file") -> "str | None":
    """Why a state file or directory (from lstat) may not be trusted, or None.

    Records go into firewall batches and decide what is removed, so they
    are held to what the config is: owned by root (or whoever runs us), not
    writable by group or others, and no symlink (lstat sees the link).
    """
    fmt = st.st_mode & 0o170000
    want = 0o040000 if kind == "directory" else 0o100000
    if fmt != want:
        return "a symlink" if fmt == 0o120000 else f"not a regular {kind}"
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return "writable by " + {0o020: "group", 0o002: "others", 0o022: "group and others"}[st.st_mode & 0o022]
    return None
