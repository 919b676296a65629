"""Time how soon a forward answers after a guest's DHCP lease appears.

  leaseprobe.py LEASE_FILE MAC ADDR TCP_PORT UDP_PORT TIMEOUT

Run in the external client's netns (inside the sandbox's mount namespace,
so LEASE_FILE is libvirt's own dnsmasq status file). It polls LEASE_FILE
every 10 ms until an unexpired entry for MAC appears, then tries the TCP
and the UDP forward (ADDR:PORT) every 10 ms until each has answered. Before
the forward exists the host answers with a RST / ICMP port unreachable, so
a failed attempt costs well under a millisecond, not a timeout.

Prints one JSON object: the CLOCK_MONOTONIC times (seconds; the same
clock as the test process) of the start, of the lease's appearance and of
each forward's first answer, the lease entry and the replies. Exit 1 when
TIMEOUT seconds pass first.
"""

from __future__ import annotations

import json
import socket
import sys
import time

POLL = 0.01


def lease_for(path: str, mac: str):
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.loads(f.read() or "[]")
    except (FileNotFoundError, ValueError):
        return None
    now = time.time()
    for e in entries:
        exp = e.get("expiry-time", 0)
        if e.get("mac-address", "").lower() == mac and (exp == 0 or exp > now):
            return e
    return None


def attempt(proto: str, addr: str, port: int):
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    s.settimeout(0.3)
    try:
        s.connect((addr, port))
        if proto == "tcp":
            s.sendall(b"ping")
            chunks = []
            while True:
                b = s.recv(65535)
                if not b:
                    break
                chunks.append(b)
            data = b"".join(chunks)
        else:
            s.send(b"ping")
            data = s.recv(65535)
        return data.decode("utf-8", "replace").strip() or None
    except OSError:
        return None
    finally:
        s.close()


def main(argv) -> int:
    path, mac, addr = argv[0], argv[1].lower(), argv[2]
    ports = {"tcp": int(argv[3]), "udp": int(argv[4])}
    deadline = time.monotonic() + float(argv[5])
    out = {"t_start": time.monotonic()}
    while True:
        lease = lease_for(path, mac)
        if lease:
            out["t_lease"], out["lease"] = time.monotonic(), lease
            break
        if time.monotonic() > deadline:
            print(json.dumps(out))
            return 1
        time.sleep(POLL)
    attempts = {"tcp": 0, "udp": 0}
    while any(f"t_{p}" not in out for p in ports):
        for proto, port in ports.items():
            if f"t_{proto}" in out:
                continue
            attempts[proto] += 1
            data = attempt(proto, addr, port)
            if data:
                out[f"t_{proto}"], out[proto] = time.monotonic(), data
        if time.monotonic() > deadline:
            break
        time.sleep(POLL)
    out["attempts"] = attempts
    print(json.dumps(out))
    return 0 if all(f"t_{p}" in out for p in ports) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
