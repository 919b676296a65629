"""Reading what libvirt tells a hook, and what it leaves in files.

The hook runs while libvirtd waits for it, so it must never call libvirt
(deadlock): everything comes from stdin (domain XML, network hookData) and
from libvirt's own files (/run/libvirt/{qemu,network}/*.xml status files,
dnsmasq's <bridge>.status leases, <network>.hostsfile). This module turns
those into small frozen dataclasses and nothing else: no firewall, no
config, no side effects.

All input is untrusted in the sense that it may be truncated, vanish
mid-read (libvirt rewrites these files by rename), or be garbage: every
failure is a LibvirtDataError naming the source (and line when known), or
an explicit "absent" (None / []), never another exception. lxml is imported
only when XML is actually parsed (the hook's fast paths skip it), with a
parser that resolves no entities, fetches nothing and refuses huge trees.

MACs are always lowercase `aa:bb:cc:dd:ee:ff`, whatever libvirt or a user
wrote, so comparisons anywhere else can be plain string equality.
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import os

from vnethook.model import Value

MAX_INPUT = 16 * 1024 * 1024  # far above any real libvirt XML or lease file
_METADATA_NS = b"http://vnethook.org/xmlns/ports/1.0"  # vnethook.hook.METADATA_NS


class LibvirtDataError(Exception):
    """libvirt data we cannot use; the message says what and where."""


class Interface(Value):
    mac: str  # lowercase aa:bb:cc:dd:ee:ff
    type: str  # network | bridge | direct | user | ...
    network: Optional[str]  # libvirt network name (type='network' only)
    bridge: Optional[str]  # known once the guest runs (start/started, status file)
    target: Optional[str]  # tap device, e.g. vnet0 (start/started, status file)
    portid: Optional[str]  # network port uuid (libvirt >= 5.5, running guests)


class Domain(Value):
    name: str
    uuid: Optional[str]
    interfaces: Tuple[Interface, ...]


class Subnet(Value):
    family: int  # 4 | 6
    address: str  # the host side, e.g. 192.0.2.1
    prefix: int
    cidr: str  # the network, e.g. 192.0.2.0/24


class Network(Value):
    name: str
    bridge: Optional[str]
    forward_mode: Optional[str]  # nat | route | open | bridge | ...; None = isolated
    subnets: Tuple[Subnet, ...]
    # Static DHCP reservations that name a MAC: (mac, ip). IPv4 in practice;
    # libvirt's IPv6 hosts are keyed by DUID or name, which cannot be tied
    # to a NIC without the guest, so those are left out.
    dhcp_hosts: Tuple[Tuple[str, str], ...]


class Port(Value):
    network: str
    owner: Optional[str]  # domain name
    owner_uuid: Optional[str]
    mac: str
    bridge: Optional[str]


class Lease(Value):
    ip: str
    mac: str
    expiry: int  # epoch seconds; 0 = never expires
    hostname: Optional[str]


# --------------------------------------------------------------- helpers
_CANONICAL_MAC = frozenset("0123456789abcdef:")


def normalize_mac(value: object) -> Optional[str]:
    """`52:54:00:AB:c:1` -> `52:54:00:ab:0c:01`; None if it is not a MAC."""
    if not isinstance(value, str):
        return None
    if len(value) == 17 and _CANONICAL_MAC.issuperset(value) and value.count(":") == 5 and \
            value[2::3] == ":::::":
        return value  # already canonical (what libvirt writes): the lease file has 1000s
    s = value.strip()
    parts = s.split(":") if ":" in s else s.split("-")
    if len(parts) != 6:
        return None
    out = []
    for p in parts:
        if not 1 <= len(p) <= 2 or any(c not in "0123456789abcdefABCDEF" for c in p):
            return None
        out.append(p.lower().rjust(2, "0"))
    return ":".join(out)


def _where(source: str, line: Optional[int]) -> str:
    return f"{source}:{line}" if line else source


def _to_bytes(data: object, source: str) -> bytes:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LibvirtDataError(f"{source}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_INPUT:
        raise LibvirtDataError(f"{source}: input is {len(data)} bytes, over the {MAX_INPUT} byte limit")
    return data


# Importing lxml costs more than the rest of a hook run. For the plain documents
# libvirt writes, the hook reads them with pyexpat (a builtin, nearly free
# to import) into the few light elements below, which answer the same find /
# findall / get / text / tag questions as lxml's. Anything unusual (a DOCTYPE
# or entity declaration, a parse error, deep nesting, long names, a large
# document) or any error found while reading the result makes the reader
# step aside, and the same input goes through lxml: lxml stays the parser of
# record, for every error message and every odd input. Set READER = "lxml"
# to bypass the fast reader altogether (tests compare the two).
READER = "auto"
_FAST_MAX_BYTES = 1 << 20
_FAST_MAX_DEPTH = 64
_FAST_MAX_NAME = 200


class _Decline(Exception):
    """The fast reader leaves this input to lxml."""


class _El:
    """The part of an lxml element the readers below use."""

    __slots__ = ("tag", "attrib", "children", "sourceline", "_text", "_closed")

    def __init__(self, tag: str, attrib: dict, line: int):
        self.tag = tag
        self.attrib = attrib
        self.children: list = []
        self.sourceline = line
        self._text: list = []
        self._closed = False  # a child started: later text is that child's tail

    @property
    def text(self):
        return "".join(self._text) if self._text else None

    def get(self, name: str, default=None):
        return self.attrib.get(name, default)

    def findall(self, path: str) -> list:
        cur = [self]
        for part in path.split("/"):
            cur = [c for e in cur for c in e.children if c.tag == part]
        return cur

    def find(self, path: str):
        found = self.findall(path)
        return found[0] if found else None


def _qname(name: str) -> str:
    if len(name) > _FAST_MAX_NAME:
        raise _Decline()
    # namespace_separator "}" gives "uri}local"; lxml spells it "{uri}local"
    return "{" + name if "}" in name else name


def _fast_root(raw: bytes, keep=None):
    """The document's root as light elements, or None to let lxml decide.

    `keep`: the only tags (below the root) the caller's find/findall paths
    go through; other subtrees are not built (a domain status file is
    mostly <qemuCaps> flags). A skipped child still ends its parent's text,
    as in lxml."""
    if len(raw) > _FAST_MAX_BYTES:
        return None
    import pyexpat

    p = pyexpat.ParserCreate(None, "}")
    p.buffer_text = True
    stack: list = []
    top: list = []

    def start(tag, attrs):
        if len(stack) >= _FAST_MAX_DEPTH:
            raise _Decline()
        if stack:
            parent = stack[-1]
            if parent is None:  # inside a skipped subtree
                if len(tag) > _FAST_MAX_NAME:
                    raise _Decline()
                stack.append(None)
                return
            parent._closed = True
            tag = _qname(tag)
            if keep is not None and tag not in keep:
                stack.append(None)
                return
        elif top:
            raise _Decline()
        else:
            tag = _qname(tag)
        el = _El(tag, {_qname(k): v for k, v in attrs.items()} if attrs else {}, p.CurrentLineNumber)
        if stack:
            stack[-1].children.append(el)
        else:
            top.append(el)
        stack.append(el)

    def end(tag):
        stack.pop()

    def chars(data):
        if stack and stack[-1] is not None and not stack[-1]._closed:
            stack[-1]._text.append(data)

    def decline(*args):
        raise _Decline()

    p.StartElementHandler = start
    p.EndElementHandler = end
    p.CharacterDataHandler = chars
    p.StartDoctypeDeclHandler = decline
    p.EntityDeclHandler = decline
    p.ExternalEntityRefHandler = decline
    p.SkippedEntityHandler = decline
    p.UnparsedEntityDeclHandler = decline
    p.NotationDeclHandler = decline
    try:
        p.Parse(raw, True)
    except Exception:  # _Decline, ExpatError, unknown encoding...: lxml decides
        return None
    return top[0] if top and not stack else None


def _parsed(data: object, source: str, build, keep=None):
    """build(root, source) on the fast reader's tree, else on lxml's."""
    raw = _to_bytes(data, source)
    if READER != "lxml" and raw.strip():
        root = _fast_root(raw, keep)
        if root is not None:
            try:
                return build(root, source)
            except LibvirtDataError:
                pass  # lxml words the error (and gets the last say)
    return build(_parse_xml(raw, source), source)


# Every tag the readers' find/findall paths pass through (see _fast_root).
_DOMAIN_TAGS = frozenset(("domain", "name", "uuid", "devices", "interface", "mac", "source", "actual", "target"))
_NETWORK_TAGS = frozenset(("network", "name", "bridge", "forward", "ip", "dhcp", "host", "networkport", "owner",
                           "uuid", "mac", "plug"))


def _parse_xml(data: object, source: str):
    """Parse untrusted XML with a hardened lxml parser; returns the root."""
    raw = _to_bytes(data, source)
    if not raw.strip():
        raise LibvirtDataError(f"{source}: empty input, expected XML")
    from lxml import etree

    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
        load_dtd=False,
        dtd_validation=False,
    )
    try:
        root = etree.fromstring(raw, parser)
    except etree.XMLSyntaxError as e:
        line = e.position[0] if getattr(e, "position", None) else getattr(e, "lineno", None)
        msg = (e.msg or str(e)).strip() if hasattr(e, "msg") else str(e)
        raise LibvirtDataError(f"{_where(source, line)}: not well-formed XML: {msg}") from None
    except (etree.LxmlError, ValueError) as e:
        raise LibvirtDataError(f"{source}: unreadable XML: {e}") from None
    if root is None or not isinstance(root.tag, str):
        raise LibvirtDataError(f"{source}: no XML document element")
    return root


def _text(el, path: str) -> Optional[str]:
    found = el.find(path)
    if found is None or found.text is None:
        return None
    t = found.text.strip()
    return t or None


def _attr(el, path: str, name: str) -> Optional[str]:
    found = el.find(path) if path else el
    if found is None:
        return None
    v = found.get(name)
    if v is None:
        return None
    v = v.strip()
    return v or None


def _unwrap(root, source: str, want: str, wrappers: Sequence[str]):
    """Accept <want> itself or <wrapper><want>; anything else is an error."""
    if root.tag == want:
        return root
    if root.tag in wrappers:
        inner = root.find(want)
        if inner is None:
            raise LibvirtDataError(f"{_where(source, root.sourceline)}: <{root.tag}> has no <{want}>")
        return inner
    allowed = ", ".join(f"<{t}>" for t in (want, *wrappers))
    raise LibvirtDataError(
        f"{_where(source, root.sourceline)}: expected {allowed}, got <{_tagname(root.tag)}>"
    )


def _tagname(tag: object) -> str:
    return tag if isinstance(tag, str) else "?"


# ------------------------------------------------------------------- XML
def parse_domain(data: bytes, source: str = "stdin") -> Domain:
    """A domain from its XML: the hook's stdin (<domain>) or a running
    domain's status file (<domstatus><domain>).

    NICs without a usable MAC are left out rather than failing the whole
    guest: nothing can be forwarded to a NIC we cannot identify, and the
    other NICs still deserve their forwards."""
    return _parsed(_without_caps(_to_bytes(data, source)), source, _domain_from, _DOMAIN_TAGS)


def _without_caps(raw: bytes) -> bytes:
    """A status file without the inside of its <qemuCaps> (blank lines instead).

    Why: those few hundred <flag/> elements are most of what a reader
    walks, nothing is read from them, and sync reads one status file per
    running guest. Only where no text can hide a tag: after libvirt's
    leading comment, no comment, CDATA or processing instruction (there
    '<' needs no escaping). Line numbers in messages stay what they were."""
    start = 0
    if raw.startswith(b"<!--"):  # libvirt's "auto-generated file" warning
        start = raw.find(b"-->") + 3
        if start < 3:
            return raw
    i = raw.find(b"<qemuCaps>", start)
    if i < 0:
        return raw
    j = raw.find(b"</qemuCaps>", i)
    if j < 0 or raw.find(b"<!--", start) >= 0 or raw.find(b"<![CDATA[", start) >= 0 \
            or raw.find(b"<?", max(start, 1)) >= 0:
        return raw
    i += len(b"<qemuCaps>")
    return raw[:i] + b"\n" * raw.count(b"\n", i, j) + raw[j:]


def _domain_from(root, source: str) -> Domain:
    root = _unwrap(root, source, "domain", ("domstatus",))
    # Not stripped: libvirt keeps the name exactly as written, and a guest
    # named " web" must never get web's forwards.
    el = root.find("name")
    name = el.text if el is not None else None
    if not (name or "").strip():
        raise LibvirtDataError(f"{_where(source, root.sourceline)}: <domain> has no <name>")
    interfaces = []
    for el in root.findall("devices/interface"):
        mac = normalize_mac(_attr(el, "mac", "address"))
        if mac is None:
            continue
        itype = (el.get("type") or "").strip()
        network = _attr(el, "source", "network") if itype == "network" else None
        interfaces.append(
            Interface(
                mac=mac,
                type=itype,
                network=network,
                # stdin has <source bridge>; status files keep it in <actual>
                bridge=_attr(el, "source", "bridge") or _attr(el, "actual/source", "bridge"),
                target=_attr(el, "target", "dev"),
                portid=_attr(el, "source", "portid"),
            )
        )
    return Domain(name=name, uuid=_text(root, "uuid"), interfaces=tuple(interfaces))


def _subnet(el, source: str) -> Subnet:
    where = _where(source, el.sourceline)
    family = (el.get("family") or "ipv4").strip().lower()
    if family not in ("ipv4", "ipv6"):
        raise LibvirtDataError(f"{where}: <ip family='{family}'> is neither ipv4 nor ipv6")
    address = _attr(el, "", "address")
    if not address:
        raise LibvirtDataError(f"{where}: <ip> has no address")
    from vnethook import addr

    prefix = _attr(el, "", "prefix")
    netmask = _attr(el, "", "netmask")
    try:
        if prefix is not None:
            version, ip, plen, cidr = addr.interface(address, str(int(prefix)))
        elif netmask is not None:
            version, ip, plen, cidr = addr.interface(address, netmask)
        else:  # libvirt's defaults: classful for IPv4 is long gone; it uses /24 and /64
            version, ip, plen, cidr = addr.interface(address, "24" if family == "ipv4" else "64")
    except ValueError as e:
        raise LibvirtDataError(f"{where}: bad <ip> address/prefix: {e}") from None
    want = 4 if family == "ipv4" else 6
    if version != want:
        raise LibvirtDataError(f"{where}: <ip family='{family}'> has address {address}")
    return Subnet(family=want, address=ip, prefix=plen, cidr=cidr)


def parse_network(data: bytes, source: str = "stdin") -> Network:
    """A network from the network hook's stdin (<hookData><network>), a
    definition (<network>) or its status file (<networkstatus><network>)."""
    return _parsed(data, source, _network_doc, _NETWORK_TAGS)


def _network_doc(root, source: str) -> Network:
    return _network_from(_unwrap(root, source, "network", ("hookData", "networkstatus")), source)


def _network_from(root, source: str) -> Network:
    name = _text(root, "name")
    if not name:
        raise LibvirtDataError(f"{_where(source, root.sourceline)}: <network> has no <name>")
    subnets = []
    hosts: List[Tuple[str, str]] = []
    for ip_el in root.findall("ip"):
        subnets.append(_subnet(ip_el, source))
        for h in ip_el.findall("dhcp/host"):
            mac = normalize_mac(h.get("mac"))
            addr = _valid_ip(h.get("ip"))
            if mac and addr and (mac, addr) not in hosts:
                hosts.append((mac, addr))
    return Network(
        name=name,
        bridge=_attr(root, "bridge", "name"),
        forward_mode=_attr(root, "forward", "mode"),
        subnets=tuple(subnets),
        dhcp_hosts=tuple(hosts),
    )


def _valid_ip(value: object) -> Optional[str]:
    from vnethook import addr

    if not isinstance(value, str):
        return None
    if addr.packed(value, 4) is not None:
        return value  # a canonical dotted quad, as ipaddress would print it
    try:
        return addr.compressed(value.strip().strip("[]"))
    except ValueError:
        return None


def parse_port(data: bytes, source: str = "stdin") -> Optional[Port]:
    """The port of a network hook's port-created/port-deleted stdin, or
    None when the hookData carries no <networkport> (start, stopped...)."""
    return _parsed(data, source, _port_from, _NETWORK_TAGS)


def _port_from(root, source: str) -> Optional[Port]:
    if root.tag != "hookData":
        raise LibvirtDataError(
            f"{_where(source, root.sourceline)}: expected <hookData>, got <{_tagname(root.tag)}>"
        )
    port = root.find("networkport")
    if port is None:
        return None
    where = _where(source, port.sourceline)
    network = _text(root, "network/name")
    if not network:
        raise LibvirtDataError(f"{where}: <hookData> has a port but no <network><name>")
    mac = normalize_mac(_attr(port, "mac", "address"))
    if mac is None:
        raise LibvirtDataError(f"{where}: <networkport> has no valid <mac address>")
    return Port(
        network=network,
        owner=_text(port, "owner/name"),
        owner_uuid=_text(port, "owner/uuid"),
        mac=mac,
        bridge=_attr(port, "plug", "bridge"),
    )


# ----------------------------------------------------------------- files
def _read_file(path: str) -> Optional[bytes]:
    """The file's bytes, or None if it does not exist (libvirt may have
    just removed it). Other failures are LibvirtDataError."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LibvirtDataError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_INPUT:
        raise LibvirtDataError(f"{path}: over the {MAX_INPUT} byte limit")
    return data


