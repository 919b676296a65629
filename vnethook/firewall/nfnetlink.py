"""nf_tables over raw netlink: the few requests a benchmark showed worth their code.

- How used is a chain (NFTA_CHAIN_USE: its rules plus the jumps to it, in
  O(1) per GETCHAIN), which rules one chain holds (a dump filtered to that
  chain), whether a table exists, and the keys of one set's elements.
- Commit a batch of messages as one transaction (transaction()): the
  nftables backend's element additions and deletions, its teardown, and
  iptables-nft's removal of a guest's jumps (by handle, checked to be
  exactly ours) and chains (delete_batch).

Why: these are what every hook event asks or changes. Going through a
tool instead (iptables-nft-restore fetching its cache, libnftables and its
Python binding parsing JSON) cost more than the targets allow: README,
Performance, "Hand-written protocol code, measured". Every parser here
checks lengths and bounds and treats an interrupted dump (NLM_F_DUMP_INTR)
or anything unexpected as "unknown", which sends the caller the slow,
listing way.

Only stdlib builtins (_socket, _struct, _thread): the hook path imports this.
"""

from __future__ import annotations

import os

AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER = 16, 3, 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN = 3, 4
NLM_F_REQUEST = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_USE = 1, 3, 6
FAMILY = {4: 2, 6: 10, "ip": 2, "ip6": 10, "inet": 1}  # NFPROTO_*
_query_sock: list = []
_seq = [0]


def attr(kind: int, value: bytes) -> bytes:
    import _struct

    data = _struct.pack("=HH", 4 + len(value), kind) + value
    return data + b"\0" * (-len(data) % 4)


def _query_socket():
    """The process's one nfnetlink socket (GET requests and delete_batch),
    created on first use.

    Reused, never closed by us: closing an nfnetlink socket after a commit
    that deleted rules waits for their RCU grace period (see
    hold_past_exit), and the last guest's stop asks its questions right
    after its deletions. A request that went wrong drops it (_drop_query).
    """
    if not _query_sock:
        import _socket

        sock = _socket.socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER)
        _query_sock.append(sock)
        hold_past_exit(sock)
    return _query_sock[0]


def _drop_query() -> None:
    """Never reuse a socket whose state is unknown (a stale answer may wait in it)."""
    if _query_sock:
        _query_sock.pop().close()


def _next_seq() -> int:
    if not _seq[0]:
        _seq[0] = (os.getpid() << 8) & 0x3FFFFFFF or 1
    _seq[0] += 1
    return _seq[0]


def _ask(kind: int, family: "int | str", names: "list", dump: bool = False, timeout: float = 2.0):
    """Send one GET request on the query socket; yield (data, offset,
    length, type) of each answer message, until a single answer, a dump's
    NLMSG_DONE or an error ends it. The socket is dropped unless its
    answer was read to the end; a malformed or foreign answer ends the
    iteration early (the caller's "unknown")."""
    import _struct

    try:
        sock = _query_socket()
        sock.settimeout(timeout)
    except OSError:
        return
    seq = _next_seq()
    body = _struct.pack("=BBH", FAMILY[family], 0, 0)
    body += b"".join(attr(k, v.encode() + b"\0") for k, v in names)
    flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
    clean = False
    try:
        sock.sendto(_struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, 0)
                    + body, (0, 0))
        while True:
            data = sock.recv(1 << 17)
            msgs = headers(data, seq)
            if not data or not msgs:
                return
            for off, length, mtype, _ in msgs:
                last = not dump or mtype in (NLMSG_DONE, NLMSG_ERROR)
                if last:
                    clean = off + length >= len(data)
                yield data, off, length, mtype
                if last:
                    return
    except OSError:
        return
    finally:
        if not clean:
            _drop_query()


def chain_use(family: "int | str", table: str, chain: str, timeout: float = 2.0) -> "int | None":
    """Rules in `chain` plus jumps to it, or None if the kernel did not say."""
    import _struct

    for data, off, length, kind in _ask(NFT_MSG_GETCHAIN, family,
                                        [(NFTA_CHAIN_TABLE, table), (NFTA_CHAIN_NAME, chain)], timeout=timeout):
        if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN:  # GET answers as NEW
            return None
        for akind, value in _attrs(data[off + 20:off + length]) or ():
            if akind == NFTA_CHAIN_USE and len(value) >= 4:
                return _struct.unpack_from("!I", value)[0]
    return None


NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE = 0, 1
NFTA_TABLE_NAME = 1


