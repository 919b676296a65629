"""`vnethook publish`, `unpublish` and `ports`: a guest's ports by hand.

These run outside the hook, so they may ask libvirt (virsh, argv lists
only). publish/unpublish change the guest's metadata (vnethook/metadata.py)
with `virsh metadata --live --config` (--config alone when the guest is
not running), or with --map a drop-in `ports.d/DOMAIN.yaml` of the map;
then they apply the change to a running guest at once through the same
sync the hooks and the timer use, and say what is reachable now.

Nothing is written that would not validate: a spec is judged by the
map's own short-form check, and a new forward that the merge would refuse
(a conflict with the YAML or another guest's metadata) is refused here
first, naming the other place.
"""

from __future__ import annotations

import os
import subprocess
import sys

from vnethook import metadata
from vnethook.config import ConfigError, PortRule, load_config, parse_short


class PublishError(Exception):
    """A reason to change nothing; the message says what and where."""


def _rules(specs, verb: str) -> list:
    out = []
    problems = []
    for spec in specs:
        msgs: list = []
        parsed = parse_short(spec, msgs.append)
        if parsed is None or msgs:
            problems += [f"vnethook: {verb}: '{spec}': {m}" for m in msgs]
            continue
        proto, host, hp, gp, _ = parsed
        out.append(PortRule(proto, host, hp, gp, (), f"command line '{spec}'"))
    if problems:
        raise PublishError("\n".join(problems))
    return out


def spec_of(rule) -> str:
    """A rule as the short form (sources, which it cannot say, are left to the caller)."""
    hp = f"{rule.host_ports[0]}" if rule.host_ports[0] == rule.host_ports[1] else "%d-%d" % rule.host_ports
    gp = f"{rule.guest_ports[0]}" if rule.guest_ports[0] == rule.guest_ports[1] else "%d-%d" % rule.guest_ports
    host = ""
    if rule.host_address:
        host = f"[{rule.host_address}]:" if ":" in rule.host_address else f"{rule.host_address}:"
    return f"{host}{hp}:{gp}/{rule.protocol}"


def _same(a, b) -> bool:
    return (a.protocol, a.host_address, tuple(a.host_ports), tuple(a.guest_ports), tuple(a.sources)) == \
        (b.protocol, b.host_address, tuple(b.host_ports), tuple(b.guest_ports), tuple(b.sources))


