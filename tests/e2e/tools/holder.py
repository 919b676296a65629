"""The process that holds an e2e sandbox's namespaces open.

Started as `unshare --mount --net --fork python3 holder.py`. It prints its
pid and then waits for its stdin to close. The test process keeps that pipe
open, so if pytest dies (crash, kill -9, timeout), the pipe closes and this
dead-man switch kills every process still in the sandbox: nothing the tests
started (libvirtd, dnsmasq, qemu, servers) outlives them on the host.

A line `chroot DIR` on stdin makes it chroot into DIR (answered `chrooted`):
commands then enter the sandbox with `nsenter --root`, so that a second
libvirt installed in DIR runs as on its own host (libvirt_root.py).
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


def sweep(me: int, mnt: str | None, net: str | None) -> int:
    """Kill every other process sharing our mount or network namespace."""
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
    mnt, net = _ns("self", "mnt"), _ns("self", "net")
    print(os.getpid(), flush=True)
    try:
        for line in sys.stdin.buffer:
            if line.startswith(b"chroot "):
                os.chroot(line[7:].rstrip(b"\n"))
                os.chdir("/")
                print("chrooted", flush=True)
    except OSError:
        pass
    me = os.getpid()
    for _ in range(50):
        if not sweep(me, mnt, net):
            break
        time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
