"""Probe a TCP forward every INTERVAL seconds and log each result.

  probe.py ADDR PORT INTERVAL LOGFILE

Each probe connects, sends "ping" and waits for a reply (0.2 s at most);
one line per probe: "<CLOCK_MONOTONIC seconds> 1|0". Runs until killed.
Used by the firewalld e2e test to measure how long a forward is down.
"""

import socket
import sys
import time


def once(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=0.2) as s:
            s.sendall(b"ping")
            return bool(s.recv(100))
    except OSError:
        return False


def main() -> None:
    addr, port, interval, logfile = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    with open(logfile, "a", buffering=1, encoding="ascii") as f:
        print("ready", flush=True)
        nxt = time.monotonic()
        while True:
            t = time.monotonic()
            ok = once(addr, port)
            f.write(f"{t:.4f} {int(ok)}\n")
            nxt += interval
            time.sleep(max(0.0, nxt - time.monotonic()))


if __name__ == "__main__":
    main()
