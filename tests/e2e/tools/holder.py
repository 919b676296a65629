"""The process that holds an e2e sandbox's namespaces open.

Started as `unshare --mount --net --fork python3 holder.py`. It prints its
pid and then waits for its stdin to close. The test process keeps that pipe
open, so if pytest dies (crash, kill -9, timeout), the pipe closes and this
dead-man switch kills every process still in the sandbox: nothing the tests
started (libvirtd, dnsmasq, qemu, servers) outlives them on the host.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _ns(pid: str, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def sweep(me: int) -> int:
    """Kill every other process sharing our mount or network namespace."""
    mnt, net = _ns("self", "mnt"), _ns("self", "net")
    killed = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in (me, os.getppid()):
            continue
        if _ns(pid, "mnt") == mnt or _ns(pid, "net") == net:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def main() -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(os.getpid(), flush=True)
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    me = os.getpid()
    for _ in range(50):
        if not sweep(me):
            break
        time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
