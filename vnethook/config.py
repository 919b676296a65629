"""The YAML port map: discovery, validation, and a compiled cache for hooks.

Why it is built this way:

- The hook runs in libvirt's critical path on every guest event, and most
  events happen when nothing in the port map changed. So the validated map is
  compiled into a marshal blob keyed by the stat of every file involved;
  a hook with a warm cache never imports yaml, difflib or ipaddress.
- A broken map must be explained, not crash: every problem in every file is
  collected and reported at once as FILE:LINE:COL, from the composed YAML
  nodes (not constructed Python objects), because only nodes keep positions
  and raw scalar text (so "5353:53" is never turned into a base-60 integer).
- The map decides what the host exposes to the network, so like sshd's
  StrictModes, files and directories others could write are refused.
- YAML aliases are refused outright (not bounded): a port map never needs
  them, and refusing them removes the "billion laughs" class of inputs and
  any question of what an alias to a forward list would mean twice.
- libyaml is quadratic in flow nesting depth and the composer recurses on the
  C stack, so deep nesting is rejected before the YAML parser sees it.
"""

from __future__ import annotations

import os
import sys

# _collections_abc, not collections.abc: the interpreter has loaded it already.
from _collections_abc import Mapping as _Mapping

from vnethook.fsutil import RACY_NS
from vnethook.model import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_FILE_SIZE = 1 << 20  # 1 MiB
MAX_DEPTH = 1000  # YAML nesting; a port map needs 6
CACHE_FORMAT = 1
PROTOCOLS = ("tcp", "udp", "sctp")
SETTING_CHOICES = {
    "firewall": ("auto", "iptables-nft", "iptables-legacy", "nftables"),
    "on_error": ("warn", "block"),
    "lease_watch": ("auto", "systemd", "waiter", "off"),
}
SHORT_FORM = "expected [HOSTADDR:]HOSTPORT:GUESTPORT[/PROTOCOL], e.g. 8080:80"
_PORT_EXPECT = "expected a number 1-65535 or a range like 30000-30009"
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"


class Problem(Value):
    """One thing wrong with the map, where the user can find it (line/col 1-based, 0 = whole file)."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        if self.line and self.col:
            return f"{self.file}:{self.line}:{self.col}: {self.message}"
        if self.line:
            return f"{self.file}:{self.line}: {self.message}"
        return f"{self.file}: {self.message}"


class ConfigError(Exception):
    """The port map is unusable; `problems` says every reason at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class PortRule(Value):
    """One forward as written for a guest; the planner adds the guest side.

    Kept apart from model.Forward because the guest's address, NIC and family
    are not known until the guest runs.
    """

    protocol: str
    host_address: str | None
    host_ports: tuple[int, int]
    guest_ports: tuple[int, int]
    sources: tuple[str, ...]
    origin: str  # "file:line"


class GuestConfig(Value):
    """Everything the map says about one libvirt domain."""

    name: str
    addresses: tuple[str, ...]
    interface: str | None
    allow_outside_network: bool
    forwards: tuple[PortRule, ...]
    origin: str


class Settings(Value):
    """Global knobs; defaults apply when no file sets them."""

    firewall: str = "auto"
    on_error: str = "warn"
    lease_watch: str = "auto"


class Config(Value):
    """The validated map of all files (guests keep file order)."""

    settings: Settings
    guests: dict[str, GuestConfig]
    files: tuple[str, ...]


# --------------------------------------------------------------------------
# Discovery and the stat snapshot (stdlib only: shared with the fast path)


def _is_default(config: str) -> bool:
    from vnethook.paths import DEFAULT_CONFIG_DIR

    return os.path.normpath(config) == os.path.normpath(DEFAULT_CONFIG_DIR)


def _layout(config: str):
    """Return (dirs, files, problems) that make up the map at `config`.

    dirs are the directories whose permissions guard the map; files are
    candidates in load order. Nothing is opened here.
    """
    try:
        st = os.stat(config)
    except FileNotFoundError:
        if _is_default(config):
            return [], [], []
        return [], [], [Problem(config, 0, 0, "no such file or directory (expected a port map file or directory)")]
    except OSError as e:
        return [], [], [Problem(config, 0, 0, f"cannot access: {e.strerror}")]
    if not _S_ISDIR(st.st_mode):
        return [], [config], []
    dirs = [config]
    files = []
    main = os.path.join(config, "ports.yaml")
    if os.path.lexists(main):
        files.append(main)
    dropins = os.path.join(config, "ports.d")
    problems = []
    if os.path.lexists(dropins):
        try:
            names = os.listdir(dropins)
        except NotADirectoryError:
            problems.append(Problem(dropins, 0, 0, "not a directory (expected a directory of *.yaml files)"))
        except OSError as e:
            problems.append(Problem(dropins, 0, 0, f"cannot read directory: {e.strerror}"))
        else:
            dirs.append(dropins)
            files.extend(
                os.path.join(dropins, n) for n in sorted(names) if n.endswith(".yaml") and not n.startswith(".")
            )
    return dirs, files, problems


def _S_ISDIR(mode: int) -> bool:
    return (mode & 0o170000) == 0o040000


def _S_ISREG(mode: int) -> bool:
    return (mode & 0o170000) == 0o100000


def config_files(paths) -> list[str]:
    """The files that make up the map, in load order, existing ones only."""
    _, files, _ = _layout(paths.config)
    return [f for f in files if os.path.isfile(f)]


def _stat_key(st) -> tuple:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev, st.st_mode, st.st_uid)


def _snapshot(config: str):
    """Stat everything the map depends on, for the cache key.

    The directory listing itself is part of the key (a new or removed
    drop-in changes it), so directory mtimes need not be trusted.
    """
    dirs, files, problems = _layout(config)
    if problems:
        return None
    dkeys = []
    for d in dirs:
        try:
            st = os.stat(d)
        except OSError:
            return None
        dkeys.append((d, st.st_ino, st.st_dev, st.st_mode, st.st_uid))
    fkeys = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            return None
        fkeys.append((f,) + _stat_key(st))
    try:
        me = os.stat(__file__)
        code = (me.st_mtime_ns, me.st_size)
    except OSError:
        code = None
    return (CACHE_FORMAT, config, os.geteuid(), code, tuple(dkeys), tuple(fkeys))


# --------------------------------------------------------------------------
# The cache


