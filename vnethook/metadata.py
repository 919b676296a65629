"""Ports declared with the guest: a vnethook element in the domain's <metadata>.

    <metadata>
      <vnethook:ports xmlns:vnethook="http://vnethook.org/xmlns/ports/1.0"
                      address="192.0.2.60" interface="52:54:00:aa:bb:02">
        <vnethook:forward>8080:80</vnethook:forward>
        <vnethook:forward host_port="2222" guest_port="22" protocol="tcp">
          <vnethook:source>198.51.100.0/24</vnethook:source>
        </vnethook:forward>
      </vnethook:ports>
    </metadata>

Why it is built this way:

- The metadata travels with the guest (migrate, save/restore, dumpxml |
  define); the YAML map stays the host's. So the host wins: a guest option
  the YAML sets is the YAML's, and a metadata forward that overlaps a YAML
  forward is refused. Between two guests' metadata, the guest that was
  running first keeps the port (libvirt's domain id: lower started first;
  at hook time the guest being started is always the newcomer).
- Every value is judged by the YAML validator's own checks (config.check_*),
  so a port, an address or a short form means the same, and is worded the
  same, in both places. Only the placing differs: problems read
  `domain NAME: metadata line L: <vnethook:forward>: MESSAGE`, L being the
  line in the XML as it was given (the hook's stdin, or the file read).
- The hook never calls libvirt: the guest's own XML is its stdin, the other
  running guests' are their status files (/run/libvirt/qemu/NAME.xml). The
  XML is read with pyexpat (no lxml on the hook path), only when the
  namespace's bytes occur in it at all; a DOCTYPE or an entity declaration
  (libvirt never writes one) refuses the metadata rather than expanding.
- A broken forward refuses that forward only (the others of the guest
  still apply); on_error: block turns any problem of a guest's metadata
  into a refused start of that guest only.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple

import os

from vnethook.hook import METADATA_NS
from vnethook.model import Value

NS = METADATA_NS.decode("ascii")
PREFIX = "vnethook"
KEY = "vnethook"  # virsh metadata --key
PORTS_ATTRS = ("address", "interface", "allow_outside_network")
FORWARD_ATTRS = ("host_port", "guest_port", "protocol", "host_address")
MAX_DEPTH = 100  # libvirt's domain XML needs ~8
_OUR_FAMILY = "http://vnethook.org/xmlns/"
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class Metadata(Value):
    """What one domain's XML says in the vnethook namespace (valid parts only)."""

    domain: str
    domain_id: Optional[int]  # libvirt's id of a running domain; None when defined only
    source: str  # where the XML was read: "stdin" or a file
    line: int  # of <vnethook:ports>
    addresses: Tuple[str, ...]
    interface: Optional[str]
    allow_outside_network: bool
    forwards: tuple  # (config.PortRule, line), in document order
    problems: Tuple[str, ...]  # located messages, see where()


def where(domain: str, line: int, element: str = "") -> str:
    """The place of a problem: `domain NAME: metadata line L: <vnethook:E>`."""
    at = f"domain {domain}: metadata line {line}" if line else f"domain {domain}: metadata"
    return f"{at}: <{PREFIX}:{element}>" if element else at


def origin(domain: str, line: int) -> str:
    """A metadata forward's origin, as a YAML forward's is `file:line`."""
    return f"domain {domain} metadata line {line}"


def has_metadata(data) -> bool:
    return METADATA_NS in (data or b"")


# ------------------------------------------------------------------ reading
class _El:
    __slots__ = ("local", "attrs", "line", "text", "children")

    def __init__(self, local, attrs, line):
        self.local = local
        self.attrs = attrs
        self.line = line
        self.text: list = []
        self.children: list = []


class _Refused(Exception):
    pass


