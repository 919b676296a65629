"""Tiny TCP/UDP server and client for e2e tests, run inside a namespace.

Tests need real packets through real rules, and they need to see what the
far end saw (which source address a connection arrived from proves whether
it was masqueraded). So the server logs each peer as a JSON line and
answers with a fixed reply; the client prints what came back.

  netpeer.py serve tcp|udp PORT REPLY LOGFILE [BIND]   prints "ready" when listening
  netpeer.py connect tcp|udp ADDR PORT PAYLOAD [TIMEOUT] [SOURCE]

Exit status of `connect`: 0 reply printed, 2 refused/reset, 3 timeout, 4 other error.
"""

from __future__ import annotations

import json
import socket
import sys
import threading


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _log(logfile: str, lock: threading.Lock, proto: str, peer, data: bytes) -> None:
    with lock, open(logfile, "a", encoding="utf-8") as f:
        f.write(json.dumps({"proto": proto, "peer": peer[0], "port": peer[1],
                            "data": data.decode("utf-8", "replace")}) + "\n")


def serve(proto: str, port: int, reply: bytes, logfile: str, bind: str = "::") -> None:
    lock = threading.Lock()
    fam = _family(bind)
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(fam, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((bind, port))
    if proto == "tcp":
        s.listen(64)
    print("ready", flush=True)
    if proto == "udp":
        while True:
            data, peer = s.recvfrom(65535)
            _log(logfile, lock, proto, _peer(peer), data)
            s.sendto(reply, peer)

    def handle(c: socket.socket, peer) -> None:
        with c:
            c.settimeout(5)
            try:
                data = c.recv(65535)
            except OSError:
                data = b""
            _log(logfile, lock, proto, _peer(peer), data)
            try:
                c.sendall(reply)
            except OSError:
                pass

    while True:
        c, peer = s.accept()
        threading.Thread(target=handle, args=(c, peer), daemon=True).start()


def _peer(peer):
    host = peer[0]
    if host.startswith("::ffff:"):
        host = host[7:]
    return (host, peer[1])


def connect(proto: str, addr: str, port: int, payload: bytes, timeout: float,
            source: str | None) -> int:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(_family(addr), kind)
    s.settimeout(timeout)
    try:
        if source:
            s.bind((source, 0))
        if proto == "tcp":
            s.connect((addr, port))
            s.sendall(payload)
            chunks = []
            while True:
                b = s.recv(65535)
                if not b:
                    break
                chunks.append(b)
            data = b"".join(chunks)
        else:
            s.sendto(payload, (addr, port))
            data, _ = s.recvfrom(65535)
    except (ConnectionRefusedError, ConnectionResetError) as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    except socket.timeout:
        print("timeout", file=sys.stderr)
        return 3
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    sys.stdout.write(data.decode("utf-8", "replace"))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(argv[1], int(argv[2]), argv[3].encode(), argv[4], argv[5] if len(argv) > 5 else "::")
        return 0
    if argv[:1] == ["connect"]:
        timeout = float(argv[5]) if len(argv) > 5 else 3.0
        source = argv[6] if len(argv) > 6 else None
        return connect(argv[1], argv[2], int(argv[3]), argv[4].encode(), timeout, source)
    print(__doc__, file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