def read_leases(path: str, now: Optional[float] = None) -> List[Lease]:
    """Unexpired leases from libvirt's `<bridge>.status` JSON.

    A missing file means no leases yet. Entries that are not well-formed
    (no MAC, bad IP, bad expiry) are skipped: the leases helper only ever
    appends what dnsmasq reported, and one odd entry must not hide the
    others. A file that is not a JSON array is an error."""
    import time

    if now is None:
        now = time.time()
    parsed = _memo(path, "leases", _parse_leases)
    # The soonest expiry, once per parsed file: sync plans every guest of a
    # bridge against it, and checking each lease every time was O(guests^2).
    soonest = getattr(parsed, "soonest", False)
    if soonest is False:
        soonest = min((l.expiry for l in parsed if l.expiry != 0), default=None)
        if isinstance(parsed, LeaseList):
            parsed.soonest = soonest
    if soonest is None or soonest > now:
        return parsed  # the same object while nothing expired: the planner indexes it once
    return [l for l in parsed if l.expiry == 0 or l.expiry > now]


class LeaseList(list):
    """A read-only list of leases, shared by every reader of one file."""

    __slots__ = ("by_key", "soonest")
    soonest: "float | None"  # the earliest non-zero expiry, set by read_leases()

    def _read_only(self, *args, **kw):
        raise TypeError("LeaseList is read-only (copy it with list())")

    append = extend = insert = pop = remove = clear = sort = reverse = _read_only
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only