def table_exists(family: "int | str", table: str, timeout: float = 2.0) -> "bool | None":
    """Whether nf_tables has table `table` in `family` (ip/ip6); None if unknown.

    One GETTABLE request: `nft list tables` through libnftables fetches
    every table's chains, rules and sets first (nftables 1.0.x).
    """
    import _struct

    for data, off, length, kind in _ask(NFT_MSG_GETTABLE, family, [(NFTA_TABLE_NAME, table)], timeout=timeout):
        if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE:
            return True
        if kind == NLMSG_ERROR and length >= 20:
            return False if _struct.unpack_from("=i", data, off + 16)[0] == -2 else None  # -ENOENT
    return None


NFT_MSG_NEWRULE, NFT_MSG_GETRULE = 6, 7
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN = 1, 2


def headers(data: bytes, seq: "int | None") -> "list | None":
    """(offset, length, type, flags) of each netlink message in one received
    chunk, or None if anything is off: a length shorter than a header or
    running past the chunk, a reply to another request (`seq`; None: any),
    or a dump the kernel marks interrupted (NLM_F_DUMP_INTR: the ruleset
    changed while it was being dumped, so rules may be missing or repeated).
    Callers treat None as "not known" and take the slow, listing way."""
    import _struct

    out = []
    off, end = 0, len(data)
    while off + 16 <= end:
        length, kind, flags, rseq, _ = _struct.unpack_from("=IHHII", data, off)
        if length < 16 or off + length > end or (seq is not None and rseq != seq) \
                or flags & NLM_F_DUMP_INTR:
            return None
        out.append((off, length, kind, flags))
        off += (length + 3) & ~3
    if off < end:
        return None  # trailing bytes that are not a whole message
    return out


def chain_rules(family: "int | str", table: str, chain: str, timeout: float = 2.0) -> "list | None":
    """The raw netlink messages of one chain's rules, in chain order; None if unknown.

    A dump filtered to one chain: the kernel walks that chain only, where
    `iptables -C` (or -D) first fetches every rule of the table. A chain
    that does not exist is None: older kernels answer its dump with ENOENT,
    newer ones with an empty dump, so an empty one is confirmed by asking
    for the chain itself.
    """
    out: "list" = []
    for data, off, length, kind in _ask(NFT_MSG_GETRULE, family, [(NFTA_RULE_TABLE, table), (NFTA_RULE_CHAIN, chain)],
                                        dump=True, timeout=timeout):
        if kind == NLMSG_DONE:
            return out if out or chain_use(family, table, chain, timeout) is not None else None
        if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE:
            return None  # NLMSG_ERROR: no such table or chain
        out.append(data[off + 16:off + length])
    return None


# --- deleting a guest's jumps and chains in one transaction -----------------

NFT_MSG_DELCHAIN, NFT_MSG_DELRULE = 5, 8
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLM_F_ACK = 4
NFTA_RULE_HANDLE, NFTA_RULE_EXPRESSIONS = 3, 4
NFTA_LIST_ELEM, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 1, 2
NFTA_MATCH_NAME, NFTA_MATCH_INFO = 1, 3
NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA = 1, 2
NFTA_DATA_VERDICT, NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 2, 1, 2
NFT_JUMP = 0xFFFFFFFD  # -3 as be32


def _attrs(data: bytes) -> "list | None":
    """(type, value) of a run of netlink attributes; None if malformed."""
    import _struct

    out, off = [], 0
    while off < len(data):
        if off + 4 > len(data):
            return None
        alen, akind = _struct.unpack_from("=HH", data, off)
        if alen < 4 or off + alen > len(data):
            return None
        out.append((akind & 0x3FFF, data[off + 4:off + alen]))
        off += (alen + 3) & ~3
    return out


def one(attrs: list, kind: int) -> "bytes | None":
    found = [v for k, v in attrs if k == kind]
    return found[0] if len(found) == 1 else None