def _read_cache(paths):
    """Return the unmarshalled blob if it is ours and trustworthy, else None."""
    import marshal

    from vnethook.fsutil import read_trusted

    data = read_trusted(paths.config_cache, 16 * MAX_FILE_SIZE)
    if data is None:
        return None
    try:
        blob = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        return None
    if not isinstance(blob, tuple) or len(blob) != 4 or blob[0] != CACHE_FORMAT:
        return None
    return blob


def _cache_matches(blob, paths) -> bool:
    _, key, racy, _ = blob
    if _snapshot(paths.config) != key:
        return False
    for path, content in racy:
        try:
            with open(path, "rb") as f:
                if f.read(MAX_FILE_SIZE + 1) != content:
                    return False
        except OSError:
            return False
    return True


def _to_blob(cfg: Config) -> tuple:
    s = cfg.settings
    guests = tuple(
        (
            g.name,
            g.addresses,
            g.interface,
            g.allow_outside_network,
            tuple((r.protocol, r.host_address, r.host_ports, r.guest_ports, r.sources, r.origin) for r in g.forwards),
            g.origin,
        )
        for g in cfg.guests.values()
    )
    return ((s.firewall, s.on_error, s.lease_watch), guests, cfg.files)


def _from_blob(data) -> Config:
    settings, guests, files = data
    return Config(Settings(*settings), _LazyGuests({g[0]: g for g in guests}), tuple(files))


def _guest_from_blob(name, addrs, iface, allow, rules, origin) -> GuestConfig:
    fw = tuple(PortRule(p, h, tuple(hp), tuple(gp), tuple(src), o) for p, h, hp, gp, src, o in rules)
    return GuestConfig(name, tuple(addrs), iface, bool(allow), fw, origin)


class _LazyGuests(_Mapping):
    """Config.guests from the cache, each guest built when first asked for.

    Why: a hook event wants one guest of the map, and building every
    guest's objects made each event cost more with every guest in the map
    (the "1000 other guests" figures). A read-only mapping like the dict
    that load_config() gives (equal to it, and dict() of it is one).
    """

    __slots__ = ("_raw", "_built")

    def __init__(self, raw: dict) -> None:
        self._raw = raw
        self._built: dict = {}

    def __getitem__(self, name):
        g = self._built.get(name)
        if g is None:
            g = self._built[name] = _guest_from_blob(*self._raw[name])
        return g

    def __contains__(self, name) -> bool:
        return name in self._raw

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return repr(dict(self))


def _write_cache(paths, key, racy, cfg: Config) -> None:
    import marshal

    blob = marshal.dumps((CACHE_FORMAT, key, racy, _to_blob(cfg)))
    target = paths.config_cache
    try:
        from vnethook.fsutil import atomic_write

        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        atomic_write(target, blob)
    except OSError:
        # The cache is only an optimization; a read-only state dir must not
        # turn a valid map into a failure (atomic_write removed its temp).
        pass


def load_config_cached(paths, checked=None) -> Config:
    """load_config(), but from the compiled cache when nothing changed.

    `checked`: a blob checked_cache() returned in this same event. The hook
    checks the cache in libvirt's process and, when there is work, hands
    the checked blob to the worker it forks, which need not read and check
    the files again."""
    if checked is not None:
        return _from_blob(checked[3])
    blob = _read_cache(paths)
    if blob is not None:
        try:
            if _cache_matches(blob, paths):
                return _from_blob(blob[3])
        except Exception:  # a corrupt blob is a cache miss, never a failure
            pass
    import time

    before = _snapshot(paths.config)
    now = time.time_ns()
    cfg, contents = _load(paths)
    from vnethook import blocklist

    blocklist.write(paths, cfg)  # for the hook scripts' guard, when vnethook cannot run
    if before is not None and _snapshot(paths.config) == before:
        racy = tuple(
            (f[0], contents[f[0]])
            for f in before[5]
            if f[0] in contents and max(f[1], f[2]) >= now - RACY_NS
        )
        _write_cache(paths, before, racy, cfg)
    return cfg


def guest_names_fast(paths) -> frozenset | None:
    """The configured guest names from a valid warm cache, or None if unknown.

    Lets a hook skip guests without forwards without building the Config.
    """
    view = fast_view(paths)
    return None if view is None else view[0]


def checked_cache(paths):
    """The cache's blob if it is valid now (nothing it was compiled from
    changed), else None."""
    blob = _read_cache(paths)
    if blob is None:
        return None
    try:
        return blob if _cache_matches(blob, paths) else None
    except Exception:
        return None


def fast_view(paths, blob=None) -> tuple | None:
    """(configured guest names, on_error) from a valid warm cache (or from
    `blob`, one checked_cache() gave), or None if unknown."""
    blob = blob or checked_cache(paths)
    if blob is None:
        return None
    try:
        return frozenset(g[0] for g in blob[3][1]), blob[3][0][1]
    except Exception:
        return None


def on_error_hint(paths) -> str:
    """Best effort "block" or "warn", even when the map is broken.

    So that a user who asked for `on_error: block` gets blocked guest starts
    while the map is broken, instead of silently unpublished ports. When the
    YAML does not even parse, any evidence of "block" wins: the last good
    map (from the cache) or a plain `on_error: block` line in the text.
    """
    try:
        return load_config_cached(paths).settings.on_error
    except ConfigError:
        pass
    except Exception:
        return "warn"
    try:
        return _hint_from_broken(paths)
    except Exception:
        return "warn"


def _hint_from_broken(paths) -> str:
    import re

    _, files, _ = _layout(paths.config)
    found = set()
    syntax_broken = False
    yaml, loader = _yaml()
    for f in files:
        try:
            with open(f, "rb") as fh:
                data = fh.read(MAX_FILE_SIZE)
        except OSError:
            continue
        text = data.decode("utf-8", "replace")
        node = None
        ok = len(data) < MAX_FILE_SIZE and _nesting_ok(text)
        if ok:
            try:
                node = yaml.compose(text, Loader=loader)
            except Exception:
                ok = False
        if ok:
            value = _settings_value(yaml, node, "on_error")
            if value in SETTING_CHOICES["on_error"]:
                found.add(value)
            continue
        syntax_broken = True
        # block style (`on_error: block`) or flow style (`{on_error: block}`)
        for m in re.finditer(r"(?m)(?:^|[{,])[ \t]*[\"']?on_error[\"']?[ \t]*:[ \t]*[\"']?(block|warn)\b", text):
            found.add(m.group(1))
    if syntax_broken:
        blob = _read_cache(paths)
        try:
            if blob is not None and blob[3][0][1] in SETTING_CHOICES["on_error"]:
                found.add(blob[3][0][1])
        except Exception:
            pass
    return "block" if "block" in found else "warn"