# One process (sync, status, the lease watcher) plans every guest of a
# bridge against the same lease file, network status and hostsfile: with
# 1000 guests, re-reading them per guest made sync quadratic. Parsed
# results are kept per process, keyed by the file's identity and stamps
# (libvirt replaces these files by rename, which changes the inode).
_MEMO: dict = {}


def _memo(path: str, kind: str, parse):
    try:
        st = os.stat(path)
        stamp = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        return parse(path)  # missing or unreadable: the reader says so
    hit = _MEMO.get((kind, path))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = parse(path)
    _MEMO[(kind, path)] = (stamp, value)
    return value


def _parse_leases(path: str) -> "LeaseList":
    from vnethook import jsonlite

    data = _read_file(path)
    if data is None:
        return LeaseList()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LibvirtDataError(f"{path}: not UTF-8 (byte {e.start})") from None
    if not text.strip():
        return LeaseList()
    try:
        doc = jsonlite.loads(text)
    except jsonlite.TooDeep:
        raise LibvirtDataError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:
        line = getattr(e, "lineno", None)
        msg = getattr(e, "msg", str(e))
        raise LibvirtDataError(f"{_where(path, line)}: not valid JSON: {msg}") from None
    if not isinstance(doc, list):
        raise LibvirtDataError(f"{path}: expected a JSON array of leases, got {type(doc).__name__}")
    return LeaseList(_leases(doc))