def jump_handle(rule: bytes, target: str, comment: str) -> "int | None":
    """The handle of `rule` if it is exactly iptables-nft's tagged jump, else None.

    Exactly: `-m comment --comment <comment> -j <target>` and nothing else
    (a counter is allowed: iptables-nft adds one). Anything else, however
    close, is not ours to delete by handle.
    """
    import _struct

    parts = rule_parts(rule)
    if parts is None or not parts[2]:
        return None
    handle, _comment, exprs = parts
    commented, jumps = False, False
    for name, da in exprs:
        if name == "counter":
            continue
        if name == "match":
            info = one(da, NFTA_MATCH_INFO)
            if one(da, NFTA_MATCH_NAME) != b"comment\0" or info is None or commented:
                return None
            text, _, pad = info.partition(b"\0")
            if text != comment.encode() or pad.strip(b"\0"):
                return None
            commented = True
        elif name == "immediate":
            dreg, val = one(da, NFTA_IMMEDIATE_DREG), one(da, NFTA_IMMEDIATE_DATA)
            va = _attrs(val) if val is not None else None
            verdict = one(va, NFTA_DATA_VERDICT) if va is not None else None
            vv = _attrs(verdict) if verdict is not None else None
            if dreg != b"\0\0\0\0" or vv is None or jumps:
                return None
            code, chain = one(vv, NFTA_VERDICT_CODE), one(vv, NFTA_VERDICT_CHAIN)
            if code is None or len(code) != 4 or _struct.unpack("!I", code)[0] != NFT_JUMP:
                return None
            if chain is None or chain.rstrip(b"\0") != target.encode():
                return None
            jumps = True
        else:
            return None
    if not (commented and jumps) or exprs[-1][0] != "immediate":
        return None
    return handle


def _dump_hits(family: int, table: str, chain: str, needles: "list", timeout: float,
               out: dict) -> None:
    """Rules of one chain that contain one of `needles`: out[needle] = [rule, ...].

    The chain's dump is scanned chunk by chunk for the needles (bytes.find
    in C); only a chunk with a hit is split into messages. On any doubt
    `out` gets None under the key None.
    """
    import _socket
    import _struct

    try:
        sock = _socket.socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER)
    except OSError:
        out[None] = None
        return
    newrule = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE
    try:
        sock.settimeout(timeout)
        seq = (os.getpid() + 2 + len(out)) & 0x7FFFFFFF
        body = _struct.pack("=BBH", FAMILY[family], 0, 0)
        body += attr(NFTA_RULE_TABLE, table.encode() + b"\0")
        body += attr(NFTA_RULE_CHAIN, chain.encode() + b"\0")
        sock.sendto(_struct.pack("=IHHII", 16 + len(body), newrule + 1, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                    + body, (0, 0))
        done = _struct.pack("=IH", 20, NLMSG_DONE)
        while True:
            data = sock.recv(1 << 16)
            if len(data) < 20:
                out[None] = None
                return
            length, kind, flags, rseq, _ = _struct.unpack_from("=IHHII", data)
            # The kernel marks an interrupted dump on the first message of
            # the chunk it was filling (nlmsg_hdr(skb)), so one look here
            # covers the chunks that are not split below.
            if rseq != seq or kind not in (newrule, NLMSG_DONE) or flags & NLM_F_DUMP_INTR:
                out[None] = None  # NLMSG_ERROR: no such table or chain
                return
            if any(n in data for n in needles):
                msgs = headers(data, seq)
                if msgs is None:
                    out[None] = None
                    return
                for off, length, kind, _ in msgs:
                    if kind == newrule:
                        msg = data[off + 16:off + length]
                        for n in needles:
                            if n in msg:
                                out.setdefault(n, []).append(msg)
            tail = len(data) - 20
            if data.startswith(done, tail) and _struct.unpack_from("=I", data, tail + 8)[0] == seq:
                if _struct.unpack_from("=H", data, tail + 6)[0] & NLM_F_DUMP_INTR:
                    out[None] = None
                return
    except OSError:
        out[None] = None
    finally:
        sock.close()


NFTA_CHAIN_HANDLE = 2


def _exchange(sock, reqs: "list") -> "dict | None":
    """Send non-dump requests [(seq, message)] at once; {seq: reply body or None (error)}."""
    import _struct

    sock.sendto(b"".join(m for _, m in reqs), (0, 0))
    want = {seq for seq, _ in reqs}
    out = {}
    while want:
        data = sock.recv(1 << 17)
        msgs = headers(data, None)
        if not data or msgs is None:
            return None
        for off, length, kind, _ in msgs:
            rseq = _struct.unpack_from("=I", data, off + 8)[0]
            if rseq not in want:
                return None
            want.discard(rseq)
            out[rseq] = None if kind == NLMSG_ERROR else (kind, data[off + 16:off + length])
    return out


def probe_jumps(family: int, wanted: "list", span: int, timeout: float = 2.0) -> "list | None":
    """Like find_jumps, without a dump: the jump's handle is guessed, then checked.

    Why it finds it: a table hands out chain and rule handles from one
    counter, and a guest's chain and the jump to it are created in the same
    transaction (apply's restore run), the jump after the chain's rules. So
    the jump's handle is among the `span` handles after the chain's own
    (span: at least the guest's rules plus chains). Each candidate is asked
    for by handle (the kernel answers each without serialising the chain),
    and a hit is used only if it is exactly the tagged jump. A miss (a jump
    added later, e.g. after an upgrade) gives None: dump instead.
    """
    import _socket
    import _struct

    fam = FAMILY[family]
    try:
        sock = _socket.socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER)
    except OSError:
        return None
    try:
        sock.settimeout(timeout)
        seq = ((os.getpid() << 10) + 7) & 0x3FFFFFFF
        items = [(table, chain, target, comment) for table, chain, targets in wanted
                 for target, comment in targets.items()]
        reqs = []
        for i, (table, _, target, _) in enumerate(items):
            body = _struct.pack("=BBH", fam, 0, 0) + attr(NFTA_CHAIN_TABLE, table.encode() + b"\0") \
                + attr(NFTA_CHAIN_NAME, target.encode() + b"\0")
            reqs.append((seq + i, _struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8)
                                               | NFT_MSG_GETCHAIN, NLM_F_REQUEST, seq + i, 0) + body))
        got = _exchange(sock, reqs)
        if got is None:
            return None
        bases = []
        for i in range(len(items)):
            reply = got.get(seq + i)
            attrs = _attrs(reply[1][4:]) if reply and reply[0] == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN \
                else None
            h = one(attrs, NFTA_CHAIN_HANDLE) if attrs is not None else None
            if h is None or len(h) != 8:
                return None
            bases.append(_struct.unpack("!Q", h)[0])
        seq += len(items)
        reqs, owner = [], {}
        for i, ((table, chain, _, _), base) in enumerate(zip(items, bases)):
            head = _struct.pack("=BBH", fam, 0, 0) + attr(NFTA_RULE_TABLE, table.encode() + b"\0") \
                + attr(NFTA_RULE_CHAIN, chain.encode() + b"\0")
            for h_no in range(base + 1, base + 1 + span):
                body = head + attr(NFTA_RULE_HANDLE, _struct.pack("!Q", h_no))
                reqs.append((seq, _struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8)
                                               | NFT_MSG_GETRULE, NLM_F_REQUEST, seq, 0) + body))
                owner[seq] = i
                seq += 1
        got = _exchange(sock, reqs)
        if got is None:
            return None
    except OSError:
        return None
    finally:
        sock.close()
    hits: "list[list]" = [[] for _ in items]
    for rseq, reply in got.items():
        if reply is not None and reply[0] == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE:
            table, chain, target, comment = items[owner[rseq]]
            handle = jump_handle(reply[1], target, comment)
            if handle is not None:
                hits[owner[rseq]].append(handle)
    if any(len(h) != 1 for h in hits):
        return None
    return [(table, chain, target, h[0]) for (table, chain, target, _), h in zip(items, hits)]


