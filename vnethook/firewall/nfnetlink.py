"""One nf_tables question asked over netlink directly: how used is a chain?

Why: removing a guest must also drop vnethook's base once the last guest
is gone. Trying the teardown and letting it fail costs a restore run that
waits for the removal's RCU grace period (5-25 ms), and listing the table
costs O(guests). The kernel already counts, per chain, its rules plus the
jumps to it (NFTA_CHAIN_USE), and answers one GETCHAIN request in O(1).

Only stdlib builtins (_socket, _struct): the hook path imports this.
"""

from __future__ import annotations

import os


AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER = 16, 3, 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN = 3, 4
NLM_F_REQUEST = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_USE = 1, 3, 6
FAMILY = {4: 2, 6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6


def _attr(kind: int, value: bytes) -> bytes:
    import _struct

    data = _struct.pack("=HH", 4 + len(value), kind) + value
    return data + b"\0" * (-len(data) % 4)


def chain_use(family: int, table: str, chain: str, timeout: float = 2.0) -> "int | None":
    """Rules in `chain` plus jumps to it, or None if the kernel did not say."""
    import _socket
    import _struct

    try:
        sock = _socket.socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER)
    except OSError:
        return None
    try:
        sock.settimeout(timeout)
        seq = os.getpid() & 0x7FFFFFFF
        body = _struct.pack("=BBH", FAMILY[family], 0, 0)
        body += _attr(NFTA_CHAIN_TABLE, table.encode() + b"\0")
        body += _attr(NFTA_CHAIN_NAME, chain.encode() + b"\0")
        msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN
        sock.sendto(_struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST, seq, 0) + body,
                    (0, 0))
        data = sock.recv(65536)
    except OSError:
        return None
    finally:
        sock.close()
    if len(data) < 20:
        return None
    length, kind, _, rseq, _ = _struct.unpack_from("=IHHII", data)
    if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN or rseq != seq:  # GET answers as NEW
        return None
    off = 16 + 4  # nlmsghdr + nfgenmsg
    end = min(length, len(data))
    while off + 4 <= end:
        alen, akind = _struct.unpack_from("=HH", data, off)
        if alen < 4:
            return None
        if akind & 0x3FFF == NFTA_CHAIN_USE and alen >= 8:
            return _struct.unpack_from("!I", data, off + 4)[0]
        off += (alen + 3) & ~3
    return None


NFT_MSG_NEWRULE, NFT_MSG_GETRULE = 6, 7
NLM_F_DUMP = 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN = 1, 2


def chain_rules(family: int, table: str, chain: str, timeout: float = 2.0) -> "list | None":
    """The raw netlink messages of one chain's rules, in chain order; None if unknown.

    A dump filtered to one chain: the kernel walks that chain only, where
    `iptables -C` (or -D) first fetches every rule of the table.
    """
    import _socket
    import _struct

    try:
        sock = _socket.socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER)
    except OSError:
        return None
    out = []
    try:
        sock.settimeout(timeout)
        seq = (os.getpid() + 1) & 0x7FFFFFFF
        body = _struct.pack("=BBH", FAMILY[family], 0, 0)
        body += _attr(NFTA_RULE_TABLE, table.encode() + b"\0")
        body += _attr(NFTA_RULE_CHAIN, chain.encode() + b"\0")
        msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE
        sock.sendto(_struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                    + body, (0, 0))
        while True:
            data = sock.recv(1 << 17)
            off = 0
            while off + 16 <= len(data):
                length, kind, _, rseq, _ = _struct.unpack_from("=IHHII", data, off)
                if length < 16 or rseq != seq:
                    return None
                if kind == NLMSG_DONE:
                    return out
                if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE:
                    return None  # NLMSG_ERROR: no such table or chain
                out.append(data[off + 16:off + length])
                off += (length + 3) & ~3
            if not data:
                return None
    except OSError:
        return None
    finally:
        sock.close()