def read(data, domain: "Optional[str]" = None, source: str = "stdin") -> "Optional[Metadata]":
    """The vnethook metadata of a domain XML (<domain> or a <domstatus>
    status file), or None if it has none. Never raises for bad input: the
    problems are in the result.

    `domain`: the name to report (the hook's argv); otherwise <name>."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if not data or METADATA_NS not in data:
        return None
    import pyexpat

    p = pyexpat.ParserCreate(None, "}")
    p.buffer_text = True
    stack: list = []  # local names (qualified) of the open elements
    found: dict = {"name": None, "id": None, "ports": [], "foreign": []}
    cur: list = []  # the open elements inside <vnethook:ports>, or None for skipped ones
    name_text: list = []

    def refuse(*_args):
        raise _Refused()

    def start(tag, attrs):
        depth = len(stack)
        if depth >= MAX_DEPTH:
            raise _Refused("nesting")
        stack.append(tag)
        if cur:
            top = cur[-1]
            if top is None:
                cur.append(None)
                return
            el = _El(tag, attrs, p.CurrentLineNumber)
            top.children.append(el)
            cur.append(el)
            return
        path = stack
        dom_depth = 0 if path[0] == "domain" else 1 if path[0] == "domstatus" else -1
        if dom_depth < 0:
            return
        if depth == dom_depth and tag == "domain":
            i = attrs.get("id")
            found["id"] = int(i) if i and i.isascii() and i.isdigit() and len(i) < 10 else None
        elif depth == dom_depth + 2 and path[dom_depth] == "domain" and path[dom_depth + 1] == "metadata":
            ns, _, local = tag.rpartition("}")
            if ns == NS and local == "ports":
                el = _El(tag, attrs, p.CurrentLineNumber)
                found["ports"].append(el)
                cur.append(el)
            elif ns == NS or ns.startswith(_OUR_FAMILY):
                found["foreign"].append((ns, local, p.CurrentLineNumber))

    def end(tag):
        stack.pop()
        if cur:
            cur.pop()

    def chars(text):
        if cur and cur[-1] is not None:
            cur[-1].text.append(text)
        elif len(stack) >= 2 and stack[-1] == "name" and stack[-2] == "domain" and len(stack) <= 3:
            name_text.append(text)

    p.StartElementHandler = start
    p.EndElementHandler = end
    p.CharacterDataHandler = chars
    p.StartDoctypeDeclHandler = refuse
    p.EntityDeclHandler = refuse
    p.ExternalEntityRefHandler = refuse
    p.SkippedEntityHandler = refuse
    p.UnparsedEntityDeclHandler = refuse
    p.NotationDeclHandler = refuse
    name = domain
    try:
        p.Parse(data, True)
    except _Refused as e:
        who = name or "?"
        if e.args:
            why = f"nesting deeper than {MAX_DEPTH} levels (expected libvirt's domain XML)"
        else:
            why = "the domain XML has a DOCTYPE or entity declaration (refused: libvirt never writes one)"
        return _broken(who, source, f"{where(who, 0)}: {why}")
    except (pyexpat.ExpatError, ValueError) as e:
        who = name or "?"
        line = getattr(e, "lineno", 0) or 0
        code = getattr(e, "code", None)
        msg = pyexpat.ErrorString(code) if code else str(e)
        return _broken(who, source, f"{where(who, line)}: not well-formed XML ({msg})")
    if name is None:
        name = "".join(name_text) or "?"
    problems: list = []
    for ns, local, line in found["foreign"]:
        if ns == NS:
            problems.append(f"{where(name, line, local)}: unknown element (expected <{PREFIX}:ports>)")
        else:
            problems.append(f"{where(name, line)}: namespace '{ns}' is not supported (expected {NS})")
    ports = found["ports"]
    if not ports:
        if not problems:
            return None
        return Metadata(name, found["id"], source, 0, (), None, False, (), tuple(problems))
    for extra in ports[1:]:
        problems.append(f"{where(name, extra.line, 'ports')}: a second <{PREFIX}:ports> (expected one; "
                        f"the first is at line {ports[0].line})")
    return _validate(name, found["id"], source, ports[0], problems)


def _broken(name, source, message) -> Metadata:
    return Metadata(name, None, source, 0, (), None, False, (), (message,))


def _local(el) -> str:
    ns, _, local = el.local.rpartition("}")
    return local if ns == NS else el.local.replace("}", ":") if ns else el.local


def _unknown_element(el, want: str) -> str:
    ns, _, local = el.local.rpartition("}")
    if not ns and local == want:
        return f"element <{local}> has no namespace (expected <{PREFIX}:{want}>, with the {PREFIX} prefix)"
    if ns and ns != NS:
        return f"element <{local}> is in namespace '{ns}' (expected <{PREFIX}:{want}> in {NS})"
    return f"unknown element <{PREFIX}:{local}> (expected <{PREFIX}:{want}>)" if ns else \
        f"unknown element <{local}> (expected <{PREFIX}:{want}>)"


def _unknown_attr(key, known, report) -> None:
    from vnethook.config import _one_of, _suggest

    if "}" in key:
        report(f"unknown attribute '{key.rpartition('}')[2]}' in namespace '{key.rpartition('}')[0]}'"
               f" (expected plain attributes: {_one_of(known)})")
        return
    hint = _suggest(key, known)
    if hint:
        report(f"unknown attribute '{key}' (did you mean '{hint}'?)")
    else:
        report(f"unknown attribute '{key}' (expected one of: {_one_of(known)})")


def _validate(name: str, dom_id, source: str, ports: _El, problems: list) -> Metadata:
    from vnethook import config as c

    def reporter(el, element):
        return lambda m: problems.append(f"{where(name, el.line, element)}: {m}")

    report = reporter(ports, "ports")
    addresses: tuple = ()
    interface = None
    allow = False
    for key, value in ports.attrs.items():
        if key not in PORTS_ATTRS:
            _unknown_attr(key, PORTS_ATTRS, report)
        elif key == "address":
            items = value.replace(",", " ").split()
            if not items:
                report("empty 'address' (expected one IPv4 and/or one IPv6 address, separated by a space)")
            out: dict = {}
            for item in items:
                c.check_guest_address(item, out, report)
            addresses = tuple(out[v] for v in (4, 6) if v in out)
        elif key == "interface":
            if not value.strip():
                report("'interface' is empty (expected a MAC address or a libvirt network name)")
            else:
                interface = c.check_interface(value, report)
        else:
            v = value.strip().lower()
            if v in _TRUE or v in _FALSE:
                allow = v in _TRUE
            else:
                report(f"'allow_outside_network' is '{value}' (expected true or false)")
    if "".join(ports.text).strip():
        report(f"text '{_short(''.join(ports.text))}' directly in <{PREFIX}:ports> (expected only <{PREFIX}:forward> elements)")
    forwards = []
    for el in ports.children:
        if el.local != NS + "}forward":
            reporter(el, "ports")(_unknown_element(el, "forward"))
            continue
        rule = _forward(name, el, problems, reporter)
        if rule is not None:
            forwards.append((rule, el.line))
    return Metadata(name, dom_id, source, ports.line, addresses, interface, allow, tuple(forwards), tuple(problems))


def _short(text: str) -> str:
    t = " ".join(text.split())
    return t if len(t) <= 40 else t[:37] + "..."


def _forward(name: str, el: _El, problems: list, reporter):
    from vnethook import config as c

    before = len(problems)
    report = reporter(el, "forward")
    text = "".join(el.text).strip()
    sources_el = []
    for child in el.children:
        if child.local == NS + "}source":
            sources_el.append(child)
        else:
            report(_unknown_element(child, "source"))
    if text and (el.attrs or sources_el):
        report(f"both a short form '{_short(text)}' and attributes or sources (expected either"
               f" <{PREFIX}:forward>8080:80</{PREFIX}:forward> or host_port=\"...\" attributes)")
        return None
    if text:
        parsed = c.parse_short(text, report)
    elif el.attrs or sources_el:
        parsed = _forward_long(el, sources_el, report, reporter)
    else:
        report("empty forward (expected a short form like 8080:80, or host_port=\"...\" attributes)")
        return None
    if parsed is None or len(problems) != before:
        return None
    proto, host, hp, gp, sources = parsed
    return c.PortRule(proto, host, hp, gp, sources, origin(name, el.line))


def _forward_long(el: _El, sources_el: list, report, reporter):
    from vnethook import config as c

    fields = {}
    for key, value in el.attrs.items():
        if key == "source":
            report(f"'source' is an element here (expected <{PREFIX}:source>198.51.100.0/24</{PREFIX}:source>"
                   " inside the forward, one per address or network)")
        elif key not in FORWARD_ATTRS:
            _unknown_attr(key, FORWARD_ATTRS, report)
        else:
            fields[key] = value
    if "host_port" not in fields:
        report("forward is missing 'host_port' (expected e.g. host_port=\"2222\" guest_port=\"22\")")
        hp = None
    else:
        hp = c.check_ports(fields["host_port"], "host", report)
    gp = c.check_ports(fields["guest_port"], "guest", report) if "guest_port" in fields else hp
    proto = "tcp"
    if "protocol" in fields:
        if fields["protocol"].strip():
            proto = c.check_protocol(fields["protocol"], report)
        else:
            report(f"'protocol' is empty (expected one of: {c._one_of(c.PROTOCOLS)})")
    host = None
    if "host_address" in fields:
        value = fields["host_address"].strip()
        if value.startswith("[") and value.endswith("]"):
            value = value[1:-1]
        if value:
            host = c.check_host_address(value, report)
        else:
            report("'host_address' is empty (expected an IPv4 or IPv6 address)")
    sources: list = []
    for s in sources_el:
        sreport = reporter(s, "source")
        for key in s.attrs:
            sreport(f"unknown attribute '{key}' (expected none)")
        for child in s.children:
            sreport(f"unknown element <{_local(child)}> (expected an address or a network as text)")
        text = "".join(s.text).strip()
        if not text:
            sreport("empty source (expected an address or a network like 198.51.100.0/24)")
            continue
        net = c.check_source(text, host, sreport)
        if net is not None and net not in sources:
            sources.append(net)
    if hp and gp:
        c.check_same_length(hp, gp, report)
    return proto, host, hp, gp, tuple(sources)


# ------------------------------------------------------------ running guests
def running(paths, exclude: "Optional[str]" = None, errors: "Optional[List[str]]" = None) -> "List[Metadata]":
    """The metadata of every running guest that has any (status files)."""
    return _read_dir(paths.running_domains_dir, exclude, errors)


def defined(paths) -> "List[Metadata]":
    """The metadata of every persistent definition (/etc/libvirt/qemu/*.xml)."""
    return _read_dir(os.path.join(paths.libvirt_etc, "qemu"), None, None)


def _read_dir(directory: str, exclude: "Optional[str]", errors: "Optional[List[str]]") -> "List[Metadata]":
    """The metadata in every domain XML file of `directory` (an unreadable
    file is skipped, and said in `errors` when given)."""
    from vnethook.libvirt import LibvirtDataError, _read_file, xml_files

    out = []
    for path in xml_files(directory):
        if os.path.basename(path)[:-4] == exclude:
            continue
        try:
            data = _read_file(path)
        except LibvirtDataError as e:
            if errors is not None:
                errors.append(str(e))
            continue
        md = read(data, source=path)
        if md is not None and md.domain != exclude:
            out.append(md)
    return out


# -------------------------------------------------------------------- merge
def merge(cfg, metas, current: "Optional[str]" = None) -> "Tuple[object, Dict[str, List[str]]]":
    """One map from two sources: (Config, {domain: [problems]}).

    Forwards are the union of the YAML's and the metadata's; address and
    interface are the YAML's when it sets them, else the metadata's;
    allow_outside_network is true if either says so. A metadata forward
    that overlaps a forward placed before it is refused: the YAML's come
    first, then the guests' metadata in order of precedence (running
    before defined, lower libvirt domain id first; `current`, the guest
    being started, last), each in document order. The problems include
    each guest's own metadata problems (invalid forwards, already skipped).
    """
    from vnethook import config as c

    cfg = getattr(cfg, "_yaml", cfg)  # merging twice starts from the YAML again
    problems: Dict[str, List[str]] = {}
    if not metas:
        return cfg, problems
    order = sorted(metas, key=lambda m: (m.domain == current, m.domain_id is None, m.domain_id or 0, m.domain))
    seen = set()
    n_yaml = sum(len(g.forwards) for g in cfg.guests.values())  # the YAML's orders come first
    rules: list = [None] * n_yaml
    merged: dict = {}
    meta_rules: dict = {}  # sweep order -> (domain, line)
    for md in order:
        if md.domain in seen:
            continue  # one definition per guest (the caller's first)
        seen.add(md.domain)
        probs = problems.setdefault(md.domain, [])
        probs.extend(md.problems)
        y = cfg.guests.get(md.domain)
        addresses = y.addresses if y is not None and y.addresses else md.addresses
        interface = y.interface if y is not None and y.interface else md.interface
        allow = (y is not None and y.allow_outside_network) or md.allow_outside_network
        fams = c.families_of(addresses)
        for rule, line in md.forwards:
            report = lambda m, line=line, d=md.domain: problems[d].append(f"{where(d, line, 'forward')}: {m}")  # noqa: E731
            if not c.check_family_fit(rule, md.domain, addresses, report):
                continue
            meta_rules[len(rules)] = (md.domain, line)
            rules.append(c.sweep_rule(rule, md.domain, len(rules), fams, rule.origin))
        merged[md.domain] = (y, addresses, interface, allow, md)
    # Keep the rules in order of precedence, each only if it overlaps none kept before it.
    claims = c.Claims()
    for r in _yaml_near(c, cfg, [rules[i] for i in meta_rules]):
        claims.add(r)  # the YAML's: valid, so free of overlaps among themselves
    refused = set()
    for i in sorted(meta_rules):
        first = claims.holder(rules[i])
        if first is None:
            claims.add(rules[i])
            continue
        refused.add(i)
        d, line = meta_rules[i]
        problems[d].append(f"{where(d, line, 'forward')}: {c.conflict_message(rules[i], first)}")
    guests = dict(cfg.guests)
    kept: Dict[str, list] = {}
    for i, (d, _line) in meta_rules.items():
        if i not in refused:
            kept.setdefault(d, []).append(rules[i].rule)
    for d, (y, addresses, interface, allow, md) in merged.items():
        extra = tuple(kept.get(d, ()))
        guests[d] = c.GuestConfig(
            d, tuple(addresses), interface, bool(allow), (y.forwards if y is not None else ()) + extra,
            y.origin if y is not None else origin(d, md.line),
        )
    for d in list(problems):
        if not problems[d]:
            del problems[d]
    out = c.Config(cfg.settings, guests, cfg.files)
    object.__setattr__(out, "_yaml", cfg)
    return out, problems


def _yaml_near(c, cfg, candidates) -> list:
    """The YAML's forwards (as sweep rules, in map order) that share a
    protocol and a host port with some candidate: the only ones that can
    conflict. A hook checking one guest's few forwards against a map of
    thousands builds a handful of them, not thousands."""
    import bisect

    spans: dict = {}
    for r in candidates:
        spans.setdefault(r.rule.protocol, []).append(r.rule.host_ports)
    index = {}
    for proto, ps in spans.items():
        ps.sort()
        reach, top = [], 0
        for _lo, hi in ps:
            top = max(top, hi)
            reach.append(top)  # the highest port covered by the spans up to here
        index[proto] = ([lo for lo, _ in ps], reach)
    out = []
    order = 0
    for g in cfg.guests.values():
        fams = None
        for r in g.forwards:
            ix = index.get(r.protocol)
            if ix is not None:
                i = bisect.bisect_right(ix[0], r.host_ports[1]) - 1  # the last span starting at or below hi
                if i >= 0 and ix[1][i] >= r.host_ports[0]:
                    fams = fams or c.families_of(g.addresses)
                    out.append(c.sweep_rule(r, g.name, order, fams, r.origin))
            order += 1
    return out


def for_guest(paths, cfg, name: str, data) -> "Tuple[object, List[str]]":
    """The hook's view: the map with `name`'s metadata (from its XML, `data`)
    checked against the YAML and the metadata of the other running guests.
    Returns (Config, the problems of this guest's metadata)."""
    md = read(data, name, source="stdin")
    if md is None:
        return cfg, []
    merged, problems = merge(cfg, running(paths, exclude=name) + [md], current=name)
    return merged, problems.get(name, [])