def find_jumps(family: int, wanted: "list", timeout: float = 2.0) -> "list | None":
    """Handles of tagged jumps: [(table, chain, target, handle)], or None.

    `wanted`: (table, chain, {target chain: comment}). Each target must be
    jumped to from exactly one rule of its chain, and that rule must be
    exactly the tagged jump; otherwise None (the caller takes the slow,
    by-spec way). The chains are dumped at once, one thread each: the
    kernel's dump work (most of the cost) runs outside the GIL.
    """
    import _thread

    results: "list[dict]" = [{} for _ in wanted]
    locks = []
    for i, (table, chain, targets) in enumerate(wanted):
        args = (family, table, chain, [t.encode() + b"\0" for t in targets], timeout, results[i])
        if i == len(wanted) - 1:
            _dump_hits(*args)
            break
        lock = _thread.allocate_lock()
        lock.acquire()
        locks.append(lock)

        def run(args=args, lock=lock):
            try:
                _dump_hits(*args)
            finally:
                lock.release()

        try:
            _thread.start_new_thread(run, ())
        except RuntimeError:
            lock.release()
            results[i][None] = None
    for lock in locks:
        lock.acquire()
    found = []
    for (table, chain, targets), res in zip(wanted, results):
        if None in res:
            return None
        for target, comment in targets.items():
            hits = res.get(target.encode() + b"\0", [])
            if len(hits) != 1:
                return None
            handle = jump_handle(hits[0], target, comment)
            if handle is None:
                return None
            found.append((table, chain, target, handle))
    return found