def _settings_value(yaml, node, key):
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == "settings" and isinstance(v, yaml.MappingNode):
            for sk, sv in v.value:
                if isinstance(sk, yaml.ScalarNode) and sk.value == key and isinstance(sv, yaml.ScalarNode):
                    return sv.value
    return None


# --------------------------------------------------------------------------
# The slow path: read, compose, validate


def _yaml():
    import yaml

    return yaml, getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_config(paths) -> Config:
    """Parse and validate the whole map; raise ConfigError with every problem."""
    return _load(paths)[0]


def _load(paths):
    """Return (Config, {file: bytes read}); the bytes feed the racy cache check."""
    v = _Validator()
    dirs, files, problems = _layout(paths.config)
    v.problems.extend((-1, p) for p in problems)
    refused_dirs = set()
    for d in dirs:
        try:
            st = os.stat(d)
        except OSError as e:
            v.add_plain(-1, d, f"cannot access: {e.strerror}")
            refused_dirs.add(d)
            continue
        if _refuse(v, -1, d, st):
            refused_dirs.add(d)
    contents = {}
    read = []
    for index, f in enumerate(files):
        if any(os.path.dirname(f) == d or d == paths.config for d in refused_dirs):
            continue
        data = _read_file(v, index, f)
        if data is None:
            continue
        contents[f] = data
        read.append(f)
        v.check_file(index, f, data)
    v.check_conflicts()
    if v.problems:
        v.problems.sort(key=lambda p: (p[0], p[1].line, p[1].col))
        raise ConfigError([p for _, p in v.problems])
    cfg = Config(Settings(**v.settings), v.guests, tuple(read))
    return cfg, contents


def _refuse(v, index, path, st) -> bool:
    """sshd-StrictModes-like ownership and mode check; True if refused."""
    euid = os.geteuid()
    refused = False
    if st.st_uid not in (0, euid):
        who = "root" if euid == 0 else f"root or uid {euid}"
        v.add_plain(index, path, f"refusing: owned by uid {st.st_uid}, not by {who} (chown root {path})")
        refused = True
    w = st.st_mode & 0o022
    if w:
        whom = {0o020: "group", 0o002: "others", 0o022: "group and others"}[w]
        v.add_plain(index, path, f"refusing: writable by {whom} (chmod go-w {path})")
        refused = True
    return refused