def _leases(doc: list) -> "Iterable[Lease]":
    """_lease() of every entry, with a fast lane for what libvirt writes:
    a canonical IPv4 address and MAC, and an integer expiry. A lease file
    holds an entry per guest, and every event that plans reads it whole."""
    from vnethook.addr import packed

    new, lease, canonical = object.__new__, Lease, _CANONICAL_MAC
    for entry in doc:
        if type(entry) is dict:
            ip, mac, expiry = entry.get("ip-address"), entry.get("mac-address"), entry.get("expiry-time")
            if type(ip) is str and type(mac) is str and type(expiry) is int and expiry >= 0 \
                    and len(mac) == 17 and canonical.issuperset(mac) and mac[2::3] == ":::::" \
                    and packed(ip, 4) is not None:
                hostname = entry.get("hostname")
                obj = new(lease)  # Lease(...) without Value's generic __init__
                obj.__dict__.update(ip=ip, mac=mac, expiry=expiry,
                                    hostname=hostname if type(hostname) is str and hostname else None)
                yield obj
                continue
        slow = _lease(entry)
        if slow is not None:
            yield slow


def _lease(entry: object) -> Optional[Lease]:
    if not isinstance(entry, dict):
        return None
    ip = _valid_ip(entry.get("ip-address"))
    mac = normalize_mac(entry.get("mac-address"))
    expiry = entry.get("expiry-time")
    if isinstance(expiry, str) and expiry.strip().isdigit():
        try:
            expiry = int(expiry.strip())
        except ValueError:  # isdigit() but not int(): "²", or over 4300 digits
            return None
    if ip is None or mac is None or isinstance(expiry, bool) or not isinstance(expiry, int) or expiry < 0:
        return None
    hostname = entry.get("hostname")
    if not isinstance(hostname, str) or not hostname:
        hostname = None
    return Lease(ip, mac, expiry, hostname)  # positional: a lease file has 1000s