def delete_batch(family: int, rules: "list", chains: "list", timeout: float = 2.0) -> bool:
    """Delete rules by handle, then flush and delete chains: one transaction.

    `rules`: (table, chain, handle); `chains`: (table, chain). nf_tables
    commits a batch whole or not at all, across the tables of a family.
    True once every message was acknowledged; False if the kernel refused
    (nothing changed) or did not answer in time (unknown: the caller lists).
    """
    import _struct

    fam = FAMILY[family]
    ops = [(fam, NFT_MSG_DELRULE, 0, name_attr(NFTA_RULE_TABLE, t) + name_attr(NFTA_RULE_CHAIN, c)
            + attr(NFTA_RULE_HANDLE, _struct.pack("!Q", h)), f"delete rule {h} of {t} {c}") for t, c, h in rules]
    ops += [(fam, NFT_MSG_DELRULE, 0, name_attr(NFTA_RULE_TABLE, t) + name_attr(NFTA_RULE_CHAIN, c),
             f"flush chain {t} {c}") for t, c in chains]
    ops += [(fam, NFT_MSG_DELCHAIN, 0, name_attr(NFTA_CHAIN_TABLE, t) + name_attr(NFTA_CHAIN_NAME, c),
             f"delete chain {t} {c}") for t, c in chains]
    return transaction(ops, timeout) is None


def name_attr(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def nested(kind: int, value: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, value)


NLA_F_NESTED = 0x8000
NLM_F_CREATE = 0x400
BUFFER_MAX = 64 << 20  # the most a batch may ask the socket to buffer


def transaction(ops: "list", timeout: float = 2.0) -> "str | None":
    """Commit nf_tables messages as one batch: all of them or none.

    `ops`: (nfproto family, NFT_MSG_* kind, extra nlmsg flags, attributes,
    what it does in words). None once every message was acknowledged;
    else why not: the kernel's error (nothing changed), with its errno and
    the message it refused, or why there was no clean answer (unknown: the
    caller lists).
    """
    import _socket
    import _struct

    def msg(kind: int, flags: int, seq: int, fam: int, res_id: int, attrs: bytes) -> bytes:
        body = _struct.pack("=BBH", fam, 0, _socket.htons(res_id)) + attrs
        return _struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body

    base = _next_seq()
    parts = [msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, base, 0, NFNL_SUBSYS_NFTABLES, b"")]
    sub = NFNL_SUBSYS_NFTABLES << 8
    for i, (fam, kind, flags, attrs, _what) in enumerate(ops, 1):
        parts.append(msg(sub | kind, NLM_F_REQUEST | NLM_F_ACK | flags, base + i, fam, 0, attrs))
    parts.append(msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, base + len(ops) + 1, 0, NFNL_SUBSYS_NFTABLES, b""))
    _seq[0] = base + len(ops) + 2
    data = b"".join(parts)

    try:
        sock = _query_socket()  # closed after exit: a commit may delete
    except OSError as e:
        return f"netlink: {e.strerror or e}"
    ok = False
    try:
        sock.settimeout(timeout)
        if len(data) > 200_000:  # beyond the default buffer: a 1000-port range with sources
            sock.setsockopt(_socket.SOL_SOCKET, 32, min(len(data) * 2, BUFFER_MAX))  # SO_SNDBUFFORCE
            sock.setsockopt(_socket.SOL_SOCKET, 33, min(len(data), BUFFER_MAX))  # SO_RCVBUFFORCE
        sock.sendto(data, (0, 0))
        want = set(range(base + 1, base + len(ops) + 1))
        error = None
        while want and error is None:
            chunk = sock.recv(1 << 16)
            msgs = headers(chunk, None) if chunk else None
            if not msgs:
                return "netlink: malformed answer"
            for off, length, kind, _ in msgs:
                rseq = _struct.unpack_from("=I", chunk, off + 8)[0]
                if kind != NLMSG_ERROR or length < 20:
                    return "netlink: unexpected answer"
                err = _struct.unpack_from("=i", chunk, off + 16)[0]
                if err:
                    # The refused message, or the commit itself (answered on BEGIN).
                    if rseq in want:
                        what = f"message {rseq - base} of {len(ops)} ({ops[rseq - base - 1][4]})"
                    else:
                        what = "the commit"
                    error = f"{_errno_name(-err)} at {what}"
                want.discard(rseq)
        ok = not want and error is None
        return error
    except OSError as e:
        return f"netlink: {e.strerror or e}"
    finally:
        if not ok:
            _drop_query()  # stale answers may wait in it


