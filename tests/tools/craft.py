#!/usr/bin/python3
"""Send one crafted packet, as a neighbour or a guest could (scapy).

  craft.py IFACE DST_MAC SRC DST PROTO DPORT [COUNT]

Builds Ethernet/IP/TCP-SYN (or UDP with a payload) by hand and puts it on
IFACE with sendp, so no route, martian check or socket rule of the sender's
own kernel stands in the way: the receiver's firewall is what is tested.
"""

from __future__ import annotations

import sys


def main(argv):
    iface, dst_mac, src, dst, proto, dport = argv[:6]
    count = int(argv[6]) if len(argv) > 6 else 3
    import logging

    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
    from scapy.all import IP, IPv6, TCP, UDP, Ether, Raw, sendp  # noqa: PLC0415

    l3 = IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)
    l4 = TCP(sport=40000, dport=int(dport), flags="S", seq=1000) if proto == "tcp" else \
        UDP(sport=40000, dport=int(dport)) / Raw(b"crafted")
    sendp(Ether(dst=dst_mac) / l3 / l4, iface=iface, count=count, inter=0.05, verbose=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