def find_lease(leases: Iterable[Lease], mac: str, family: int = 4) -> Optional[Lease]:
    """The lease of one NIC for one family; the one expiring last wins (a
    re-lease after a reboot is newer than a stale entry), never-expiring
    (0) beats everything."""
    from vnethook import addr

    want = normalize_mac(mac)
    if want is None:
        return None
    best: Optional[Lease] = None
    best_key = -1.0
    for lease in leases:
        if normalize_mac(lease.mac) != want:
            continue
        try:
            if addr.family(lease.ip) != family:
                continue
        except ValueError:
            continue
        key = float("inf") if lease.expiry == 0 else float(lease.expiry)
        if key > best_key:
            best, best_key = lease, key
    return best


def read_hostsfile(path: str) -> List[Tuple[str, str]]:
    """(mac, ip) pairs from libvirt's `<network>.hostsfile` (dnsmasq
    dhcp-hostsfile: `mac,ip[,name]`). Lines keyed by DUID or name (IPv6)
    are skipped, like in Network.dhcp_hosts."""
    return list(_memo(path, "hosts", _parse_hostsfile))


def _parse_hostsfile(path: str) -> tuple:
    data = _read_file(path)
    if data is None:
        return ()
    out: List[Tuple[str, str]] = []
    for line in data.decode("utf-8", "replace").splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 2:
            continue
        mac, ip = normalize_mac(fields[0]), _valid_ip(fields[1])
        if mac and ip and (mac, ip) not in out:
            out.append((mac, ip))
    return tuple(out)