def _read_file(v, index, path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        v.add_plain(index, path, f"cannot read: {e.strerror}")
        return None
    try:
        st = os.fstat(fd)
        if not _S_ISREG(st.st_mode):
            v.add_plain(index, path, "not a regular file (expected a YAML file)")
            return None
        if _refuse(v, index, path, st):
            return None
        if st.st_size > MAX_FILE_SIZE:
            v.add_plain(index, path, f"refusing: file is larger than 1 MiB ({st.st_size} bytes)")
            return None
        chunks = []
        total = 0
        while total <= MAX_FILE_SIZE:
            chunk = os.read(fd, MAX_FILE_SIZE + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        data = b"".join(chunks)
        if len(data) > MAX_FILE_SIZE:
            v.add_plain(index, path, "refusing: file is larger than 1 MiB")
            return None
        return data
    except OSError as e:
        v.add_plain(index, path, f"cannot read: {e.strerror}")
        return None
    finally:
        os.close(fd)


def _nesting_problem(text: str):
    """Return (offset, message) if flow nesting is too deep for libyaml, else None.

    Counts brackets without regard to quoting, so it can only overestimate;
    it runs only when there are enough brackets to matter at all.
    """
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return None
    import re

    depth = 0
    for m in re.finditer(r"[\[\]{}]", text):
        if m.group() in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return m.start(), f"nesting deeper than {MAX_DEPTH} levels (expected a port map, which needs 6)"
        elif depth:
            depth -= 1
    return None


def _nesting_ok(text: str) -> bool:
    return _nesting_problem(text) is None and (text.count("-") + text.count("?") <= MAX_DEPTH)


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    start = text.rfind("\n", 0, offset) + 1
    return line, offset - start + 1


def _suggest(word: str, choices) -> str | None:
    import difflib

    if word.lower() in choices:
        return word.lower()
    m = difflib.get_close_matches(word.lower(), choices, n=1, cutoff=0.6)
    return m[0] if m else None


def _one_of(choices) -> str:
    return ", ".join(choices)


# --------------------------------------------------------------------------
# Per-value checks, shared by both front ends: the YAML validator below and
# the domain metadata reader (vnethook/metadata.py). Each takes the text as
# written and `report(message)`, which places the message (FILE:LINE:COL
# for YAML, "domain NAME: metadata line L: <element>:" for metadata), so
# one value is judged, and worded, the same way wherever it was written.


def parse_short(raw: str, report):
    """The short form `[HOSTADDR:]HOSTPORT:GUESTPORT[/PROTOCOL]`:
    (protocol, host, host_ports, guest_ports, ()) or None; problems go to report."""
    text = raw.strip()
    host = None
    rest = text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            report(f"invalid forward '{raw}' ({SHORT_FORM})")
            return None
        host, rest = text[1:end], text[end + 2 :]
    proto = "tcp"
    if "/" in rest:
        rest, proto = rest.rsplit("/", 1)
    parts = rest.split(":")
    if host is None and len(parts) == 3:
        host, parts = parts[0], parts[1:]
    if len(parts) == 1:
        report(f"forward '{raw}' has no guest port ({SHORT_FORM})")
        return None
    if len(parts) != 2:
        if host is None and text.count(":") > 3:
            report(f"forward '{raw}': an IPv6 host address must be in brackets (expected e.g. \"[2001:db8::1]:8443:443\")")
        else:
            report(f"invalid forward '{raw}' ({SHORT_FORM})")
        return None
    hp = check_ports(parts[0], "host", report)
    gp = check_ports(parts[1], "guest", report)
    proto = check_protocol(proto, report)
    if host is not None:
        host = check_host_address(host, report)
    if hp and gp:
        check_same_length(hp, gp, report)
    return proto, host, hp, gp, ()


def check_ports(text: str, role: str, report) -> tuple[int, int] | None:
    s = text.strip()
    if s.isascii() and (s.isdigit() or (s.startswith("-") and s[1:].isdigit())):
        lo = hi = int(s)
    elif s.isascii() and s.count("-") == 1 and all(p.isdigit() for p in s.split("-")):
        lo, hi = (int(p) for p in s.split("-"))
    else:
        report(f"invalid {role} port '{s}' ({_PORT_EXPECT})")
        return None
    ok = True
    for p in (lo,) if lo == hi else (lo, hi):
        if not 1 <= p <= 65535:
            report(f"{role} port {p} out of range (expected 1-65535)")
            ok = False
    if ok and lo > hi:
        report(f"reversed {role} port range {lo}-{hi} (expected low-high, e.g. {hi}-{lo})")
        ok = False
    return (lo, hi) if ok else None


def check_same_length(hp, gp, report) -> None:
    n, m = hp[1] - hp[0] + 1, gp[1] - gp[0] + 1
    if n == m:
        return
    if m == 1:
        eg = f", e.g. {gp[0]}-{gp[0] + n - 1}" if gp[0] + n - 1 <= 65535 else ""
        report(f"host port range {hp[0]}-{hp[1]} ({n} ports) maps to the single guest port {gp[0]} (expected a guest range of the same length{eg})")
    elif n == 1:
        report(f"host port {hp[0]} maps to guest port range {gp[0]}-{gp[1]} (expected a single guest port, or a host range of the same length)")
    else:
        report(f"host port range {hp[0]}-{hp[1]} has {n} ports but guest port range {gp[0]}-{gp[1]} has {m} (expected ranges of the same length)")


def check_protocol(text: str, report) -> str:
    p = text.strip().lower()
    if p not in PROTOCOLS:
        report(f"unknown protocol '{text}' (expected one of: {_one_of(PROTOCOLS)})")
    return p


def check_host_address(text: str, report) -> str | None:
    import ipaddress

    text = text.strip()
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        if "/" in text:
            report(f"host address '{text}' is a network (expected a single address)")
        else:
            report(f"invalid host address '{text}' (expected an IPv4 or IPv6 address)")
        return None
    if addr.version == 6 and addr.scope_id:
        report(f"host address '{text}' has a zone index (expected an address without %zone)")
        return None
    if addr.version == 6 and addr.is_loopback:
        report(
            "host address ::1 is not supported: the kernel cannot DNAT IPv6 loopback traffic to another"
            " host (expected 127.0.0.1 or a non-loopback address)",
        )
        return None
    if addr.version == 6 and addr.ipv4_mapped:
        report(f"host address {text} is IPv4-mapped (expected the plain IPv4 address {addr.ipv4_mapped})")
        return None
    bad = _not_unicast(addr)
    if bad == "the unspecified address":
        report(f"host address {addr} is the wildcard (expected a unicast address; leave the host address out to forward on every address)")
        return None
    if bad:
        report(f"host address {addr} is {bad} (expected a unicast address)")
        return None
    return str(addr)


def check_source(text: str, host: str | None, report) -> str | None:
    """One source address or network; None if it is refused."""
    import ipaddress

    text = text.strip()
    try:
        net = ipaddress.ip_network(text)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            report(f"invalid source '{text}' (expected an address or a network like 198.51.100.0/24)")
        else:
            report(f"source '{text}' has host bits set (did you mean {loose}?)")
        return None
    hfam = None if host is None else (6 if ":" in host else 4)
    if hfam is not None and net.version != hfam:
        report(
            f"source {net} is IPv{net.version} but the host address {host} is IPv{hfam}"
            " (expected sources of the same family as the host address)",
        )
        return None
    return str(net)


def check_guest_address(text: str, out: dict, report) -> None:
    """One fixed guest address, added to out (family -> address)."""
    import ipaddress

    text = text.strip()
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        if "/" in text:
            report(f"guest address '{text}' has a prefix length (expected a plain address like {text.split('/')[0]})")
        else:
            report(f"invalid guest address '{text}' (expected an IPv4 or IPv6 address)")
        return
    bad = _not_unicast(addr)
    if bad or addr.is_loopback:
        report(f"guest address {addr} is {bad or 'a loopback address'} (expected the guest's unicast address)")
        return
    if addr.version in out:
        report(f"second IPv{addr.version} address {addr} (expected at most one IPv4 and one IPv6 address)")
        return
    out[addr.version] = str(addr)


def check_interface(value: str, report) -> str | None:
    """A NIC by MAC (normalized to lowercase) or by libvirt network name."""
    import re

    value = value.strip()
    if re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}", value):
        return value.lower()
    if ":" in value and re.fullmatch(r"[0-9A-Fa-f:.-]+", value):
        report(f"invalid MAC address '{value}' (expected six hex pairs like 52:54:00:aa:bb:02)")
        return None
    return value


def families_of(addresses) -> frozenset:
    """The families a forward without a host address covers for a guest."""
    return frozenset(6 if ":" in a else 4 for a in addresses) or frozenset((4, 6))


def check_family_fit(rule, name: str, addresses, report) -> bool:
    """A forward on a host address of a family the guest has no fixed address of."""
    if rule.host_address is None or not addresses:
        return True
    fam = 6 if ":" in rule.host_address else 4
    if fam in families_of(addresses):
        return True
    have = "IPv4" if fam == 6 else "IPv6"
    want = "IPv6" if fam == 6 else "IPv4"
    report(
        f"host address {rule.host_address} is {want} but guest '{name}' has only an {have}"
        f" address (expected an {have} host address, or an {want} 'address' for the guest)"
    )
    return False


class _Rule:
    """One forward in the conflict sweep, with where it was written (`place`)."""

    __slots__ = ("rule", "guest", "file", "findex", "line", "col", "order", "families", "loopback", "family", "place")

    def __init__(self, rule, guest, file, findex, line, col, order, families, loopback, family, place=None):
        self.rule = rule
        self.findex = findex
        self.guest = guest
        self.file = file
        self.line = line
        self.col = col
        self.order = order
        self.families = families
        self.loopback = loopback
        self.family = family
        self.place = place or f"{file}:{line}:{col}"


def sweep_rule(rule, guest, order, families, place, findex=0, file="", line=0, col=0) -> _Rule:
    """A forward as the conflict sweep sees it; families: of the guest's
    fixed addresses (families_of), for a forward without a host address."""
    fam = None if rule.host_address is None else (6 if ":" in rule.host_address else 4)
    return _Rule(
        rule, guest, file, findex, line, col, order, families if fam is None else frozenset((fam,)),
        rule.host_address is not None and rule.host_address.startswith("127."), fam, place,
    )


def overlaps(rules):
    """Yield (rule, other) for every rule that overlaps a rule before it in
    the sweep: the same protocol, overlapping host ports, on the same host
    address or a wildcard of the same family (a 127.x address only on the
    same address). `other` is the first such rule found.

    A sweep over port ranges per protocol with heaps of the rules still
    "open" at the current port: linear-ish even for huge maps.
    """
    import heapq

    by_proto: dict[str, list[_Rule]] = {}
    for r in rules:
        by_proto.setdefault(r.rule.protocol, []).append(r)
    for group in by_proto.values():
        group.sort(key=lambda r: (r.rule.host_ports[0], r.order))
        exact: dict[str, list] = {}
        wild: dict[int, list] = {4: [], 6: []}
        explicit: dict[int, list] = {4: [], 6: []}
        for r in group:
            lo = r.rule.host_ports[0]
            if r.family is not None:
                heaps = [exact.get(r.rule.host_address)]
                if not r.loopback:
                    heaps.append(wild[r.family])
            else:
                heaps = [h for f in sorted(r.families) for h in (wild[f], explicit[f])]
            other = None
            for h in heaps:
                while h and h[0][0] < lo:
                    heapq.heappop(h)
                if h:
                    other = h[0][2]
                    break
            if other is not None:
                yield r, other
            item = (r.rule.host_ports[1], r.order, r)
            if r.family is not None:
                heapq.heappush(exact.setdefault(r.rule.host_address, []), item)
                if not r.loopback:
                    heapq.heappush(explicit[r.family], item)
            else:
                for f in r.families:
                    heapq.heappush(wild[f], item)


class Claims:
    """The forwards kept so far, to ask whether a new one overlaps any of
    them, with the semantics of overlaps() (for one map from two sources:
    metadata.merge keeps forwards in order of precedence).

    Wildcards and specific non-loopback addresses are kept as port bitmaps
    per protocol and family (a range costs one slice assignment, a query one
    bytes.find); forwards on one specific address are few, and listed.
    """

    def __init__(self):
        self.bits: dict = {}  # (kind, protocol, family) -> bytearray, kind "wild" | "explicit"
        self.rules: dict = {}  # (kind, protocol, family or address) -> [_Rule]

    def holder(self, r: _Rule):
        """The earliest kept forward that `r` overlaps, or None."""
        lo, hi = r.rule.host_ports
        p = r.rule.protocol
        if r.family is not None:
            exact = [o for o in self.rules.get(("exact", p, r.rule.host_address), ())
                     if o.rule.host_ports[0] <= hi and lo <= o.rule.host_ports[1]]
            if exact:
                return min(exact, key=lambda o: o.order)
            keys = [] if r.loopback else [("wild", p, r.family)]
        else:
            keys = [(kind, p, f) for f in sorted(r.families) for kind in ("wild", "explicit")]
        for k in keys:
            bits = self.bits.get(k)
            if bits is not None and bits.find(1, lo, hi + 1) >= 0:
                return min((o for o in self.rules[k] if o.rule.host_ports[0] <= hi and lo <= o.rule.host_ports[1]),
                           key=lambda o: o.order)
        return None

    def add(self, r: _Rule) -> None:
        lo, hi = r.rule.host_ports
        p = r.rule.protocol
        if r.family is not None:
            self.rules.setdefault(("exact", p, r.rule.host_address), []).append(r)
            keys = [] if r.loopback else [("explicit", p, r.family)]
        else:
            keys = [("wild", p, f) for f in r.families]
        for k in keys:
            bits = self.bits.get(k)
            if bits is None:
                bits = self.bits[k] = bytearray(65537)
            bits[lo : hi + 1] = b"\x01" * (hi - lo + 1)
            self.rules.setdefault(k, []).append(r)


# --------------------------------------------------------------------------
# The file format, as data: the Spec tables below (TOP, GUEST, FORWARD) are
# the whole shape of ports.yaml, and _Validator.walk() reads every node the
# same way, so that a value of the wrong kind, an unknown or repeated key and
# FILE:LINE:COL are handled once. What a value must look like is judged by
# the check_* functions above, shared with the domain metadata.


class Spec:
    """What one node may be, and what it reads as. A node of any other kind
    is reported as "{label} is {what it is} ({expect})" (label and context
    may name the guest: {name}) and reads as `default`. A Spec allows one
    kind, or two (a forward: scalar or fields)."""

    default: Any = None
    scalar: Any = None  # a non-empty scalar: scalar(text, report) -> value
    nonblank = False  # ... that is not blank either
    boolean = False  # a YAML boolean
    many: Any = None  # a scalar or a non-empty list of them: many([(text, report)], scope) -> value
    one = ("", "")  # many: label and expect for an item that is not a scalar
    empty = ""  # many: the problem with an empty list
    items: Any = None  # a list of these Specs -> [(value, node)] of the items without any problem
    fields: Any = None  # a mapping of these {key: Spec}, read in this order (scope: the values so far)
    finish: Any = None  # fields: finish(v, values, found, node, name, knode) -> value
    names: Any = None  # a mapping of any names to this Spec, each read if claim(v, name, knode)
    claim: Any = None
    context = ""  # fields, names: where, for "unknown key 'x' {context}"
    optional = False  # empty (`key:` or `~`) is fine: no fields, or `default`
    short_for: Any = None  # a list here is short for a mapping with the list under this key

    def __init__(self, label: str, expect: str, default=None, **kind):
        if not kind.keys() <= vars(Spec).keys():
            raise TypeError(f"unknown Spec argument(s) {sorted(kind.keys() - vars(Spec).keys())}")
        self.label, self.expect, self.default = label, expect, default
        self.__dict__.update(kind)


def _choice(key, choices):
    def check(text, report):
        if text in choices:
            return text
        hint = _suggest(text, choices)
        tail = f"; did you mean '{hint}'?" if hint else ""
        report(f"invalid {key} '{text}' (expected one of: {_one_of(choices)}{tail})")
        return None
    return check


def _ports(role):
    return lambda text, report: check_ports(text, role, report)


def _host_address(text, report):
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]  # as in the short form, where an IPv6 address needs them
    return check_host_address(text, report)


