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
    try:
        if kind == "qemu":
            return _qemu(obj, op, data)
        return _network(obj, op, data)
    except BaseException as e:  # never a traceback into libvirt's face
        if isinstance(e, SystemExit):
            raise
        return _failed(kind, obj, op, e)


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


def _config_or_error(paths):
    """(config, None) or (None, ConfigError)."""
    from vnethook.config import ConfigError, load_config_cached

    try:
        return load_config_cached(paths), None
    except ConfigError as e:
        return None, e


def _qemu(domain_name: str, op: str, data: bytes) -> int:
    paths = _paths()
    if op in QEMU_REMOVE:
        # The record alone says what to remove: no config, no XML parsing.
        from vnethook import state
        from vnethook.keys import guest_key

        key = guest_key(domain_name)
        if not state.exists(paths, key) and os.path.isdir(paths.guests_dir):
            return 0
        from vnethook.engine import Engine

        Engine(paths).remove_guest(domain_name, reason=f"qemu {op}", key=key)
        return 0

    config, err = _config_or_error(paths)
    if err is not None:
        return _config_broken(paths, domain_name, op, err)
    configured = domain_name in config.guests
    if op in QEMU_CHECK:
        return 0
    if not configured:
        from vnethook import state
        from vnethook.keys import guest_key

        if not state.exists(paths, guest_key(domain_name)):
            return 0
    from vnethook import libvirt
    from vnethook.engine import Engine

    domain = libvirt.parse_domain(data, source=f"qemu {op} stdin")
    engine = Engine(paths, config)
    plan = engine.apply_domain(domain, event=f"qemu {op}")
    if plan is not None:
        if op in ("started", "reconnect"):
            _warn_strict_forward_ports(domain.name)
        _maybe_watch_leases(paths, config, plan)
    return 0


def _warn_strict_forward_ports(domain_name: str) -> None:
    """firewalld's StrictForwardPorts=yes rejects every forward we make;
    say so where the admin looks first (one file read, no D-Bus)."""
    from vnethook.firewalld import strict_in_conf, strict_problem

    if strict_in_conf():
        from vnethook import log

        log.error(strict_problem(use_bus=False), DOMAIN=domain_name)


def _network(net_name: str, op: str, data: bytes) -> int:
    paths = _paths()
    from vnethook.engine import Engine

    if op == "stopped":
        Engine(paths).remove_network(net_name)
        return 0
    config, err = _config_or_error(paths)
    if err is not None:
        return _config_broken(paths, None, op, err)
    from vnethook import libvirt

    engine = Engine(paths, config)
    if op == "started":
        # libvirt just (re)built its own rules and calls no other hook:
        # re-detect its backend, put our base back, re-apply this network's guests.
        engine.selected_backend(redetect=True)
        engine.backend().ensure_base()
        engine.sync(verify=False, only_network=net_name)
        return 0
    if op == "updated":
        engine.sync(verify=False, only_network=net_name)
        return 0
    port = libvirt.parse_port(data, source=f"network {op} stdin")
    if port is None or not port.owner:
        return 0
    if op == "port-deleted":
        if port.owner not in config.guests:
            from vnethook import state
            from vnethook.keys import guest_key

            if not state.exists(paths, guest_key(port.owner)):
                return 0
        engine.remove_macs(port.owner, [port.mac], reason=f"network {op}")
        dom = libvirt.running_domain(paths, port.owner)
        if dom is not None and port.owner in config.guests:
            dom = libvirt.Domain(
                name=dom.name, uuid=dom.uuid, interfaces=tuple(i for i in dom.interfaces if i.mac != port.mac)
            )
            engine.apply_domain(dom, event=f"network {op}")
        return 0
    # port-created: hotplug, or the first step of a guest start
    if port.owner not in config.guests:
        return 0
    hook_net = libvirt.parse_network(data, source=f"network {op} stdin")
    dom = libvirt.running_domain(paths, port.owner)
    iface = libvirt.Interface(
        mac=port.mac, type="network", network=net_name, bridge=port.bridge, target=None, portid=None
    )
    if dom is None:
        dom = libvirt.Domain(name=port.owner, uuid=port.owner_uuid, interfaces=(iface,))
    elif not any(i.mac == port.mac for i in dom.interfaces):
        dom = libvirt.Domain(name=dom.name, uuid=dom.uuid, interfaces=dom.interfaces + (iface,))
    plan = engine.apply_domain(dom, hook_network=hook_net, event=f"network {op}")
    if plan is not None:
        _maybe_watch_leases(paths, config, plan)
    return 0


def _maybe_watch_leases(paths, config, plan) -> None:
    """Arrange for late or changing leases to be picked up, without waiting."""
    if not plan.waiting and not any(src == "lease" for _, _, src in plan.addresses):
        return
    from vnethook import watch

    watch.ensure_watcher(paths, config.settings.lease_watch)


def _config_broken(paths, domain_name, op, err) -> int:
    from vnethook import log

    msg = f"port map is invalid, nothing changed:\n{err}"
    log.error(msg, DOMAIN=domain_name, ACTION=op)
    if op in BLOCKING_OPS and _blocking(paths, domain_name):
        sys.stderr.write(f"vnethook: refusing {op} of {domain_name} (on_error: block):\n{err}\n")
        return 1
    return 0


def _blocking(paths, domain_name) -> bool:
    """Does `on_error: block` apply to this guest, even with a broken map?"""
    from vnethook.config import on_error_hint

    try:
        if on_error_hint(paths) != "block":
            return False
    except Exception:
        return False
    if domain_name is None:
        return True
    return _mentions(paths, domain_name)


def _mentions(paths, domain_name: str) -> bool:
    """Best effort with a map that does not parse: is the guest named in it?"""
    from vnethook.config import config_files

    needle = domain_name.encode("utf-8", "surrogateescape")
    for f in config_files(paths):
        try:
            with open(f, "rb") as fh:
                if needle in fh.read(4 << 20):
                    return True
        except OSError:
            continue
    return False


def _failed(kind: str, obj: str, op: str, exc: BaseException) -> int:
    from vnethook import log

    log.error(f"{kind} {op} {obj}: {type(exc).__name__}: {exc}", DOMAIN=obj if kind == "qemu" else None, ACTION=op)
    if kind == "qemu" and op == "reconnect":
        return 0  # a non-zero exit here kills the running guest
    if op in BLOCKING_OPS:
        try:
            paths = _paths()
            config, err = _config_or_error(paths)
            if config is not None and config.settings.on_error == "block" and (
                kind == "network" or obj in config.guests
            ):
                sys.stderr.write(f"vnethook: refusing {op} of {obj} (on_error: block): {exc}\n")
                return 1
        except Exception:
            pass
    return 0


def run_and_exit(kind: str) -> None:
    """Entry point of the hook scripts: run, then leave without finalizing.

    Interpreter finalization (module teardown, ctypes/libnftables
    destructors) is pure cost for a process that libvirt waits on; the
    atexit handlers that matter (nftables.py's socket hand-off) still run.
    """
    rc = main(kind)
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    import atexit

    atexit._run_exitfuncs()
    os._exit(rc if isinstance(rc, int) else 1)


def qemu_main() -> None:
    sys.exit(main("qemu"))


def network_main() -> None:
    sys.exit(main("network"))
