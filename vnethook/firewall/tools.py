"""Running a firewall tool (iptables-*-restore, nft) on a batch, the hook's way.

Only stdlib builtins at import: the hooks import this.
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List

import os

from vnethook.firewall.base import FirewallError

_SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


def find_tool(name: str, package: str = "iptables") -> str:
    """Absolute path of a firewall tool; hooks may run with a minimal PATH."""
    path = os.environ.get("PATH", "")
    for d in (f"{path}:{_SBIN}" if path else _SBIN).split(":"):
        if d:
            cand = os.path.join(d, name)
            if os.access(cand, os.X_OK) and not os.path.isdir(cand):
                return cand
    raise FirewallError(f"{name} not found (install {package or name})")


MARK = "# vnethook-step "
_unreaped: List[int] = []


def run_tool(argv: List[str], data: bytes = b"", timeout: float = 60.0,
             marks: int = 0) -> "tuple[int | None, str, str, int]":
    """Run a tool with `data` on stdin: (exit status, stdout, stderr, marks seen).

    posix_spawn instead of subprocess, whose import costs more than a
    restore run itself. stdin and stderr are memfds (a
    batch of any size, no write that blocks on a child that stopped
    reading); stdout is a pipe.

    `marks`: the batch holds that many `# vnethook-step N` comment lines,
    which `*-restore -v` echoes once every COMMIT before them went through.
    When all are seen, or the output ends after at least one, the tool is
    not waited for (status None; it is reaped later). Why: a process that
    closes its nfnetlink socket while deleted rules await their RCU grace
    period blocks in close() until it ends (the kernel flushes its destroy
    work on NETLINK_URELEASE), once per commit round, paid by every run
    that deletes anything. The changes are committed by then, so
    nothing needs that wait. A tool that does not echo is waited for.
    """
    import select

    while _unreaped:  # earlier tools that were not waited for
        try:
            if os.waitpid(_unreaped[0], os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            pass
        _unreaped.pop(0)
    fd_in = os.memfd_create("vnethook-in", os.MFD_CLOEXEC)
    fd_err = os.memfd_create("vnethook-err", os.MFD_CLOEXEC)
    r = -1
    seen = 0
    status = None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd_in, view):]
        os.lseek(fd_in, 0, os.SEEK_SET)
        r, w = os.pipe()
        try:
            pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=[
                (os.POSIX_SPAWN_DUP2, fd_in, 0),
                (os.POSIX_SPAWN_DUP2, w, 1),
                (os.POSIX_SPAWN_DUP2, fd_err, 2),
            ])
        except OSError as e:
            raise FirewallError(f"{argv[0]}: {e.strerror or e}") from None
        finally:
            os.close(w)
        chunks = []
        deadline = _monotonic() + timeout
        poller = select.poll()
        poller.register(r, select.POLLIN)
        tail = b""
        while True:
            left = deadline - _monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise FirewallError(f"{argv[0]}: no answer within {timeout:.0f}s")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            if marks:
                lines = (tail + chunk).split(b"\n")
                tail = lines.pop()
                seen += sum(1 for ln in lines if ln.startswith(MARK.encode()))
                if seen >= marks:
                    break
        if marks and seen:
            _unreaped.append(pid)
        else:
            _, st = os.waitpid(pid, 0)
            status = os.waitstatus_to_exitcode(st)
        os.lseek(fd_err, 0, os.SEEK_SET)
        err = []
        while True:
            chunk = os.read(fd_err, 1 << 16)
            if not chunk:
                break
            err.append(chunk)
    finally:
        os.close(fd_in)
        os.close(fd_err)
        if r >= 0:
            os.close(r)
    out = b"".join(chunks).decode("utf-8", "replace")
    return status, out, b"".join(err).decode("utf-8", "replace"), seen


def _monotonic() -> float:
    import time

    return time.monotonic()