def _guest_addresses(items, scope):
    out: dict[int, str] = {}
    for text, report in items:
        check_guest_address(text, out, report)
    return tuple(out[v] for v in (4, 6) if v in out)


def _sources(items, scope):
    host = scope["host_address"]
    out: list[str] = []
    for text, report in items:
        net = check_source(text, host, report)
        if net is not None and net not in out:
            out.append(net)
    return tuple(out)


def _forward_long(v, values, found, node, name, knode):
    """The mapping form: guest_port defaults to host_port, which is required,
    except in `{8080: 80}` (the short form with a space after ':'), which
    items() already explained as an unknown key."""
    scalar = v.yaml.ScalarNode
    spaced = len(node.value) == 1 and all(isinstance(n, scalar) for n in node.value[0]) and _digits(node.value[0][0].value)
    if "host_port" not in found and not spaced:
        v.add(node, "forward is missing 'host_port' (expected e.g. {host_port: 2222, guest_port: 22})")
    hp = values["host_port"]
    gnode, gp = (found["guest_port"][1], values["guest_port"]) if "guest_port" in found else (node, hp)
    if hp and gp:
        check_same_length(hp, gp, lambda m: v.add(gnode, m))
    return values["protocol"], values["host_address"], hp, gp, values["source"]


def _claim_guest(v, name, knode) -> bool:
    """A guest is defined once across all files (the first one counts)."""
    if name == "":
        v.add(knode, "empty guest name (expected a libvirt domain name)")
        return False
    if name in v.guest_at:
        v.add(knode, f"guest '{name}' is already defined at {v.guest_at[name]} (expected each guest once across all files)")
        return False
    v.guest_at[name] = v.at(knode)
    return True


