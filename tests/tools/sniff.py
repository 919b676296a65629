#!/usr/bin/python3
"""Record what arrives on one interface: the guest side of attack tests.

  sniff.py IFACE OUTFILE

Opens an AF_PACKET socket on IFACE (inside whatever netns it runs in),
prints READY, then appends one JSON line per IPv4/IPv6 TCP or UDP packet
received: {"src", "dst", "proto", "sport", "dport", "flags"}. Runs until
killed. Outgoing packets are left out: the test asks what reached the guest.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import sys

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def parse(frame: bytes):
    if len(frame) < 14:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    off = 14
    if ethertype == 0x0800 and len(frame) >= off + 20:
        ihl = (frame[off] & 0x0F) * 4
        proto = frame[off + 9]
        src = str(ipaddress.IPv4Address(frame[off + 12:off + 16]))
        dst = str(ipaddress.IPv4Address(frame[off + 16:off + 20]))
        l4 = off + ihl
    elif ethertype == 0x86DD and len(frame) >= off + 40:
        proto = frame[off + 6]
        src = str(ipaddress.IPv6Address(frame[off + 8:off + 24]))
        dst = str(ipaddress.IPv6Address(frame[off + 24:off + 40]))
        l4 = off + 40
    else:
        return None
    if proto not in (6, 17) or len(frame) < l4 + 4:
        return None
    sport, dport = struct.unpack_from("!HH", frame, l4)
    flags = frame[l4 + 13] if proto == 6 and len(frame) > l4 + 13 else 0
    return {"src": src, "dst": dst, "proto": "tcp" if proto == 6 else "udp",
            "sport": sport, "dport": dport, "flags": flags}


def main(argv):
    iface, outfile = argv
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    with open(outfile, "a", buffering=1) as out:
        print("READY", flush=True)
        while True:
            frame, addr = s.recvfrom(65536)
            if addr[2] == PACKET_OUTGOING:
                continue
            p = parse(frame)
            if p is not None:
                out.write(json.dumps(p) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
