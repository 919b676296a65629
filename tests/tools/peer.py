#!/usr/bin/python3
"""A tiny TCP/UDP echo peer for acceptance tests, run inside a netns.

serve: listen on the given ports (IPv4 and IPv6), answer every message with
  "<name> <local port> <peer address>" so a test knows WHICH peer answered,
  on which port, and whom it saw as the client (masquerade or not).
  Prints "READY" once all sockets are bound.
connect: send one message, print the answer. Exit 0 with the answer, or
  exit 1 with REFUSED / TIMEOUT / UNREACHABLE / ERROR <text>.

Stdlib only, no threads; every wait has a timeout so a test never hangs.
"""

from __future__ import annotations

import argparse
import errno
import selectors
import socket
import sys


def parse_ports(text: str):
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def _socktype(proto: str):
    if proto == "udp":
        return socket.SOCK_DGRAM, 0
    if proto == "sctp":
        return socket.SOCK_STREAM, socket.IPPROTO_SCTP
    return socket.SOCK_STREAM, 0


def serve(args) -> int:
    sel = selectors.DefaultSelector()
    socks = []
    for port in parse_ports(args.ports):
        for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            if args.family and {4: socket.AF_INET, 6: socket.AF_INET6}[args.family] != fam:
                continue
            typ, ipproto = _socktype(args.proto)
            s = socket.socket(fam, typ, ipproto)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((args.bind4 if fam == socket.AF_INET and args.bind4 else addr, port))
            except OSError as e:
                if fam == socket.AF_INET6 and e.errno == errno.EADDRNOTAVAIL:
                    s.close()
                    continue
                raise
            if typ == socket.SOCK_STREAM:
                s.listen(64)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, ("listen" if typ == socket.SOCK_STREAM else "udp", port))
            socks.append(s)
    print("READY", flush=True)
    while True:
        for key, _ in sel.select(timeout=args.lifetime):
            s = key.fileobj
            kind, port = key.data
            if kind == "udp":
                data, peer = s.recvfrom(65535)
                s.sendto(f"{args.name} {port} {peer[0]}\n".encode(), peer)
            elif kind == "listen":
                try:
                    c, peer = s.accept()
                except BlockingIOError:
                    continue
                c.settimeout(2)
                try:
                    c.recv(4096)
                    c.sendall(f"{args.name} {port} {peer[0]}\n".encode())
                except OSError:
                    pass
                finally:
                    c.close()


def connect(args) -> int:
    fam = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    typ, ipproto = _socktype(args.proto)
    s = socket.socket(fam, typ, ipproto)
    s.settimeout(args.timeout)
    try:
        if args.source:
            s.bind((args.source, 0))
        s.connect((args.addr, args.port))
        s.sendall(b"hello\n")
        data = s.recv(4096)
        if not data:
            print("ERROR closed")
            return 1
        print(data.decode().strip())
        return 0
    except ConnectionRefusedError:
        print("REFUSED")
    except socket.timeout:
        print("TIMEOUT")
    except OSError as e:
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            print("UNREACHABLE")
        elif e.errno == errno.ECONNRESET:
            print("REFUSED")
        else:
            print(f"ERROR {e}")
    finally:
        s.close()
    return 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--proto", choices=("tcp", "udp", "sctp"), default="tcp")
    s.add_argument("--ports", required=True, help="e.g. 80 or 40000-40009 or 80,443")
    s.add_argument("--name", required=True)
    s.add_argument("--family", type=int, choices=(4, 6))
    s.add_argument("--bind4", help="IPv4 address to bind (default any)")
    s.add_argument("--lifetime", type=float, default=600.0,
                   help="exit after this many idle seconds (a safety net)")
    c = sub.add_parser("connect")
    c.add_argument("--proto", choices=("tcp", "udp", "sctp"), default="tcp")
    c.add_argument("--addr", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--source")
    c.add_argument("--timeout", type=float, default=2.0)
    args = ap.parse_args(argv)
    return serve(args) if args.cmd == "serve" else connect(args)


if __name__ == "__main__":
    sys.exit(main())