def _keep_guest(v, values, found, node, name, knode):
    """The guest's forwards, each checked against its fixed addresses and
    queued for the conflict sweep (check_conflicts) with where it was written."""
    addresses = values["address"]
    families = families_of(addresses)
    rules = []
    for parsed, item in values["forward"]:
        line, col = item.start_mark.line + 1, item.start_mark.column + 1
        rule = PortRule(*parsed, f"{v.file}:{line}")
        if not check_family_fit(rule, name, addresses, lambda m, item=item: v.add(item, m)):
            continue
        rules.append(rule)
        v.rules.append(sweep_rule(rule, name, len(v.rules), families, None, v.index, v.file, line, col))
    v.guests[name] = GuestConfig(name, addresses, values["interface"], values["allow_outside_network"],
                                 tuple(rules), f"{v.file}:{knode.start_mark.line + 1}")


def _keep_settings(v, values, found, node, name, knode):
    """A setting is set once across all files (a valid value counts)."""
    for key, (kn, _vn) in found.items():
        if values[key] is None:
            continue
        if key in v.setting_at:
            v.add(kn, f"setting '{key}' is already set at {v.setting_at[key]} (expected each setting once across all files)")
            continue
        v.setting_at[key] = v.at(kn)
        v.settings[key] = values[key]


FORWARD = Spec(
    "forward", "expected a string like \"8080:80\" or a mapping with 'host_port'",
    scalar=parse_short,  # 8080:80, [HOSTADDR:]HOSTPORT:GUESTPORT[/PROTOCOL]
    context="in forward", finish=_forward_long, fields={
        "host_port": Spec("'host_port'", _PORT_EXPECT, scalar=_ports("host")),
        "guest_port": Spec("'guest_port'", _PORT_EXPECT, scalar=_ports("guest")),  # default: host_port
        "protocol": Spec("'protocol'", f"expected one of: {_one_of(PROTOCOLS)}", "tcp", scalar=check_protocol),
        "host_address": Spec("'host_address'", "expected an IPv4 or IPv6 address", scalar=_host_address),
        "source": Spec(
            "'source'", "expected an address, a network like 198.51.100.0/24, or a list of them", (),
            many=_sources, one=("source", "expected an address or a network like 198.51.100.0/24"),
            empty="empty 'source' list (expected at least one address or network; leave 'source' out to allow everyone)",
        ),
    },
)

GUEST = Spec(
    "guest '{name}'", "expected a list of forwards, or a mapping with 'forward'",
    optional=True, short_for="forward", context="in guest '{name}'", finish=_keep_guest, fields={
        "address": Spec(
            "'address'", "expected an address or a list of addresses", (),
            many=_guest_addresses, one=("guest address", "expected an IPv4 or IPv6 address"),
            empty="empty 'address' list (expected one IPv4 and/or one IPv6 address)",
        ),
        "interface": Spec("'interface'", "expected a MAC address or a libvirt network name",
                          scalar=check_interface, nonblank=True),
        "allow_outside_network": Spec("'allow_outside_network'", "expected true or false", False, boolean=True),
        "forward": Spec("'forward' of guest '{name}'", "expected a list", (), items=FORWARD, optional=True),
    },
)

TOP = Spec(
    "the top level", "expected a mapping with 'settings' and/or 'guests'", optional=True, context="at the top level",
    fields={
        "settings": Spec(
            "'settings'", "expected a mapping", optional=True, context="in settings", finish=_keep_settings,
            fields={k: Spec(f"'{k}'", f"expected one of: {_one_of(c)}", scalar=_choice(k, c))
                    for k, c in SETTING_CHOICES.items()},
        ),
        "guests": Spec("'guests'", "expected a mapping of guest names", optional=True, context="in guests",
                       names=GUEST, claim=_claim_guest),
    },
)

# The keys of each mapping, for the docs' tests and the messages.
TOP_KEYS = tuple(TOP.fields)
GUEST_KEYS = tuple(GUEST.fields)
FORWARD_KEYS = tuple(FORWARD.fields)