def _errno_name(err: int) -> str:
    import errno

    return f"{errno.errorcode.get(err, 'errno')} {os.strerror(err)}"


_held: list = []
_children: list = []


def hold_past_exit(obj) -> None:
    """Let a detached child close our netlink sockets, after we are gone.

    When the last holder of an nfnetlink socket closes it while deleted
    rules or elements await their RCU grace period, the kernel makes it
    wait for them (nf_tables flushes its destroy work on NETLINK_URELEASE):
    once per commit round, at the hook's exit, so libvirt waits too.
    Committed is committed by then; only the freeing of old objects is
    left. So `obj` (a socket, or a libnftables context) lives to the end of
    the process (a module-level reference), and at exit a forked child
    keeps a copy of every open socket (stdio on /dev/null) until this
    process has exited, then exits itself and pays that wait where nobody
    waits for it.
    """
    _held.append(obj)
    if len(_held) == 1:
        import atexit

        atexit.register(_detach_close)


def _detach_close() -> None:
    try:
        r, w = os.pipe()  # w: ours (non-inheritable, but fork keeps it: closed in the child)
        pid = os.fork()
    except OSError:
        return  # then we pay the wait ourselves
    if pid:
        os.close(r)
        _children.append(w)  # closed by our exit: the child's cue
        return
    try:
        os.close(w)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.setsid()
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd != r:
                try:
                    if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                        os.close(fd)  # e.g. a lock file: never hold it longer
                except OSError:
                    pass
        os.read(r, 1)  # EOF once the parent has exited
    finally:
        os._exit(0)


# --- set elements and rules, read back -------------------------------------

NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
NFT_MSG_DELTABLE = 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_USERDATA, NFTA_SET_ELEM_KEY_END = 1, 2, 6, 10
NFTA_DATA_VALUE = 1
NFTA_RULE_USERDATA = 7


def set_keys(family: "int | str", table: str, name: str, timeout: float = 2.0) -> "list | None":
    """The keys (raw bytes) of a set's elements; None if unknown or there is no such set."""
    newelem = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM
    out: "list" = []
    for data, off, length, kind in _ask(NFT_MSG_GETSETELEM, family,
                                        [(NFTA_SET_ELEM_LIST_TABLE, table), (NFTA_SET_ELEM_LIST_SET, name)],
                                        dump=True, timeout=timeout):
        if kind == NLMSG_DONE:
            return out
        if kind != newelem:
            return None  # NLMSG_ERROR: no such table or set
        top = _attrs(data[off + 20:off + length])
        elems = one(top, NFTA_SET_ELEM_LIST_ELEMENTS) if top is not None else None
        items = _attrs(elems) if elems is not None else None
        if items is None:
            return None
        for _, item in items:
            ea = _attrs(item)
            key = one(ea, NFTA_SET_ELEM_KEY) if ea is not None else None
            ka = _attrs(key) if key is not None else None
            value = one(ka, NFTA_DATA_VALUE) if ka is not None else None
            if value is None:
                return None
            out.append(value)
    return None


def rule_parts(rule: bytes) -> "tuple | None":
    """(handle, comment or None, [(expression name, its attributes)]) of one
    GETRULE answer (as chain_rules gives them); None if malformed."""
    import _struct

    top = _attrs(rule[4:])  # after nfgenmsg
    if top is None:
        return None
    handle, exprs, udata = one(top, NFTA_RULE_HANDLE), one(top, NFTA_RULE_EXPRESSIONS), one(top, NFTA_RULE_USERDATA)
    if handle is None or len(handle) != 8:
        return None
    comment = None
    off = 0
    while udata is not None and off + 2 <= len(udata):  # libnftnl's udata: type, length, value
        kind, n = udata[off], udata[off + 1]
        if kind == 0 and off + 2 + n <= len(udata):  # NFTNL_UDATA_RULE_COMMENT
            comment = udata[off + 2:off + 2 + n].split(b"\0", 1)[0].decode("utf-8", "replace")
        off += 2 + n
    parts = []
    for kind, elem in _attrs(exprs or b"") or ():
        ea = _attrs(elem) if kind == NFTA_LIST_ELEM else None
        if ea is None:
            return None
        name = one(ea, NFTA_EXPR_NAME)
        if name is None:
            return None
        da = _attrs(one(ea, NFTA_EXPR_DATA) or b"")
        if da is None:
            return None
        parts.append((name.rstrip(b"\0").decode("ascii", "replace"), da))
    return _struct.unpack("!Q", handle)[0], comment, parts
