"""Forwards that would take a port the host itself listens on."""

from __future__ import annotations

import socket

from forward_factory import fwd

from vnethook.listeners import host_listeners, parse, taken

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 016433C6:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 0A0200C0:A1B2 0B0200C0:0050 01 00000000:00000000 00:00000000 00000000     0        0 4 1
"""
TCP6 = """  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:0CEA 00000000000000000000000000000000:0000 0A 0
   1: 0000000000000000FFFF00000100007F:0050 00000000000000000000000000000000:0000 0A 0
"""


def test_parse_reads_listeners_and_skips_connections():
    assert parse(TCP, "tcp") == [("tcp", None, 22), ("tcp", "127.0.0.1", 5432), ("tcp", "198.51.100.1", 8080)]
    assert parse(TCP6, "tcp") == [("tcp", "::1", 3306), ("tcp", "127.0.0.1", 80)]


def test_wildcard_forward_of_a_listened_port_is_named_with_its_origin():
    ls = set(parse(TCP, "tcp"))
    w = taken([fwd(host_ports=(20, 30), guest_ports=(20, 30), origin="ports.yaml:7")], ls)
    assert len(w) == 1 and w[0].startswith("ports.yaml:7: warning:") and "*:22/tcp" in w[0]
    # Loopback listeners are not matched by a wildcard forward (it never DNATs 127/8).
    assert taken([fwd(host_ports=(5432, 5432), guest_ports=(5432, 5432))], ls) == []
    # Another protocol, another port: nothing.
    assert taken([fwd(protocol="udp", host_ports=(22, 22), guest_ports=(22, 22))], ls) == []


def test_bound_forwards_match_their_address_or_the_wildcard():
    ls = set(parse(TCP, "tcp"))
    assert taken([fwd(host_address="127.0.0.1", host_ports=(5432, 5432), guest_ports=(5432, 5432))], ls)
    assert taken([fwd(host_address="198.51.100.1", host_ports=(8080, 8080))], ls)
    assert taken([fwd(host_address="198.51.100.2", host_ports=(8080, 8080))], ls) == []
    assert taken([fwd(host_address="198.51.100.2", host_ports=(22, 22), guest_ports=(22, 22))], ls)


def test_a_real_socket_is_seen():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        port = s.getsockname()[1]
        assert ("tcp", "127.0.0.1", port) in host_listeners()
    finally:
        s.close()