class _Validator:
    """Walks composed nodes of each file and collects (file_index, Problem)."""

    def __init__(self):
        self.problems: list[tuple[int, Problem]] = []
        self.settings: dict[str, str] = {}
        self.setting_at: dict[str, str] = {}
        self.guests: dict[str, GuestConfig] = {}
        self.guest_at: dict[str, str] = {}
        self.rules: list[_Rule] = []
        self.index = 0
        self.file = ""

    # -- plumbing

    def add_plain(self, index, file, message):
        self.problems.append((index, Problem(file, 0, 0, message)))

    def add(self, node_or_mark, message):
        mark = getattr(node_or_mark, "start_mark", node_or_mark)
        self.problems.append((self.index, Problem(self.file, mark.line + 1, mark.column + 1, message)))

    def at(self, node) -> str:
        return f"{self.file}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"

    def what(self, node) -> str:
        y = self.yaml
        if isinstance(node, y.MappingNode):
            return "a mapping"
        if isinstance(node, y.SequenceNode):
            return "a list"
        tag = node.tag.rsplit(":", 1)[-1]
        return {
            "int": f"the number {node.value}",
            "float": f"the number {node.value}",
            "bool": f"the boolean {node.value}",
            "null": "empty",
            "timestamp": f"the date {node.value}",
        }.get(tag, f"the string '{node.value}'")

    def keys(self, node, spec: Spec, name) -> dict:
        """{key: (key node, value node)} of a mapping, in order, reporting bad keys."""
        y = self.yaml
        seen: dict[str, Any] = {}
        found: dict[str, tuple] = {}
        known = spec.fields
        for knode, vnode in node.value:
            if not isinstance(knode, y.ScalarNode):
                self.add(knode, f"key {spec.context.format(name=name)} is {self.what(knode)} (expected a name)")
                continue
            key = knode.value
            if key in seen:
                first = seen[key]
                self.add(
                    knode,
                    f"duplicate key '{key}' (first at line {first.start_mark.line + 1},"
                    f" column {first.start_mark.column + 1}; expected each key once)",
                )
                continue
            seen[key] = knode
            if known is not None and key not in known:
                self.unknown(knode, key, vnode, spec.context.format(name=name), known)
                continue
            found[key] = (knode, vnode)
        return found

    def unknown(self, knode, key, vnode, context, known):
        y = self.yaml
        if "host_port" in known and isinstance(vnode, y.ScalarNode) and _digits(key):
            self.add(knode, f"unknown key '{key}' {context} (did you mean \"{key}:{vnode.value}\"? a space after ':' makes a mapping)")
            return
        hint = _suggest(key, known)
        if hint:
            self.add(knode, f"unknown key '{key}' {context} (did you mean '{hint}'?)")
        else:
            self.add(knode, f"unknown key '{key}' {context} (expected one of: {_one_of(known)})")

    # -- files

    def check_file(self, index, path, data):
        self.index, self.file = index, path
        y, loader = _yaml()
        self.yaml = y
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            start = data.rfind(b"\n", 0, e.start) + 1
            col = len(data[start : e.start].decode("utf-8", "replace")) + 1
            self.problems.append(
                (index, Problem(path, line, col, f"not valid UTF-8: byte 0x{data[e.start]:02x} (expected a UTF-8 text file)"))
            )
            return
        if text.startswith("\ufeff"):
            text = text[1:]
        node = self.compose(text, y, loader)
        if node is not None:
            self.walk(node, TOP)

    def compose(self, text, y, loader):
        nest = _nesting_problem(text)
        if nest:
            line, col = _line_col(text, nest[0])
            self.problems.append((self.index, Problem(self.file, line, col, nest[1])))
            return None
        if "*" in text or text.count("-") + text.count("?") > MAX_DEPTH:
            # Aliases and deep block nesting are only visible as events: the
            # composer resolves aliases silently and recurses on nesting.
            found = False
            depth = 0
            try:
                for ev in y.parse(text, Loader=loader):
                    if isinstance(ev, y.AliasEvent):
                        self.add(ev, f"YAML alias '*{ev.anchor}' is not allowed (expected the value written out in full)")
                        found = True
                    elif isinstance(ev, (y.MappingStartEvent, y.SequenceStartEvent)):
                        depth += 1
                        if depth > MAX_DEPTH:
                            self.add(ev, f"nesting deeper than {MAX_DEPTH} levels (expected a port map, which needs 6)")
                            return None
                    elif isinstance(ev, (y.MappingEndEvent, y.SequenceEndEvent)):
                        depth -= 1
            except y.MarkedYAMLError as e:
                self.syntax(e, text)
                return None
            except y.YAMLError:
                found = False  # a ReaderError: compose below reports it
            if found:
                return None
        try:
            return y.compose(text, Loader=loader)
        except y.MarkedYAMLError as e:
            self.syntax(e, text)
        except y.YAMLError as e:  # ReaderError: bad characters
            pos = getattr(e, "position", 0) or 0
            line, col = _line_col(text, pos)
            ch = getattr(e, "character", None)
            if isinstance(ch, int):
                ch = chr(ch)
            desc = f"U+{ord(ch):04X}" if isinstance(ch, str) and ch else "a character"
            self.problems.append(
                (self.index, Problem(self.file, line, col, f"character {desc} is not allowed in YAML (expected printable text)"))
            )
        except RecursionError:
            self.problems.append((self.index, Problem(self.file, 1, 1, "nesting too deep (expected a port map)")))
        return None

    def syntax(self, e, text):
        mark = e.problem_mark or e.context_mark
        if mark is None:
            self.problems.append((self.index, Problem(self.file, 1, 1, f"YAML syntax error: {e}")))
            return
        lines = text.split("\n")
        ch = ""
        if mark.line < len(lines) and mark.column < len(lines[mark.line]):
            ch = lines[mark.line][mark.column]
        problem = e.problem or "invalid YAML"
        if ch == "\t":
            msg = "tab character where YAML expects spaces (expected spaces for indentation)"
        elif problem == "but found another document":
            msg = "a second YAML document (expected a single document; remove the extra '---')"
        elif problem == "found undefined alias":
            msg = "YAML aliases are not allowed (expected the value written out in full)"
        else:
            msg = f"YAML syntax error: {problem}"
            if e.context:
                ctx = e.context
                cm = e.context_mark
                if cm is not None and (cm.line, cm.column) != (mark.line, mark.column):
                    ctx += f" started at line {cm.line + 1}, column {cm.column + 1}"
                msg += f" ({ctx})"
        self.add(mark, msg)

    # -- the schema walk

    def walk(self, node, spec: Spec, name=None, knode=None, scope=None):
        """Read `node` as `spec` says (see Spec), reporting every problem at
        its node; returns the value, or spec.default when the node is unusable.
        name: the guest the node belongs to; knode: the node's key."""
        y = self.yaml
        if isinstance(node, y.ScalarNode):
            if node.tag == _NULL:
                if spec.optional:
                    if spec.fields is not None:
                        return self.mapping(node, spec, {}, name, knode)
                    return spec.default
            elif spec.scalar is not None:
                if not spec.nonblank or node.value.strip():
                    return spec.scalar(node.value, lambda m: self.add(node, m))
            elif spec.boolean:
                if node.tag == _BOOL:
                    return node.value.lower() in ("true", "yes", "on", "y")
            elif spec.many is not None:
                return spec.many([(node.value, lambda m: self.add(node, m))], scope)
        elif isinstance(node, y.MappingNode):
            if spec.fields is not None:
                return self.mapping(node, spec, self.keys(node, spec, name), name, knode)
            if spec.names is not None:
                for key, (kn, vn) in self.keys(node, spec, name).items():
                    if spec.claim(self, key, kn):
                        self.walk(vn, spec.names, key, kn)
                return spec.default
        elif isinstance(node, y.SequenceNode):
            if spec.items is not None:
                out = []
                for item in node.value:
                    before = len(self.problems)
                    value = self.walk(item, spec.items, name)
                    if len(self.problems) == before:
                        out.append((value, item))
                return out
            if spec.short_for is not None:
                return self.mapping(node, spec, {spec.short_for: (None, node)}, name, knode)
            if spec.many is not None:
                if not node.value:
                    self.add(node, spec.empty)
                    return spec.default
                label, expect = spec.one
                items = []
                for item in node.value:
                    if isinstance(item, y.ScalarNode) and item.tag != _NULL:
                        items.append((item.value, lambda m, item=item: self.add(item, m)))
                    else:
                        self.add(item, f"{label} is {self.what(item)} ({expect})")
                return spec.many(items, scope)
        self.add(node, f"{spec.label.format(name=name)} is {self.what(node)} ({spec.expect})")
        return spec.default

    def mapping(self, node, spec: Spec, found: dict, name, knode):
        """The fields of a mapping (`found`: key -> (key node, value node)),
        read in the schema's order, then spec.finish."""
        values: dict = {}
        for key, fspec in spec.fields.items():
            pair = found.get(key)
            values[key] = fspec.default if pair is None else self.walk(pair[1], fspec, name, pair[0], values)
        if spec.finish is None:
            return values
        return spec.finish(self, values, found, node, name, knode)

    # -- across files

    def check_conflicts(self):
        """Find forwards that claim the same host address, port and protocol (see overlaps())."""
        reported = set()
        for r, other in overlaps(self.rules):
            later, earlier = (r, other) if r.order > other.order else (other, r)
            if later.order not in reported:
                reported.add(later.order)
                self.problems.append((later.findex, Problem(later.file, later.line, later.col, conflict_message(later, earlier))))


