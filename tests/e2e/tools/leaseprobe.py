"""Time how soon a forward answers after a guest's DHCP lease appears.

  leaseprobe.py LEASE_FILE MAC ADDR TCP_PORT UDP_PORT TIMEOUT

Run in the external client's netns (inside the sandbox's mount namespace,
so LEASE_FILE is libvirt's own dnsmasq status file). It polls LEASE_FILE
every 10 ms until an unexpired entry for MAC appears, then tries the TCP
and the UDP forward (ADDR:PORT) every 10 ms until each has answered, the
attempts overlapping (see Attempts). Before the forward exists the host
answers with a RST / ICMP port unreachable at once.

Prints one JSON object: the CLOCK_MONOTONIC times (seconds; the same
clock as the test process) of the start, of the lease's appearance and of
each forward's first answer, the lease entry and the replies. Exit 1 when
TIMEOUT seconds pass first.
"""

from __future__ import annotations

import json
import selectors
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


class Attempts:
    """Overlapping attempts on one forward, a new one every POLL, each from
    a fresh socket (a fresh source port: an attempt made before the forward
    existed has a conntrack entry that stays un-NATed, so it must never be
    reused). An attempt that reached a guest still configuring its address
    just stays unanswered while later ones go on; the first reply wins."""

    def __init__(self, proto: str, addr: str, port: int, sel: selectors.BaseSelector):
        self.proto, self.dest, self.sel = proto, (addr, port), sel
        self.count = 0
        self.answer = None

    def start(self) -> None:
        kind = socket.SOCK_STREAM if self.proto == "tcp" else socket.SOCK_DGRAM
        s = socket.socket(socket.AF_INET, kind)
        s.setblocking(False)
        self.count += 1
        try:
            if self.proto == "tcp":
                s.connect_ex(self.dest)
                self.sel.register(s, selectors.EVENT_WRITE, (self, "connecting", time.monotonic(), []))
            else:
                s.connect(self.dest)
                s.send(b"ping")
                self.sel.register(s, selectors.EVENT_READ, (self, "waiting", time.monotonic(), []))
        except OSError:
            s.close()

    def event(self, s: socket.socket, state: str, chunks: list) -> None:
        try:
            if state == "connecting":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, "connect")
                s.send(b"ping")
                self.sel.modify(s, selectors.EVENT_READ, (self, "waiting", time.monotonic(), chunks))
                return
            data = s.recv(65535)
            if self.proto == "tcp" and data:
                chunks.append(data)
                return
            reply = (b"".join(chunks) + data).decode("utf-8", "replace").strip()
            if reply and self.answer is None:
                self.answer = (time.monotonic(), reply)
        except OSError:
            pass
        self.sel.unregister(s)
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
    sel = selectors.DefaultSelector()
    probes = {p: Attempts(p, addr, port, sel) for p, port in ports.items()}
    next_start = 0.0
    while any(a.answer is None for a in probes.values()) and time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_start:
            for a in probes.values():
                if a.answer is None:
                    a.start()
            next_start = now + POLL
        for key, _ in sel.select(timeout=max(0.0, next_start - time.monotonic())):
            a, state, since, chunks = key.data
            a.event(key.fileobj, state, chunks)
        for key in list(sel.get_map().values()):  # give up on attempts older than 3 s
            if time.monotonic() - key.data[2] > 3:
                sel.unregister(key.fileobj)
                key.fileobj.close()
    for p, a in probes.items():
        if a.answer:
            out[f"t_{p}"], out[p] = a.answer
    out["attempts"] = {p: a.count for p, a in probes.items()}
    print(json.dumps(out))
    return 0 if all(f"t_{p}" in out for p in ports) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