def _dir(paths: object, attr: str) -> str:
    return paths if isinstance(paths, str) else getattr(paths, attr)


def _safe_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


def running_domains(paths: object, errors: Optional[List[str]] = None,
                    metadata: Optional[list] = None) -> List[Domain]:
    """Every running domain, from /run/libvirt/qemu/*.xml (domstatus).

    `paths` is a vnethook.paths.Paths or the directory itself. Files that
    vanish, cannot be read or do not parse are skipped (libvirt rewrites
    them while guests start and stop); their errors go to `errors`.
    `metadata`: gets (xml, file) of each one that carries vnethook
    metadata (see vnethook/metadata.py), read once with the rest.

    With a Paths, what each file held is kept in the state dir
    (_DomainCache): sync reads every running guest's status file, and a
    file that did not change need not be parsed again."""
    cache = _DomainCache(paths.domains_cache) if hasattr(paths, "domains_cache") else None
    out = []
    for path in xml_files(_dir(paths, "running_domains_dir"), strict=True):
        try:
            if cache is not None:
                dom = cache.get(path, metadata is not None)
                if dom is not None:
                    out.append(dom)
                    continue
            data = _read_file(path)
            if data is None:
                continue
            dom = parse_domain(data, source=path)
            out.append(dom)
            has_metadata = _METADATA_NS in data
            if metadata is not None and has_metadata:
                metadata.append((data, path))
            if cache is not None:
                cache.put(path, dom, has_metadata)
        except LibvirtDataError as e:
            if errors is not None:
                errors.append(str(e))
    if cache is not None:
        cache.save()
    return out