def _digits(s: str) -> bool:
    return s.isascii() and s.replace("-", "").isdigit()


def _not_unicast(addr) -> str | None:
    if addr.is_unspecified:
        return "the unspecified address"
    if addr.is_multicast:
        return "a multicast address"
    if addr.version == 4 and int(addr) == 0xFFFFFFFF:
        return "the broadcast address"
    return None


def _describe(r: _Rule) -> str:
    lo, hi = r.rule.host_ports
    ports = f"port {lo}" if lo == hi else f"ports {lo}-{hi}"
    where = r.rule.host_address or "every host address"
    return f"{r.rule.protocol} {ports} on {where}"


def conflict_message(later: _Rule, earlier: _Rule) -> str:
    return (
        f"forward of {_describe(later)} overlaps {_describe(earlier)} of guest '{earlier.guest}'"
        f" at {earlier.place}"
        " (expected each host address, port and protocol to be forwarded only once)"
    )


# --------------------------------------------------------------------------
# CLI


def check_main(path: str | None) -> int:
    """`vnethook check`: validate the map and the ports domains declare in
    their metadata; print every problem or a summary."""
    from vnethook.paths import get_paths

    paths = get_paths(path)
    try:
        cfg = load_config(paths)
    except ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        meta = check_metadata(paths, None)
        for p in meta[0]:
            print(p, file=sys.stderr)
        print(f"{len(e.problems)} problem(s) in the port map", file=sys.stderr)
        if meta[0]:
            print(f"{len(meta[0])} problem(s) in domain metadata", file=sys.stderr)
        return 1
    problems, merged, meta_guests = check_metadata(paths, cfg)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in domain metadata", file=sys.stderr)
        return 1
    from vnethook.listeners import host_listeners, taken

    for w in taken([r for g in merged.guests.values() for r in g.forwards], host_listeners()):
        print(w, file=sys.stderr)
    from vnethook.firewalld import strict_problem

    strict = strict_problem(use_bus=True)
    if strict:
        print(f"error: {strict}", file=sys.stderr)
        return 1
    forwards = sum(len(g.forwards) for g in cfg.guests.values())
    tail = ""
    if meta_guests:
        n = sum(1 for g in merged.guests.values() for r in g.forwards if r.origin.startswith("domain "))
        tail = f"; {n} forward(s) in the metadata of {meta_guests} domain(s)"
    print(f"OK: {len(cfg.guests)} guest(s), {forwards} forward(s) in {len(cfg.files)} file(s){tail}")
    return 0


def check_metadata(paths, cfg: Config | None):
    """(problems, merged Config, domains with metadata) for `check`.

    The domains vnethook can read without libvirt: the running ones
    (/run/libvirt/qemu, their live XML) and the defined ones
    (/etc/libvirt/qemu). A running guest is judged by its live metadata,
    and its definition's problems are reported too; conflicts are looked for
    across the map and every domain, as the hook would resolve them.
    """
    from vnethook import metadata

    running = metadata.running(paths)
    defined = metadata.defined(paths)
    live = {m.domain for m in running}
    metas = running + [m for m in defined if m.domain not in live]
    base = cfg if cfg is not None else Config(Settings(), {}, ())
    merged, by_domain = metadata.merge(base, metas)
    source = {m.domain: m.source for m in metas}
    problems: list = []
    for d in sorted(by_domain):
        problems.extend(f"{p} (in {source.get(d, '?')})" for p in by_domain[d])
    for m in defined:
        if m.domain in live:
            problems.extend(f"{p} (in {m.source})" for p in m.problems)
    return problems, merged, len(metas)
