"""The hook's real work, in a child process (see isolated()).

vnethook.hook decides, cheaply and in the hook's own process, whether an
event needs anything at all; everything else happens here. Exit statuses
follow the rules in vnethook/hook.py: only the start of a guest that
`on_error: block` covers may fail (subject()), never anything else.
"""

from __future__ import annotations

import os
import sys

from vnethook.hook import METADATA_NS, QEMU_CHECK, QEMU_REMOVE, _leave, _paths, subject


def isolated(kind: str, obj: str, op: str, data: bytes, checked=None) -> int:
    """Do the real work in a child process.

    The work loads C code (libnftables via ctypes, libiptc, lxml, libyaml).
    An exception there is caught in the child; a fault (SIGSEGV, SIGABRT,
    the OOM killer) kills only the child, and this parent turns it into the
    exit status libvirt must see: 0, unless this guest's start is to be
    blocked. Only events that change something pay for the fork (see
    README.md, "Performance").
    """
    import gc

    # Copy-on-write is what a fork really costs: every page the worker
    # writes is copied. The collector would write to every object the
    # parent has (their gc headers); frozen, it leaves them alone, and the
    # short-lived worker does without it (cycles it makes die with it).
    gc.freeze()
    try:
        pid = os.fork()
    except OSError as e:
        return _failed(kind, obj, op, data, e)  # no worker (out of memory?): report it
    if pid == 0:  # the worker
        gc.disable()
        rc = 1
        try:
            try:
                rc = _work(kind, obj, op, data, checked)
            except BaseException as e:  # never a traceback into libvirt's face
                rc = _failed(kind, obj, op, data, e)
            _leave()
        finally:
            os._exit(rc if isinstance(rc, int) else 1)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
        except OSError as e:
            return _failed(kind, obj, op, data, e)
    if os.WIFEXITED(status):
        rc = os.WEXITSTATUS(status)
        if rc == 0 or subject(kind, obj, op, data) is not None:
            return rc
        return 0  # whatever the worker said, this event must not fail
    import signal

    try:
        why = f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    except ValueError:
        why = f"killed by signal {os.WTERMSIG(status)}"
    return _failed(kind, obj, op, data, RuntimeError(f"the worker was {why}"))


def _work(kind: str, obj: str, op: str, data: bytes, checked=None) -> int:
    """`checked`: the port map's cache blob the hook checked in this event
    (config.checked_cache), or None."""
    if kind == "qemu":
        return _qemu(obj, op, data, checked)
    return _network(obj, op, data, checked)


def _config_or_error(paths, checked=None):
    """(config, None) or (None, ConfigError)."""
    from vnethook.config import ConfigError, load_config_cached

    try:
        return load_config_cached(paths, checked), None
    except ConfigError as e:
        return None, e


def _qemu(domain_name: str, op: str, data: bytes, checked=None) -> int:
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

    config, err = _config_or_error(paths, checked)
    if err is not None:
        return _config_broken(paths, "qemu", domain_name, op, data, err)
    has_metadata = METADATA_NS in data
    if op in QEMU_CHECK:
        if has_metadata:
            from vnethook import metadata

            _, problems = metadata.for_guest(paths, config, domain_name, data)
            return _metadata_verdict(config, domain_name, op, problems, report=False)
        return 0
    if domain_name not in config.guests and not has_metadata:
        from vnethook import state
        from vnethook.keys import guest_key

        if not state.exists(paths, guest_key(domain_name)):
            return 0
    from vnethook import libvirt
    from vnethook.engine import Engine

    domain = libvirt.parse_domain(data, source=f"qemu {op} stdin")
    if has_metadata:
        from vnethook import metadata

        config, problems = metadata.for_guest(paths, config, domain_name, data)
        rc = _metadata_verdict(config, domain_name, op, problems, report=True)
        if rc:
            return rc
    engine = Engine(paths, config)
    plan = engine.apply_domain(domain, event=f"qemu {op}")
    if plan is not None:
        if op in ("started", "reconnect"):
            _warn_strict_forward_ports(domain.name)
        _maybe_watch_leases(paths, config, plan)
    return 0


def _metadata_verdict(config, domain_name: str, op: str, problems: list, report: bool) -> int:
    """What the problems of a guest's own metadata mean for this event.

    Its bad or conflicting forwards are left out (metadata.merge) and
    logged; under `on_error: block` they refuse this guest's start, and
    only its own (prepare/start/started: subject()). `report`: log them
    (once per start, at started/reconnect; prepare/start only refuse).
    """
    if not problems:
        return 0
    from vnethook import log

    block = config.settings.on_error == "block" and op in ("prepare", "start", "started")
    if report or block:
        for p in problems:
            log.error(f"{p} (not forwarded)" if not block else p, DOMAIN=domain_name, ACTION=op)
    if block:
        sys.stderr.write(f"vnethook: refusing {op} of {domain_name} (on_error: block): its metadata has "
                         f"{len(problems)} problem(s):\n" + "\n".join(problems) + "\n")
        return 1
    return 0