class _DomainCache:
    """What running_domains() read from each status file, by the file's identity.

    An entry counts only while the file's inode, device, size, mtime and
    ctime are unchanged (libvirt replaces a status file by rename: a new
    inode) and its mtime is older than fsutil.RACY_NS: a file written within the
    same clock tick as its cached read could differ with the same stat.
    A file with vnethook metadata is read again whenever the caller wants
    the metadata (its raw XML is not kept). Entries of files that are gone
    are dropped. Like the config cache: marshal, written atomically,
    trusted only when owned by root (or us) and not writable by others;
    any trouble is a miss, never an error.
    """

    FORMAT = 1

    def __init__(self, file: str) -> None:
        self.file = file
        self.old: dict = self._load()
        self.new: dict = {}
        import time

        self.now = time.time_ns()
        self.stats: dict = {}

    def _load(self) -> dict:
        import marshal

        from vnethook.fsutil import read_trusted

        data = read_trusted(self.file, 64 << 20)
        try:
            blob = marshal.loads(data) if data is not None else None
        except (EOFError, ValueError, TypeError):
            return {}
        if not isinstance(blob, tuple) or len(blob) != 2 or blob[0] != self.FORMAT or not isinstance(blob[1], dict):
            return {}
        return blob[1]

    def _key(self, path: str):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def get(self, path: str, want_metadata: bool) -> Optional[Domain]:
        key = self._key(path)
        self.stats[path] = key
        entry = self.old.get(path)
        if key is None or entry is None or entry[0] != key or (want_metadata and entry[1]):
            return None
        try:
            name, uuid, ifaces = entry[2]
            dom = Domain(name=name, uuid=uuid, interfaces=tuple(
                Interface(mac=m, type=t, network=n, bridge=b, target=d, portid=p) for m, t, n, b, d, p in ifaces))
        except (TypeError, ValueError):
            return None
        self.new[path] = entry
        return dom

    def put(self, path: str, dom: Domain, has_metadata: bool) -> None:
        key = self.stats.get(path)
        from vnethook.fsutil import RACY_NS

        if key is None or key[3] >= self.now - RACY_NS:
            return
        self.new[path] = (key, has_metadata, (dom.name, dom.uuid, tuple(
            (i.mac, i.type, i.network, i.bridge, i.target, i.portid) for i in dom.interfaces)))

    def save(self) -> None:
        if self.new == self.old:
            return
        import marshal

        from vnethook.fsutil import atomic_write

        try:
            atomic_write(self.file, marshal.dumps((self.FORMAT, self.new)))
        except (OSError, ValueError):
            pass  # only an optimisation (a read-only or missing state dir)


