"""The `vnethook` command: check, plan, status, sync, flush, install, ...

Exit codes: 0 success, 1 the thing checked is wrong (invalid map, drift,
failed change), 2 usage error. Errors go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vnethook import __version__


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "config", None):
        os.environ["VNETHOOK_CONFIG"] = os.path.abspath(args.config)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a clear message, never a traceback
        if os.environ.get("VNETHOOK_DEBUG"):
            raise
        sys.stderr.write(f"vnethook: {type(e).__name__}: {e}\n")
        return 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vnethook",
        description="Publish ports of libvirt NAT guests, in the firewall libvirt itself uses.",
    )
    p.add_argument("--version", action="version", version=f"vnethook {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")

    def cmd(name, func, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        return sp

    sp = cmd("check", _check, "validate the port map (exit 0 valid, 1 invalid)")
    sp.add_argument("--config", metavar="PATH", help="a file or directory (default /etc/vnethook)")
    sp.add_argument("path", nargs="?", metavar="PATH", help="same as --config")

    sp = cmd("plan", _plan, "show the forwards a guest would get, without changing anything")
    sp.add_argument("domain")
    sp.add_argument("--domain-xml", metavar="FILE", help="domain XML to plan for (default: the running domain)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--config", metavar="PATH")

    sp = cmd("status", _status, "per guest: address, forwards desired/installed/drifted; the backend in use")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--config", metavar="PATH")

    sp = cmd("doctor", _doctor, "walk a forward's path check by check, with the fix for each failure (exit 0/1)")
    sp.add_argument("domain", nargs="?")
    sp.add_argument("port", nargs="?", type=int)
    sp.add_argument("--config", metavar="PATH")

    sp = cmd("sync", _sync, "make installed forwards match the map for every running guest")
    sp.add_argument("--config", metavar="PATH")
    sp.add_argument("--no-verify", action="store_true", help="trust vnethook's records instead of listing the firewall")

    cmd("flush", _flush, "remove everything vnethook installed, and nothing else")

    sp = cmd("install", _install, "install the libvirt hooks")
    sp.add_argument("--root", default="/", metavar="DIR", help="install below DIR (default /)")
    sp.add_argument("--force", action="store_true", help="replace a foreign main hook (a backup is kept)")
    sp.add_argument("--mode", choices=("auto", "dir", "main"), default="auto",
                    help="hooks/qemu.d + network.d (libvirt >= 6.5), or the main hook files")
    sp.add_argument("--no-reload", action="store_true", help="do not SIGHUP a running libvirtd")

    sp = cmd("uninstall", _uninstall, "remove the libvirt hooks vnethook installed")
    sp.add_argument("--root", default="/", metavar="DIR")
    sp.add_argument("--no-reload", action="store_true")

    sp = cmd("watch", _watch, "follow DHCP lease changes (started by the hook when systemd is absent)")
    sp.add_argument("--interval", type=float, default=0.25,
                    help="seconds between looks at the lease files where inotify cannot watch them")
    sp.add_argument("--repair-every", type=float, default=2.0,
                    help="seconds between checks that the firewall still holds our rules")
    sp.add_argument("--idle-exit", type=float, default=30.0)
    sp.add_argument("--max-seconds", type=float, default=86400.0)

    cmd("firewalld-listen", _firewalld_listen,
        "follow firewalld on the system bus; re-apply forwards after each reload or restart")

    sp = cmd("publish", _publish, "add forwards to a guest's metadata (or, with --map, to ports.d/DOMAIN.yaml);"
                                  " a running guest gets them at once")
    sp.add_argument("domain")
    sp.add_argument("specs", nargs="+", metavar="SPEC", help="[HOSTADDR:]HOSTPORT:GUESTPORT[/PROTOCOL], as in the map")
    sp.add_argument("--map", action="store_true", help="write the drop-in ports.d/DOMAIN.yaml instead of the metadata")
    sp.add_argument("--config", metavar="PATH")

    sp = cmd("unpublish", _unpublish, "remove forwards that publish added (metadata, or --map: ports.d/DOMAIN.yaml)")
    sp.add_argument("domain")
    sp.add_argument("specs", nargs="+", metavar="SPEC")
    sp.add_argument("--map", action="store_true", help="edit the drop-in ports.d/DOMAIN.yaml instead of the metadata")
    sp.add_argument("--config", metavar="PATH")

    sp = cmd("ports", _ports, "each forward of each guest (or one): where it is written (file:line or metadata) and its state")
    sp.add_argument("domain", nargs="?")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--config", metavar="PATH")

    sp = cmd("hook", _hook, "run a hook event by hand: hook qemu|network NAME OP SUBOP EXTRA < XML")
    sp.add_argument("kind", choices=("qemu", "network"))
    sp.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _check(args) -> int:
    from vnethook.config import check_main

    return check_main(args.path or args.config)


def _load(paths):
    # The compiled cache when no file of the map changed (sync runs from a
    # timer and from every lease the watcher sees; 1000 guests are a lot of YAML).
    from vnethook.config import ConfigError, load_config_cached

    try:
        config = load_config_cached(paths)
    except ConfigError as e:
        sys.stderr.write(f"{e}\nvnethook: the port map is invalid; nothing was changed\n")
        return None
    from vnethook import blocklist

    blocklist.write(paths, config)
    return config


def _plan(args) -> int:
    from vnethook import libvirt
    from vnethook.engine import Engine
    from vnethook.paths import get_paths

    paths = get_paths()
    config = _load(paths)
    if config is None:
        return 1
    domain: "libvirt.Domain | None"
    running = False
    if args.domain_xml:
        with open(args.domain_xml, "rb") as f:
            xml, source = f.read(), args.domain_xml
        domain = libvirt.parse_domain(xml, source=source)
    else:
        source = paths.running_domain_xml(args.domain)
        data = libvirt._read_file(source) if libvirt._safe_name(args.domain) else None
        running = data is not None
        domain = libvirt.parse_domain(data, source=source) if data is not None else None
        if domain is None:
            # Not running: its persistent definition says which NICs it will have.
            import os

            defined = os.path.join(paths.libvirt_etc, "qemu", f"{args.domain}.xml")
            try:
                with open(defined, "rb") as f:
                    data, source = f.read(), defined
                domain = libvirt.parse_domain(data, source=defined)
            except FileNotFoundError:
                domain = None
            if domain is None:
                sys.stderr.write(
                    f"vnethook: domain '{args.domain}' is neither running "
                    f"(no {paths.running_domain_xml(args.domain)}) nor defined (no {defined}); "
                    "pass --domain-xml FILE\n"
                )
                return 1
            sys.stderr.write(f"vnethook: {args.domain} is not running: planned from {defined}\n")
        xml = data or b""
    assert domain is not None
    if domain.name != args.domain:
        sys.stderr.write(f"vnethook: the XML describes '{domain.name}', not '{args.domain}'\n")
        return 1
    engine = Engine(paths, config)
    # The ports it declares in its own metadata, against the map and the
    # other running guests' (a guest that is not running would start last).
    from vnethook import metadata

    md = metadata.read(xml, domain.name, source=source)
    others = metadata.running(paths, exclude=domain.name)
    meta_problems: list = []
    if md is not None or others:
        engine.config, problems = metadata.merge(
            config, others + ([md] if md is not None else []), current=None if running else domain.name)
        meta_problems = problems.get(domain.name, [])
    plan = engine.plan_domain(domain)
    installed = _installed_problems(paths, engine, domain.name)
    if plan is not None and meta_problems:
        from vnethook.plan import Plan

        plan = Plan(plan.domain, plan.forwards, plan.waiting, tuple(f"{p} (not forwarded)" for p in meta_problems)
                    + plan.errors, plan.addresses, plan.pending)
    if plan is None:
        for p in installed:
            sys.stderr.write(f"vnethook: {p}\n")
        if args.json:
            print(json.dumps({"domain": domain.name, "configured": False, "forwards": []}, indent=2))
        else:
            print(f"{domain.name}: not in the port map and no vnethook metadata; vnethook leaves it alone")
        return 1 if installed else 0
    if args.json:
        d = plan.to_dict()
        d["configured"] = True
        d["installed_problems"] = installed
        print(json.dumps(d, indent=2))
        return 0
    print(_plan_table(plan))
    for p in installed:
        print(f"  installed: {p}")
    return 1 if plan.errors or installed else 0


def _installed_problems(paths, engine, name: str) -> list:
    """What is wrong with the forwards installed now: a removal still
    pending, or a DNAT to an address dnsmasq has leased to another MAC."""
    from vnethook import state
    from vnethook.keys import guest_key

    key = guest_key(name)
    out = []
    if state.removal(paths, key) is not None:
        out.append(f"{name}: a removal of its forwards failed and is pending (run `vnethook sync`)")
    for c in engine.lease_conflicts(state.forwards_of(state.read(paths, key))):
        out.append(c + " (run `vnethook sync`)")
    return out


def _plan_table(plan) -> str:
    lines = [f"{plan.domain}:"]
    for mac, addr, how in plan.addresses:
        lines.append(f"  address {addr} for {mac} (from {how})")
    rows = [("PROTO", "HOST", "GUEST", "SOURCES", "FROM")]
    for f in plan.forwards:
        host, guest = f.describe().split(" -> ")
        guest = guest.split("/")[0]
        rows.append((f.protocol, host, guest, ",".join(f.sources) or "any", f.origin))
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    else:
        lines.append("  no forwards can be placed yet")
    if plan.pending:
        from vnethook.plan import describe_rule

        for rule, fam, why in plan.pending:
            lines.append(f"  pending  {describe_rule(rule, fam)}  ({rule.origin}): {why}")
    for w in plan.waiting:
        lines.append(f"  waiting: {w}")
    for e in plan.errors:
        lines.append(f"  error: {e}")
    return "\n".join(lines)


def _status(args) -> int:
    from vnethook.engine import Engine
    from vnethook.paths import get_paths

    paths = get_paths()
    config = _load(paths)
    st = Engine(paths, config).status()
    if config is None:
        st["problems"].insert(0, "the port map is invalid (see `vnethook check`)")
    from vnethook.firewalld import strict_problem

    strict = strict_problem(use_bus=True)
    if strict:
        st["problems"].insert(0, strict)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(_status_text(st))
    bad = st["problems"] or any(g["drift"] or g["errors"] for g in st["guests"])
    return 1 if bad else 0


def _status_text(st) -> str:
    b = st["backend"]
    lines = [f"firewall backend: {b['name']} ({b['reason']})"]
    for p in st["problems"]:
        lines.append(f"problem: {p}")
    for w in st.get("warnings", ()):
        lines.append(w)
    if not st["guests"]:
        lines.append("no guests with forwards")
    for g in st["guests"]:
        state = "running" if g["running"] else "not running"
        addrs = ", ".join(f"{a} ({how})" for _, a, how in g["addresses"]) or "no address"
        lines.append(f"\n{g['domain']} [{state}] {addrs}")
        blocked = bool(st.get("path_problems"))
        for f in g["desired"]:
            mark = ("BLOCKED" if blocked else "ok") if f in g["installed"] else "MISSING"
            lines.append(f"  {mark:8} {f}")
        for f in g["installed"]:
            if f not in g["desired"]:
                lines.append(f"  {'EXTRA':8} {f}")
        for w in g["waiting"]:
            lines.append(f"  waiting: {w}")
        for e in g["errors"]:
            lines.append(f"  error: {e}")
        for d in g["drift"]:
            lines.append(f"  drift: {d}")
    return "\n".join(lines)


def _doctor(args) -> int:
    from vnethook.doctor import main
    from vnethook.paths import get_paths

    return main(get_paths(), args.domain, args.port)


def _sync(args) -> int:
    from vnethook.engine import Engine
    from vnethook.paths import get_paths

    paths = get_paths()
    config = _load(paths)
    if config is None:
        return 1
    report = Engine(paths, config).sync(verify=not args.no_verify)
    for name in report.applied:
        print(f"updated {name}")
    for name in report.removed:
        print(f"removed {name}")
    for why in report.waiting.values():
        for w in why:
            print(f"waiting: {w}")
    for p in report.problems:
        sys.stderr.write(f"vnethook: sync: not forwarded: {p}\n")
    for e in report.errors:
        sys.stderr.write(f"vnethook: sync: {e}\n")
    print(f"sync: {len(report.applied)} updated, {len(report.removed)} removed, {report.unchanged} unchanged")
    return 1 if report.errors else 0


def _flush(args) -> int:
    from vnethook.config import ConfigError, load_config
    from vnethook.engine import Engine
    from vnethook.paths import get_paths

    paths = get_paths()
    try:
        config = load_config(paths)
    except ConfigError:
        config = None  # flushing must work with a broken map too
    from vnethook.watch import stop_watcher

    if stop_watcher(paths):
        print("stopped the lease watcher")
    done = Engine(paths, config).flush()
    print(f"flushed vnethook's rules from: {', '.join(done) or 'nothing'}")
    return 0


def _install(args) -> int:
    from vnethook.install import install

    return install(root=args.root, force=args.force, mode=args.mode, reload=not args.no_reload)


def _uninstall(args) -> int:
    from vnethook.install import uninstall

    return uninstall(root=args.root, reload=not args.no_reload)


def _watch(args) -> int:
    from vnethook.paths import get_paths
    from vnethook.watch import run

    return run(get_paths(), interval=args.interval, idle_exit=args.idle_exit, max_seconds=args.max_seconds,
               repair_every=args.repair_every)


def _firewalld_listen(args) -> int:
    from vnethook.firewalld import NoDBus, listen
    from vnethook.paths import get_paths

    try:
        return listen(get_paths(), initial=True)
    except NoDBus as e:
        sys.stderr.write(f"vnethook: firewalld-listen: {e}\n")
        return 1


def _publish(args) -> int:
    from vnethook.paths import get_paths
    from vnethook.publish import publish

    return publish(get_paths(), args.domain, args.specs, to_map=args.map)


def _unpublish(args) -> int:
    from vnethook.paths import get_paths
    from vnethook.publish import publish

    return publish(get_paths(), args.domain, args.specs, to_map=args.map, remove=True)


def _ports(args) -> int:
    from vnethook.paths import get_paths
    from vnethook.publish import ports

    return ports(get_paths(), args.domain, as_json=args.json)


def _hook(args) -> int:
    from vnethook.hook import main as hook_main

    return hook_main(args.kind, ["hook"] + list(args.args))