def _warn_strict_forward_ports(domain_name: str) -> None:
    """firewalld's StrictForwardPorts=yes rejects every forward we make;
    say so where the admin looks first (one file read, no D-Bus)."""
    from vnethook.firewalld import strict_in_conf, strict_problem

    if strict_in_conf():
        from vnethook import log

        log.error(strict_problem(use_bus=False) or "firewalld: StrictForwardPorts=yes", DOMAIN=domain_name)


def _network(net_name: str, op: str, data: bytes, checked=None) -> int:
    paths = _paths()
    from vnethook.engine import Engine

    if op == "stopped":
        Engine(paths).remove_network(net_name)
        return 0
    config, err = _config_or_error(paths, checked)
    if err is not None:
        return _config_broken(paths, "network", net_name, op, data, err)
    from vnethook import libvirt

    engine = Engine(paths, config)
    if op == "started":
        # libvirt just (re)built its own rules and calls no other hook:
        # re-detect its backend, put our base back, re-apply this network's guests.
        engine.selected_backend(redetect=True)
        engine.ensure_base()
        engine.sync(verify=False, only_network=net_name)
        return 0
    if op == "updated":
        engine.sync(verify=False, only_network=net_name)
        return 0
    port = libvirt.parse_port(data, source=f"network {op} stdin")
    if port is None or not port.owner:
        return 0
    from vnethook.hook import _metadata_running

    if _metadata_running(paths, port.owner):
        # Its metadata, as sync sees it (its problems were logged when it started).
        from vnethook import metadata

        config, _ = metadata.merge(config, metadata.running(paths))
        engine = Engine(paths, config)
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


def _config_broken(paths, kind, obj, op, data, err) -> int:
    from vnethook import log

    who = subject(kind, obj, op, data)
    msg = f"port map is invalid, nothing changed:\n{err}"
    log.error(msg, DOMAIN=obj if kind == "qemu" else who, ACTION=op)
    if who is not None and _blocking(paths, who, data if kind == "qemu" else b""):
        sys.stderr.write(f"vnethook: refusing {op} of {who} (on_error: block):\n{err}\n")
        return 1
    return 0


def _blocking(paths, domain_name, data: bytes = b"") -> bool:
    """Does `on_error: block` apply to this guest, with a broken map?

    Yes if the last valid map said so for it (block-guests), or if the
    broken map itself asks for block and names this guest; under block, a
    guest whose domain XML (`data`) carries vnethook metadata counts as named.
    """
    from vnethook import blocklist

    if blocklist.blocks(paths, domain_name, data):
        return True
    from vnethook.config import on_error_hint

    try:
        if on_error_hint(paths) != "block":
            return False
    except Exception:
        return False
    return METADATA_NS in data or _mentions(paths, domain_name)


def _mentions(paths, domain_name: str) -> bool:
    """Best effort with a map that does not parse: is the guest a key in it?

    The name must stand as a mapping key (`web1:` in block or flow style,
    quoted or not), so `web1` is not named by `web10:` or a comment.
    """
    import re

    from vnethook.config import config_files

    needle = re.compile(
        rb"(?:^|[\s{,])[\"']?" + re.escape(domain_name.encode("utf-8", "surrogateescape")) + rb"[\"']?[ \t]*:(?:\s|$)",
        re.M,
    )
    for f in config_files(paths):
        try:
            with open(f, "rb") as fh:
                if needle.search(fh.read(4 << 20)):
                    return True
        except OSError:
            continue
    return False


def _failed(kind: str, obj: str, op: str, data: bytes, exc: BaseException) -> int:
    from vnethook import log

    log.error(f"{kind} {op} {obj}: {type(exc).__name__}: {exc}", DOMAIN=obj if kind == "qemu" else None, ACTION=op)
    who = subject(kind, obj, op, data)
    if who is None:
        return 0  # reconnect (a non-zero exit kills the guest), removals, network events
    try:
        paths = _paths()
        from vnethook import blocklist

        xml = data if kind == "qemu" else b""
        block = blocklist.blocks(paths, who, xml)
        if not block:
            config, err = _config_or_error(paths)
            block = config is not None and config.settings.on_error == "block" and (
                who in config.guests or METADATA_NS in xml)
        if block:
            sys.stderr.write(f"vnethook: refusing {op} of {who} (on_error: block): {exc}\n")
            return 1
    except Exception:
        pass
    return 0