def running_domain(paths: object, name: str) -> Optional[Domain]:
    """One running domain's status, or None if it is not running."""
    if not _safe_name(name):
        return None
    path = os.path.join(_dir(paths, "running_domains_dir"), f"{name}.xml")
    data = _read_file(path)
    if data is None:
        return None
    return parse_domain(data, source=path)


def running_network(paths: object, name: str) -> Optional[Network]:
    """One active network from /run/libvirt/network/<name>.xml, or None.

    libvirt writes that file only after the network's `started` hook, so at
    that event the hook's stdin is the source, not this."""
    if not _safe_name(name):
        return None
    return _memo(os.path.join(_dir(paths, "running_networks_dir"), f"{name}.xml"), "network", _network_file)


def xml_files(directory: str, strict: bool = False) -> List[str]:
    """The XML files libvirt keeps in `directory`, sorted (hidden ones are
    its temporary files). [] when the directory cannot be listed; with
    `strict`, only when it does not exist (else LibvirtDataError)."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as e:
        if strict:
            raise LibvirtDataError(f"{directory}: cannot list: {e.strerror or e}") from None
        return []
    return [os.path.join(directory, n) for n in names if n.endswith(".xml") and not n.startswith(".")]


def running_bridges(paths: object) -> List[str]:
    """The bridges of every active network (unreadable files are skipped)."""
    out = []
    for path in xml_files(_dir(paths, "running_networks_dir")):
        try:
            net = _network_file(path)
        except LibvirtDataError:
            continue
        if net is not None and net.bridge:
            out.append(net.bridge)
    return out


def _network_file(path: str) -> Optional[Network]:
    data = _read_file(path)
    if data is None:
        return None
    return parse_network(data, source=path)


def networks_for(paths: object, domain: Domain, hook_network: Optional[Network] = None
                 ) -> Dict[str, Network]:
    """Every active network the domain's NICs use, by name.

    The hook's own network data wins (it is what libvirt is acting on right
    now), then the status file. Static hosts from `<network>.hostsfile` are
    added to those in the XML, so a reservation that only reached dnsmasq
    still counts. Networks that are not running are left out."""
    out: Dict[str, Network] = {}
    for iface in domain.interfaces:
        name = iface.network
        if not name or name in out:
            continue
        if hook_network is not None and hook_network.name == name:
            net: Optional[Network] = hook_network
        else:
            net = running_network(paths, name)
        if net is None:
            continue
        extra = []
        hosts_file = _hosts_file(paths, name)
        if hosts_file:
            try:
                extra = [h for h in read_hostsfile(hosts_file) if h not in net.dhcp_hosts]
            except LibvirtDataError:
                extra = []
        if extra:
            net = Network(name=net.name, bridge=net.bridge, forward_mode=net.forward_mode,
                          subnets=net.subnets, dhcp_hosts=net.dhcp_hosts + tuple(extra))
        out[name] = net
    return out


def _hosts_file(paths: object, network: str) -> Optional[str]:
    fn = getattr(paths, "hosts_file", None)
    if fn is None or not _safe_name(network):
        return None
    return fn(network)
