"""nfnetlink's reply parsing: every malformed or interrupted reply is "not
known" (None), never a half answer and never an exception.

Crafted byte strings, as the kernel frames them (nlmsghdr: length, type,
flags, seq, pid; 4-byte aligned). The kernel paths themselves are checked
against a real kernel in test_iptables_layout.py.
"""

from __future__ import annotations

import struct

from vnethook.firewall import nfnetlink as nl

NEWRULE = (nl.NFNL_SUBSYS_NFTABLES << 8) | nl.NFT_MSG_NEWRULE


def msg(kind: int, seq: int, body: bytes = b"", flags: int = 0) -> bytes:
    m = struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body
    return m + b"\0" * (-len(m) % 4)


def test_whole_messages_are_listed_in_order():
    data = msg(NEWRULE, 7, b"\0" * 6) + msg(NEWRULE, 7, b"\0" * 8) + msg(nl.NLMSG_DONE, 7, b"\0" * 4)
    got = nl.headers(data, 7)
    assert [(length, kind) for _, length, kind, _ in got] == [(22, NEWRULE), (24, NEWRULE), (20, nl.NLMSG_DONE)]
    assert [off for off, *_ in got] == [0, 24, 48]


def test_anything_off_is_not_known():
    good = msg(NEWRULE, 7, b"\0" * 8)
    assert nl.headers(good, 8) is None  # another request's reply
    assert nl.headers(good[:-4], 7) is None  # length runs past the chunk
    assert nl.headers(good + b"\0" * 8, 7) is None  # trailing bytes, not a message
    assert nl.headers(struct.pack("=IHHII", 8, NEWRULE, 0, 7, 0), 7) is None  # shorter than a header
    interrupted = msg(NEWRULE, 7, b"\0" * 8, flags=nl.NLM_F_DUMP_INTR)
    assert nl.headers(good + interrupted, 7) is None
    assert nl.headers(b"", 7) == []


def test_any_seq_when_asked_for_none():
    data = msg(nl.NLMSG_ERROR, 3, b"\0" * 4) + msg(nl.NLMSG_ERROR, 9, b"\0" * 4)
    assert len(nl.headers(data, None)) == 2


def test_attributes_never_read_past_their_message():
    attr = struct.pack("=HH", 12, nl.NFTA_RULE_HANDLE) + struct.pack("!Q", 42)
    assert nl._attrs(attr) == [(nl.NFTA_RULE_HANDLE, struct.pack("!Q", 42))]
    assert nl._attrs(attr[:-2]) is None
    assert nl._attrs(struct.pack("=HH", 2, 1)) is None
    # a jump_handle on garbage is "not ours", not an exception
    for junk in (b"", b"\0" * 3, b"\xff" * 40, attr, b"\0\0\0\0" + attr[:-1]):
        assert nl.jump_handle(junk, "VNETHOOK-X", "vnethook:x") is None
