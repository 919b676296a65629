"""`vnethook doctor [DOMAIN [PORT]]`: walk a forward's path one check at a time.

`status` answers "is everything fine?"; doctor answers "why does my port
not answer?" for one guest (or all), in the order a connection meets the
pieces: the map, the guest and its address, vnethook's rules, libvirt's
and every other manager's filters, the kernel's switches. Each check prints
`ok` or `FAIL` with what to do. It reads only; nothing is changed.
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import List, Optional, Tuple


class Report:
    def __init__(self) -> None:
        self.lines: "List[str]" = []
        self.failed = 0

    def ok(self, what: str) -> None:
        self.lines.append(f"ok    {what}")

    def fail(self, what: str, fix: str) -> None:
        self.failed += 1
        self.lines.append(f"FAIL  {what}")
        self.lines.append(f"      fix: {fix}")

    def note(self, what: str) -> None:
        self.lines.append(f"note  {what}")


def _sysctl(path: str) -> "Optional[str]":
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def run(paths, domain_name: "Optional[str]" = None, port: "Optional[int]" = None) -> "Tuple[int, List[str]]":
    from vnethook import libvirt, state
    from vnethook.config import ConfigError, load_config
    from vnethook.engine import Engine
    from vnethook.model import guest_key

    r = Report()
    try:
        config = load_config(paths)
        r.ok(f"the port map is valid ({len(config.guests)} guest(s))")
    except ConfigError as e:
        r.fail(f"the port map is invalid: {e.problems[0] if e.problems else e}", "vnethook check; fix the lines it names")
        return 1, r.lines
    engine = Engine(paths, config)
    try:
        engine.running_configured()  # with the ports running guests declare in their metadata
        config = engine.config
    except Exception as e:
        r.fail(f"cannot read the running domains: {e}", "run as root")
    for d, probs in sorted(engine.metadata_problems.items()):
        if domain_name is None or d == domain_name:
            for p in probs:
                r.fail(f"{p} (not forwarded)", "fix the guest's metadata (virsh metadata / virsh edit)")
    names = [domain_name] if domain_name else sorted(config.guests)
    if domain_name and domain_name not in config.guests:
        r.fail(f"{domain_name} is not in the port map nor has vnethook metadata",
               f"add it under guests: in {paths.config}, or publish ports in its metadata")
        return 1, r.lines
    try:
        name, why = engine.selected_backend(redetect=True)
        r.ok(f"firewall backend {name} ({why})")
        snap = engine.backend().snapshot()
    except Exception as e:
        r.fail(f"cannot use the firewall: {e}", "run as root; install iptables/nftables as the error says")
        return 1, r.lines
    if snap.base_ok:
        r.ok("vnethook's base chains and jumps are in place, in order")
    else:
        for p in snap.problems:
            r.fail(f"base: {p}", "vnethook sync (and look for what moved or removed it)")
    checked = 0
    fams = {4}
    for n in names:
        dom = libvirt.running_domain(paths, n)
        if dom is None:
            if domain_name:
                r.fail(f"{n} is not running", f"virsh start {n}")
            continue
        r.ok(f"{n} is running")
        plan = engine.plan_domain(dom)
        for mac, addr, how in plan.addresses:
            r.ok(f"{n}: address {addr} for {mac} (from {how})")
        for _rule, _fam, why in plan.pending:
            r.fail(f"{n}: a forward is pending: {why}",
                   "wait for the guest's DHCP lease, or set `address:` in the map")
        for err in plan.errors:
            r.fail(f"{n}: {err}", "fix the map entry it names")
        rec = state.read(paths, guest_key(n))
        want = [f for f in plan.forwards if port is None or f.host_ports[0] <= port <= f.host_ports[1]]
        if port is not None and not want and not plan.pending:
            r.fail(f"{n}: no forward of the map uses host port {port}", "vnethook plan " + n)
        have = set(state.forwards_of(rec))
        live = snap.guests.get(guest_key(n), set())
        for f in want:
            checked += 1
            fams.add(f.family)
            if f not in have:
                r.fail(f"{n}: {f.describe()} is not installed", "vnethook sync")
            elif rec is not None and (engine.recorded_rules(guest_key(n), rec) or set()) - live:
                r.fail(f"{n}: {f.describe()}: rules recorded but missing from the firewall", "vnethook sync")
            else:
                r.ok(f"{n}: {f.describe()} installed")
            if f.is_loopback and _sysctl(f"/proc/sys/net/ipv4/conf/{f.bridge}/route_localnet") != "1":
                r.fail(f"{n}: route_localnet is off on {f.bridge} (a 127.0.0.1 forward needs it)", "vnethook sync")
    for fam, path in ((4, "/proc/sys/net/ipv4/ip_forward"), (6, "/proc/sys/net/ipv6/conf/all/forwarding")):
        v = _sysctl(path)
        if v == "0" and fam in fams:
            r.fail(f"{path} is 0: the host forwards nothing", "start the libvirt network (it turns forwarding on)")
        elif v == "1" and fam in fams:
            r.ok(f"{path} is 1")
    others = engine.manager_problems()
    for p in others:
        r.fail(p, "vnethook sync; if it stays, the named rule belongs to another manager: allow the "
                  "DNATed traffic there, or remove the rule")
    if not others:
        r.ok("no other manager's FORWARD chain drops the forwarded connections")
    if _sysctl("/proc/sys/net/bridge/bridge-nf-call-iptables") == "1":
        r.note("br_netfilter is loaded (bridge-nf-call-iptables=1): guest-to-guest traffic on a bridge "
               "also passes the iptables FORWARD chains")
    from vnethook.listeners import host_listeners, taken

    for w in taken([rule for g in config.guests.values() for rule in g.forwards
                    if domain_name is None or g.name == domain_name], host_listeners()):
        r.note(w)
    if checked == 0 and not r.failed:
        r.note("no installed forward to check (is the guest running and in the map?)")
    return (1 if r.failed else 0), r.lines


def main(paths, domain_name=None, port=None) -> int:
    rc, lines = run(paths, domain_name, port)
    print("\n".join(lines))
    return rc