# ------------------------------------------------------------------ virsh
def _virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run(["virsh", "-q", *args], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise PublishError("vnethook: virsh not found (install libvirt-clients)") from None
    except subprocess.TimeoutExpired:
        raise PublishError(f"vnethook: virsh {' '.join(args[:2])} did not answer in 120 s") from None
    if check and cp.returncode != 0:
        raise PublishError(f"vnethook: virsh {' '.join(args[:2])}: {cp.stderr.strip() or 'failed'}")
    return cp


def _running(domain: str) -> bool:
    state = _virsh("domstate", domain).stdout.strip()
    return state in ("running", "paused", "in shutdown", "pmsuspended")


def _get(domain: str, scope: str) -> str:
    """The plain XML libvirt keeps for our namespace (no prefix), or ''."""
    cp = _virsh("metadata", domain, "--uri", metadata.NS, scope, check=False)
    if cp.returncode != 0:
        if "not present" in cp.stderr or "not found" in cp.stderr.lower():
            return ""
        raise PublishError(f"vnethook: virsh metadata {domain}: {cp.stderr.strip() or 'failed'}")
    return cp.stdout.strip()


def _elements(plain: str):
    import xml.etree.ElementTree as ET

    if not plain:
        return ET.Element("ports")
    if "<!DOCTYPE" in plain or "<!ENTITY" in plain:
        raise PublishError("vnethook: the guest's metadata has a DOCTYPE or an entity declaration: refusing it")
    try:
        return ET.fromstring(plain)
    except ET.ParseError as e:
        raise PublishError(f"vnethook: the guest's metadata is not well-formed XML: {e}") from None


def _as_domain(domain: str, root) -> bytes:
    """The metadata as it would sit in the domain XML, for metadata.read."""
    import xml.etree.ElementTree as ET

    ET.indent(root, "  ")  # one element a line: the lines of existing forwards stay put
    inner = ET.tostring(root, encoding="unicode")
    inner = inner.replace("<ports", f'<ports xmlns="{metadata.NS}"', 1) if inner.startswith("<ports") else inner
    name = domain.replace("&", "&amp;").replace("<", "&lt;")
    return f"<domain>\n<name>{name}</name>\n<metadata>\n{inner}\n</metadata>\n</domain>\n".encode()


def _rule_of(domain: str, el):
    """The rule one <forward> element says, or None if it says none."""
    import copy
    import xml.etree.ElementTree as ET

    root = ET.Element("ports")
    child = copy.deepcopy(el)
    child.tail = None
    root.append(child)
    md = metadata.read(_as_domain(domain, root), domain)
    return md.forwards[0][0] if md is not None and md.forwards else None


def _problems_with(paths, cfg, domain: str, root) -> list:
    md = metadata.read(_as_domain(domain, root), domain)
    if md is None:
        return []
    others = metadata.running(paths, exclude=domain)
    _, problems = metadata.merge(cfg, others + [md], current=domain)
    return problems.get(domain, [])


# ----------------------------------------------------------------- commands
def publish(paths, domain: str, specs, to_map: bool = False, remove: bool = False) -> int:
    verb = "unpublish" if remove else "publish"
    try:
        rules = _rules(specs, verb)
        cfg = _map(paths)
        if to_map:
            changed = _edit_map(paths, domain, rules, remove)
        else:
            changed = _edit_metadata(paths, cfg, domain, rules, remove)
    except PublishError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    for line in changed:
        print(line)
    return _apply(paths, domain, rules, remove)


def _map(paths):
    try:
        return load_config(paths)
    except ConfigError as e:
        raise PublishError(f"{e}\nvnethook: the port map is invalid; nothing was changed") from None


def _edit_metadata(paths, cfg, domain: str, rules, remove: bool) -> list:
    import xml.etree.ElementTree as ET

    if "/" in domain or not domain:
        raise PublishError(f"vnethook: '{domain}' is not a domain name")
    scopes = (["--live"] if _running(domain) else []) + ["--config"]
    plain = {s: _get(domain, s) for s in scopes}
    out = []
    new_xml = {}
    missing = []
    for scope in scopes:
        root = _elements(plain[scope])
        before = _problems_with(paths, cfg, domain, root) if not remove else []
        for rule in rules:
            have = [el for el in root if el.tag == "forward" and (r := _rule_of(domain, el)) is not None and _same(r, rule)]
            if remove:
                for el in have:
                    root.remove(el)
                if not have:
                    missing.append(f"vnethook: unpublish: {domain} has no forward {spec_of(rule)} in its {scope[2:]} metadata")
            elif not have:
                ET.SubElement(root, "forward").text = spec_of(rule)
        if not remove:
            new = [p for p in _problems_with(paths, cfg, domain, root) if p not in before]
            if new:
                raise PublishError("vnethook: publish: refused, nothing was changed:\n" + "\n".join(new))
        for el in root.iter():
            el.tail = None if el is root else el.tail
        new_xml[scope] = _canonical(root)
    if missing and len(missing) == len(rules) * len(scopes):
        raise PublishError("\n".join(dict.fromkeys(missing)))
    for m in dict.fromkeys(missing):
        sys.stderr.write(f"{m}\n")
    empty = {s: not any(el.tag == "forward" for el in _elements(new_xml[s])) and not _elements(new_xml[s]).attrib
             for s in scopes}
    same = len(scopes) == 2 and new_xml["--live"] == new_xml["--config"] and plain["--live"] == plain["--config"]
    groups = [scopes] if same else [[s] for s in scopes]
    for group in groups:
        if empty[group[0]]:
            if plain[group[0]]:
                _virsh("metadata", domain, "--uri", metadata.NS, "--remove", *group)
        elif new_xml[group[0]] != _canonical(_elements(plain[group[0]])):
            _virsh("metadata", domain, "--uri", metadata.NS, "--key", metadata.KEY, "--set", new_xml[group[0]], *group)
    where = " and ".join(s[2:] for s in scopes)
    for rule in rules:
        out.append(f"{'unpublished' if remove else 'published'} {spec_of(rule)} "
                   f"{'from' if remove else 'in'} the {where} metadata of {domain}")
    return out


def _canonical(root) -> str:
    import xml.etree.ElementTree as ET

    for el in root.iter():
        if el is not root:
            el.tail = None
        if el.text is not None and not el.text.strip() and len(el):
            el.text = None
    return ET.tostring(root, encoding="unicode")


def _dropin(paths, domain: str) -> str:
    if not os.path.isdir(paths.config):
        raise PublishError(f"vnethook: --map needs the map to be a directory ({paths.config} is a file)")
    if not domain or "/" in domain or domain.startswith(".") or "\n" in domain:
        raise PublishError(f"vnethook: '{domain}' cannot name a drop-in file")
    return os.path.join(paths.config, "ports.d", f"{domain}.yaml")


def _edit_map(paths, domain: str, rules, remove: bool) -> list:
    from vnethook.paths import Paths

    path = _dropin(paths, domain)
    existing: list = []
    if os.path.exists(path):
        try:
            own = load_config(Paths(config=path, libvirt_root=paths.libvirt_root, state_dir=paths.state_dir))
        except ConfigError as e:
            raise PublishError(f"{e}\nvnethook: {path} is invalid; nothing was changed") from None
        if set(own.guests) - {domain} or own.settings != type(own.settings)():
            raise PublishError(f"vnethook: {path} holds more than {domain}'s forwards; edit it by hand")
        existing = list(own.guests[domain].forwards) if domain in own.guests else []
    out = []
    keep = list(existing)
    for rule in rules:
        found = [r for r in keep if _same(r, rule)]
        if remove:
            if not found:
                raise PublishError(f"vnethook: unpublish: {path} has no forward {spec_of(rule)} for {domain}"
                                   + _elsewhere(paths, domain, rule))
            keep = [r for r in keep if not _same(r, rule)]
            out.append(f"unpublished {spec_of(rule)} from {path}")
        elif not found:
            keep.append(rule)
            out.append(f"published {spec_of(rule)} in {path}")
        else:
            out.append(f"{spec_of(rule)} is already in {path}")
    old = None
    try:
        with open(path, "rb") as f:
            old = f.read()
    except FileNotFoundError:
        pass
    from vnethook.fsutil import atomic_write

    if keep:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        atomic_write(path, _render_yaml(domain, keep).encode(), 0o644)
    elif old is not None:
        os.unlink(path)
    try:
        load_config(paths)
    except ConfigError as e:
        if old is None:
            if os.path.exists(path):
                os.unlink(path)
        else:
            atomic_write(path, old, 0o644)
        raise PublishError(f"{e}\nvnethook: the map would be invalid with that change; nothing was changed") from None
    return out


def _elsewhere(paths, domain, rule) -> str:
    try:
        cfg = load_config(paths)
    except ConfigError:
        return ""
    g = cfg.guests.get(domain)
    for r in g.forwards if g else ():
        if _same(r, rule):
            return f" (it is at {r.origin}: edit that file)"
    return ""


def _render_yaml(domain: str, rules) -> str:
    import json

    lines = ["# Written by `vnethook publish --map`; `vnethook unpublish --map` edits it too.",
             "guests:", f"  {json.dumps(domain)}:"]
    for r in rules:
        if r.sources:
            long = {"host_port": _p(r.host_ports), "guest_port": _p(r.guest_ports), "protocol": r.protocol}
            if r.host_address:
                long["host_address"] = r.host_address
            lines.append("    - " + json.dumps({**long, "source": list(r.sources)}))
        else:
            lines.append(f"    - {json.dumps(spec_of(r))}")
    return "\n".join(lines) + "\n"


def _p(ports) -> str:
    return f"{ports[0]}" if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"


def _apply(paths, domain: str, rules, remove: bool) -> int:
    """Sync a running guest at once; say what is reachable now, and from where."""
    from vnethook import libvirt
    from vnethook.engine import Engine

    dom = libvirt.running_domain(paths, domain)
    if dom is None:
        print(f"{domain} is not running: {'the forwards go' if remove else 'the forwards apply'} at its next start")
        return 0
    try:
        cfg = load_config(paths)
    except ConfigError as e:
        sys.stderr.write(f"{e}\nvnethook: the port map is invalid; run `vnethook sync` once it is fixed\n")
        return 1
    engine = Engine(paths, cfg)
    report = engine.sync(verify=False)
    for err in report.errors:
        sys.stderr.write(f"vnethook: sync: {err}\n")
    plan = engine.plan_domain(dom)
    rc = 1 if report.errors else 0
    for p in engine.metadata_problems.get(domain, []):
        sys.stderr.write(f"vnethook: {p} (not forwarded)\n")
    if remove:
        left = [f for f in (plan.forwards if plan else ()) if any(_covers(r, f) for r in rules)]
        for f in left:
            sys.stderr.write(f"vnethook: still forwarded: {f.describe()} ({f.origin})\n")
            rc = 1
        if not left:
            print(f"no longer reachable: {', '.join(spec_of(r) for r in rules)}")
        return rc
    if plan is None:
        return rc
    for f in plan.forwards:
        if any(_covers(r, f) for r in rules):
            print(f"reachable now: {f.describe()} {_from(f)}")
    for rule, fam, why in plan.pending:
        if any(_same(rule, r) for r in rules):
            from vnethook.plan import describe_rule

            print(f"not yet: {describe_rule(rule, fam)}: {why} (the lease watcher adds it when the lease appears)")
    for err in plan.errors:
        sys.stderr.write(f"vnethook: {err}\n")
    return rc


def _covers(rule, f) -> bool:
    return (rule.protocol, tuple(rule.host_ports), tuple(rule.guest_ports)) == \
        (f.protocol, tuple(f.host_ports), tuple(f.guest_ports)) and rule.host_address == f.host_address


def _from(f) -> str:
    if f.is_loopback:
        return "(from this host only)"
    where = f"on {f.host_address}" if f.host_address else "on every host address"
    who = ", ".join(f.sources) if f.sources else "anywhere"
    return f"({where}, from {who})"


# -------------------------------------------------------------------- ports
def ports(paths, domain=None, as_json: bool = False) -> int:
    """Like `docker port`: each forward with where it was written and its state."""
    import json

    from vnethook import state
    from vnethook.engine import Engine
    from vnethook.keys import guest_key
    from vnethook.plan import describe_rule

    try:
        cfg = load_config(paths)
    except ConfigError as e:
        sys.stderr.write(f"{e}\nvnethook: the port map is invalid\n")
        return 1
    engine = Engine(paths, cfg)
    running = {d.name: d for d in engine.running_configured().values()}
    merged = engine.config
    defined = [m for m in metadata.defined(paths) if m.domain not in running]
    rows = []
    names = sorted(set(merged.guests) | {m.domain for m in defined})
    if domain is not None:
        if domain not in names:
            sys.stderr.write(f"vnethook: {domain} has no forwards (not in the map, no vnethook metadata)\n")
            return 1
        names = [domain]
    defined_by = {m.domain: m for m in defined}
    for name in names:
        g = merged.guests.get(name)
        dom = running.get(name)
        if dom is None:
            rules = list(g.forwards) if g else []
            if name in defined_by and (g is None or not any(r.origin.startswith("domain ") for r in rules)):
                rules += [r for r, _ in defined_by[name].forwards]
            for r in rules:
                fam = 6 if r.host_address and ":" in r.host_address else 4
                rows.append((name, describe_rule(r, fam), r.origin, "stopped"))
        else:
            plan = engine.plan_domain(dom)
            have = set(state.forwards_of(state.read(paths, guest_key(name))))
            for f in plan.forwards if plan else ():
                rows.append((name, f.describe(), f.origin, "active" if f in have else "not installed (vnethook sync)"))
            for r, fam, why in plan.pending if plan else ():
                rows.append((name, describe_rule(r, fam), r.origin, f"waiting: {why}"))
        for p in engine.metadata_problems.get(name, []) if dom is not None else ():
            rows.append((name, "-", p.split(": <", 1)[0].replace(f"domain {name}: metadata", f"domain {name} metadata"),
                         f"refused: {p.split('>: ', 1)[-1]}"))
    if as_json:
        print(json.dumps([{"domain": d, "forward": f, "origin": o, "state": s} for d, f, o, s in rows], indent=2))
        return 0
    if not rows:
        print("no forwards")
        return 0
    head = ("DOMAIN", "FORWARD", "ORIGIN", "STATE")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0
