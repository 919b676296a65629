"""libvirt hook dispatch: argv + stdin in, firewall changes out.

libvirt runs hooks synchronously and waits for them, so this module is
written for speed: events that do nothing return before anything heavy is
imported, `stopped` works from the record alone, and the port map comes
from a compiled cache unless it changed.

Exit status matters to libvirt (see ../shared/libvirt-facts.md):
- qemu prepare/start/started: non-zero aborts the start. Only
  `on_error: block` ever returns non-zero, and only on these events.
- qemu reconnect: non-zero makes libvirt *kill the running guest*: never.
- qemu migrate/restore: stdout replaces the domain XML: print nothing.
- network port-created: non-zero fails the guest start: only with block.
Everything we print goes to stderr (libvirt logs it) or the journal.

`on_error: block` is scoped to its guest (subject()): only that guest's own
prepare/start/started and the port-created of its NIC may fail; network
start/started/updated and every other guest never do, even with a broken
map. Events that change something run in a child process
(hookwork.isolated), so that not even a crash in C code (libnftables,
libiptc, lxml, libyaml) turns into a failing exit. What the hook scripts do
when this package cannot even be imported: GUARD in install.py.

A guest may also declare ports in its own <metadata> (metadata.py): the
namespace's bytes in stdin send its events to the worker, like a map entry
does; a guest with neither still costs no parsing at all.
"""

from __future__ import annotations

import os
import sys

# `start` only validates: the forwards go in at `started`, when libvirt's
# own firewall tables are certain to exist (nftables backend, fresh daemon),
# and a failure there still aborts the start under `on_error: block`.
QEMU_CHECK = frozenset(("prepare", "start"))
QEMU_APPLY = frozenset(("started", "reconnect"))
QEMU_REMOVE = frozenset(("stopped", "release"))
NETWORK_OPS = frozenset(("started", "stopped", "port-created", "port-deleted", "updated"))
BLOCKING_OPS = frozenset(("prepare", "start", "started", "port-created"))
# The namespace of the ports a guest declares in its own <metadata>
# (vnethook/metadata.py). Its bytes in the domain XML are the cheap test
# that a guest has any, before anything is parsed.
METADATA_NS = b"http://vnethook.org/xmlns/ports/1.0"


def main(kind: str, argv=None, stdin=None) -> int:
    argv = sys.argv if argv is None else argv
    data = _read_all(stdin)
    if len(argv) < 3:
        return 0
    obj, op = argv[1], argv[2]
    if kind == "qemu":
        if op not in QEMU_CHECK and op not in QEMU_APPLY and op not in QEMU_REMOVE:
            return 0  # migrate, restore, attach, unknown: nothing, and no output
    elif kind == "network":
        if op not in NETWORK_OPS:
            return 0
    else:
        return 0
    checked: list = []  # the port map's cache blob, if _nothing_to_do checked it
    try:
        if _nothing_to_do(kind, obj, op, data, checked):
            return 0
    except Exception:
        pass  # let the worker find out, and report it
    from vnethook.hookwork import isolated

    return isolated(kind, obj, op, data, checked[0] if checked else None)


def subject(kind: str, obj: str, op: str, data: bytes):
    """The guest whose start this event is part of, if it may fail it.

    Only these events can abort a start (libvirt-facts.md): qemu prepare,
    start, started of that guest, and the network's port-created of that
    guest's NIC. Everything else (network start/started/updated, reconnect,
    removals) has no guest to block and never fails.
    """
    if kind == "qemu":
        return obj if op in BLOCKING_OPS and op != "port-created" else None
    if kind == "network" and op == "port-created":
        return _port_owner(data)
    return None


def _port_owner(data: bytes):
    """<networkport><owner><name> of a network hook's stdin, without a parser
    (this must work when the XML readers are what failed, and cost nothing)."""
    data = data or b""
    i = data.find(b"<networkport")
    i = data.find(b"<owner", i) if i >= 0 else -1
    i = data.find(b"<name>", i) if i >= 0 else -1
    j = data.find(b"</name>", i) if i >= 0 else -1
    if j < 0:
        return None
    name = data[i + 6:j].strip().decode("utf-8", "surrogateescape")
    if "&" in name:
        import re

        name = re.sub(r"&#x([0-9a-fA-F]+);", lambda m: chr(int(m.group(1), 16)), name)
        name = re.sub(r"&#([0-9]+);", lambda m: chr(int(m.group(1))), name)
        for ent, ch in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'"), ("&amp;", "&")):
            name = name.replace(ent, ch)
    return name or None


def _nothing_to_do(kind: str, obj: str, op: str, data: bytes, checked: list) -> bool:
    """The events that need nothing (most of them), decided from a warm
    cache and the records alone, in this process: no worker, no fork.
    The cache blob it found valid goes into `checked`, for the worker."""
    paths = _paths()
    if kind == "qemu" and op in QEMU_REMOVE:
        return not _recorded(paths, obj) and os.path.isdir(paths.guests_dir)
    if kind == "network" and op not in ("port-created", "port-deleted"):
        return False
    from vnethook.config import checked_cache, fast_view

    blob = checked_cache(paths)
    view = fast_view(paths, blob)
    if view is None:
        return False  # cache miss or broken map: the worker loads (and judges) it
    checked.append(blob)
    names, on_error = view
    if kind == "qemu":
        # Ports in the guest's own metadata: the bytes of the namespace are
        # the test, no parsing (a guest with none must not pay for any).
        if op in QEMU_CHECK:
            # A valid map: nothing to validate further, except metadata
            # that could block this start.
            return on_error != "block" or METADATA_NS not in data
        return obj not in names and not _recorded(paths, obj) and METADATA_NS not in data
    owner = _port_owner(data)
    if owner is None:
        return False
    return owner not in names and not _recorded(paths, owner) and not _metadata_running(paths, owner)


def _metadata_running(paths, name: str) -> bool:
    """Does a running guest's status file carry vnethook metadata? (A port
    of a guest that is only starting has none yet: its qemu `started`
    applies its metadata.)"""
    if not name or "/" in name or name in (".", ".."):
        return False
    try:
        with open(paths.running_domain_xml(name), "rb") as f:
            return METADATA_NS in f.read(16 << 20)
    except OSError:
        return False


def _recorded(paths, name: str) -> bool:
    from vnethook import state
    from vnethook.keys import guest_key

    return state.exists(paths, guest_key(name))


def _read_all(stdin) -> bytes:
    """Drain stdin so libvirt never sees EPIPE, even when we ignore it."""
    f = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
    if f is None:
        return b""
    try:
        return f.read() or b""
    except (OSError, ValueError):
        return b""


def _paths():
    from vnethook.paths import get_paths

    return get_paths()


def _leave() -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    import atexit

    atexit._run_exitfuncs()


def run_and_exit(kind: str) -> None:
    """Entry point of the hook scripts: run, then leave without finalizing.

    Interpreter finalization (module teardown, ctypes/libnftables
    destructors) is pure cost for a process that libvirt waits on; the
    atexit handlers that matter (nftables.py's socket hand-off) still run.
    """
    rc = main(kind)
    _leave()
    os._exit(rc if isinstance(rc, int) else 1)
