"""Forwards as iptables rules in the legacy (x_tables) tables.

For hosts whose `iptables` is iptables-legacy: libvirt's REJECT then lives
in the legacy tables, and only a legacy accept ahead of it helps. The change
logic is the nft flavour's (iptables_nft plans every change as restore
lines); the rules are iptables_rules' marked layout, because here every
commit replaces the whole table in the kernel and costs what the table
holds (IPT_SO_SET_REPLACE reads and replaces every entry): one DNAT entry
per forward and nothing per forward in filter.

IPv4 goes through python-iptables (iptc) in-process: each table section of
a change is applied to one libiptc handle and committed once, with
autocommit off, so a change is one kernel table replacement per table (as
atomic as a restore run, without a process). libiptc does not take the
xtables lock, and a legacy commit replaces the whole table, so two writers
without the lock lose each other's rules: the lock (`flock` on
/run/xtables.lock, or $XTABLES_LOCKFILE, as iptables itself does) is held
from reading the table to committing it.

IPv6 goes through `ip6tables-legacy-restore --noflush -w`, as before.
python-iptables 1.0.1 with iptables >= 1.8.7 cannot do NAT for both
families in one process: DNAT, SNAT and MASQUERADE live in one extension,
libxt_NAT.so, whose constructor registers only the current family's
targets, once per process (a second dlopen does not run it again). So after
an IPv4 DNAT, an IPv6 DNAT fails with "can't find target DNAT" (and the
other way round); a fresh xtables init and iptc.easy fail the same way; and
calling the extension's init again makes libxtables print `target "DNAT"
already registered` and exit(1) from C, which a libvirt hook cannot
afford. (Registering both families works only with a second copy of
libxt_NAT.so loaded from a memfd after switching libxtables to IPv6: tried
here, it works, but it rests on libxtables internals (the duplicate check
running before the family filter), and if those change the failure mode
is that exit(1) again.) A restore process is the cheaper risk.

Importing iptc the ordinary way costs more than a whole hook run: it runs `ldconfig -N -v` to
find the extensions, `ldconfig -p` (and even gcc) through
ctypes.util.find_library for its libraries, and imports distutils, which
setuptools' shim turns into importing setuptools. load_iptc() points it
straight at the files instead, and only when an IPv4 change is
actually made: this module is imported only when the backend is chosen,
and iptc only inside it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
import sys
import sysconfig
import types
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

from vnethook.firewall import iptables_rules as ir
from vnethook.firewall.base import FirewallError
from vnethook.firewall.iptables_nft import IptablesNftBackend, RestoreError
from vnethook.lock import acquire

LOCK_PATH = "/run/xtables.lock"  # iptables' XT_LOCK_NAME on Debian, Fedora, Arch
LOCK_TIMEOUT = 60.0  # the restore tools' subprocess timeout in iptables_nft


# --- finding the libraries ---------------------------------------------------------


def lib_dirs(multiarch: Optional[str] = None) -> List[str]:
    """Directories that may hold libxtables and its extensions, likeliest first."""
    if multiarch is None:
        multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    out: List[str] = []
    for base in ("/usr/lib", "/lib"):
        if multiarch:
            out.append(f"{base}/{multiarch}")
    out += ["/usr/lib64", "/lib64", "/usr/lib", "/lib", "/usr/local/lib64", "/usr/local/lib"]
    return out


def find_xtables_dir(dirs: Sequence[str], isdir=os.path.isdir) -> Optional[str]:
    """The extension directory ($XTABLES_LIBDIR wins, as in libxtables)."""
    env = os.environ.get("XTABLES_LIBDIR")
    if env:
        return env
    for d in dirs:
        if isdir(os.path.join(d, "xtables")):
            return os.path.join(d, "xtables")
    return None


_listings: Dict[str, List[str]] = {}


def _listing(d: str) -> List[str]:
    """A directory's names, read once per process: iptc asks for several
    libraries in /usr/lib/<multiarch>, which holds thousands of files."""
    if d not in _listings:
        try:
            _listings[d] = os.listdir(d)
        except OSError:
            _listings[d] = []
    return _listings[d]


def find_soname(name: str, dirs: Sequence[str]) -> Optional[str]:
    """Path of `lib<name>.so.N` in the first dir that has one (shortest name wins).

    What ctypes.util.find_library answers, without running ldconfig.
    """
    prefix = f"lib{name}.so."
    for d in dirs:
        found = [n for n in _listing(d) if n.startswith(prefix) and n[len(prefix):len(prefix) + 1].isdigit()]
        if found:
            return os.path.join(d, min(found, key=lambda n: (len(n), n)))
    return None


@contextlib.contextmanager
def _fast_lookups(dirs: Sequence[str], pkg_parent: str) -> Iterator[None]:
    """While iptc imports: answer its library searches from `dirs`, stub distutils.

    iptc only uses distutils' get_python_lib() as one more place to look
    for its libxtwrapper; the stub answers with the directory iptc itself
    lives in. Both patches are undone before this returns.
    """
    import ctypes.util

    real = ctypes.util.find_library

    def find_library(name: str) -> Optional[str]:
        return find_soname(name, dirs) or real(name)

    stubs = {}
    if "distutils" not in sys.modules and "distutils.sysconfig" not in sys.modules:
        pkg = types.ModuleType("distutils")
        sc = types.ModuleType("distutils.sysconfig")
        sc.get_python_lib = lambda *a, **k: pkg_parent  # type: ignore[attr-defined]
        pkg.sysconfig = sc  # type: ignore[attr-defined]
        stubs = {"distutils": pkg, "distutils.sysconfig": sc}
    ctypes.util.find_library = find_library
    sys.modules.update(stubs)
    try:
        yield
    finally:
        ctypes.util.find_library = real
        for name, mod in stubs.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]


_iptc: Optional[types.ModuleType] = None


def import_env(dirs: Sequence[str], pkg_parent: str) -> Dict[str, str]:
    """The variables that point python-iptables straight at its files.

    XTABLES_LIBDIR: the extensions (else iptc runs `ldconfig -N -v`).
    IPTABLES_LIBDIR: where iptc tries exact file names: libxtables.so.N
    (with PYTHON_IPTABLES_XTABLES_VERSION=N) and its own libxtwrapper
    (lib<name><EXT_SUFFIX>, next to the package). Values the caller set win.
    """
    env: Dict[str, str] = {}
    xtdir = find_xtables_dir(dirs)
    if xtdir:
        env["XTABLES_LIBDIR"] = xtdir
        parent = os.path.dirname(xtdir)
        dirs = [parent] + [d for d in dirs if d != parent]
    env["IPTABLES_LIBDIR"] = ":".join([dirs[0], pkg_parent])
    xt = find_soname("xtables", dirs)
    if xt:
        env["PYTHON_IPTABLES_XTABLES_VERSION"] = xt.rsplit(".so.", 1)[1].split(".")[0]
    return {k: v for k, v in env.items() if k not in os.environ}


@contextlib.contextmanager
def _scoped_env(env: Dict[str, str]) -> Iterator[None]:
    """Set variables for the import only; children (ip6tables-legacy-restore) never see them.

    iptc reads them at import; libxtables, initialised later, then uses its
    own built-in extension directory, as the iptables tools do.
    """
    os.environ.update(env)
    try:
        yield
    finally:
        for k in env:
            os.environ.pop(k, None)


def _forget_iptc() -> None:
    for name in [m for m in sys.modules if m == "iptc" or m.startswith("iptc.")]:
        del sys.modules[name]


def load_iptc() -> types.ModuleType:
    """Import python-iptables quickly, once; FirewallError if it is missing."""
    global _iptc
    if _iptc is not None:
        return _iptc
    if "iptc" in sys.modules:
        _iptc = sys.modules["iptc"]
        return _iptc
    spec = importlib.util.find_spec("iptc")
    if spec is None or not spec.submodule_search_locations:
        raise FirewallError("python-iptables is missing (install python3-iptables): "
                            "the iptables-legacy backend uses it for IPv4")
    pkg_parent = os.path.dirname(list(spec.submodule_search_locations)[0])
    dirs = lib_dirs()
    try:
        with _scoped_env(import_env(dirs, pkg_parent)), _fast_lookups(dirs, pkg_parent):
            import iptc
    except Exception:  # noqa: BLE001 - the shortcuts missed: the slow, stock import
        _forget_iptc()
        try:
            import iptc
        except Exception as e:  # noqa: BLE001 - a broken install is a missing dependency
            _forget_iptc()
            raise FirewallError(f"cannot load python-iptables: {e}") from None
    _iptc = iptc
    return iptc


# --- the xtables lock ------------------------------------------------------------------


@contextlib.contextmanager
def xtables_lock(path: Optional[str] = None, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold iptables' own lock, like `iptables -w`: other tools wait for us and we for them."""
    path = path or os.environ.get("XTABLES_LOCKFILE") or LOCK_PATH
    timeout = LOCK_TIMEOUT if timeout is None else timeout
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise FirewallError(f"cannot open the xtables lock {path}: {e.strerror}") from None
    try:
        try:
            got = acquire(fd, timeout)
        except OSError as e:
            raise FirewallError(f"cannot lock {path}: {e.strerror}") from None
        if not got:
            raise FirewallError(f"another program held the xtables lock {path} "
                                f"for more than {timeout:g} s")
        yield
    finally:
        os.close(fd)  # releases the flock


# --- restore lines -> libiptc --------------------------------------------------------------


class Spec(NamedTuple):
    """An iptables-save rule spec, split into what iptc builds a rule from."""

    addrs: Tuple[Tuple[str, str], ...]  # (iptc attribute, value with "!" prefix if negated)
    matches: Tuple[Tuple[str, Tuple[Tuple[str, str], ...]], ...]  # (name, ((option, value), ...))
    target: Optional[Tuple[str, bool, Tuple[Tuple[str, str], ...]]]  # (name, goto, options)


_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')


def _split(spec: str) -> List[str]:
    """Words of a spec; iptables-save quotes a value (comments) as "..." with \\ escapes."""
    out = []
    for m in _TOKEN.finditer(spec):
        if m.group(2) is not None:
            if '"' in m.group(2) or "\\" in m.group(2):
                return shlex.split(spec)  # anything unusual: the full shell rules
            out.append(m.group(2))
        elif m.end() < len(spec) and not spec[m.end()].isspace():
            return shlex.split(spec)
        else:
            out.append(re.sub(r"\\(.)", r"\1", m.group(1)))
    return out


_ADDR = {"-s": "src", "-d": "dst", "-p": "protocol", "-i": "in_interface", "-o": "out_interface"}


def parse_spec(spec: str) -> Spec:
    """Split a spec as iptables-save prints it (our canonical form); ValueError if odd."""
    toks = _split(spec)
    addrs: List[Tuple[str, str]] = []
    matches: List[Tuple[str, List[Tuple[str, str]]]] = []
    target: Optional[Tuple[str, bool, List[Tuple[str, str]]]] = None
    opts: Optional[List[Tuple[str, str]]] = None
    neg = False
    i = 0
    while i < len(toks):
        t = toks[i]
        if t == "!":
            if neg:
                raise ValueError(f"double negation in {spec!r}")
            neg = True
            i += 1
            continue
        if t in _ADDR or t in ("-m", "-j", "-g"):
            if i + 1 >= len(toks):
                raise ValueError(f"{t} without a value in {spec!r}")
            value = toks[i + 1]
            if t in _ADDR:
                if opts is not None:
                    raise ValueError(f"{t} after a match or target in {spec!r}")
                addrs.append((_ADDR[t], ("!" if neg else "") + value))
            elif neg:
                raise ValueError(f"negated {t} in {spec!r}")
            elif target is not None:
                raise ValueError(f"{t} after the target in {spec!r}")
            elif t == "-m":
                opts = []
                matches.append((value, opts))
            else:
                opts = []
                target = (value, t == "-g", opts)
            i += 2
        elif t.startswith("--") and opts is not None:
            j = i + 1
            while j < len(toks) and toks[j] != "!" and not toks[j].startswith("-"):
                j += 1
            value = " ".join(toks[i + 1:j])
            opts.append((t[2:], ("!" if neg else "") + value))
            i = j
        else:
            raise ValueError(f"unexpected {t!r} in {spec!r}")
        neg = False
    if neg:
        raise ValueError(f"dangling '!' in {spec!r}")
    return Spec(tuple(addrs),
                tuple((n, tuple(o)) for n, o in matches),
                (target[0], target[1], tuple(target[2])) if target else None)


_rule_classes: Dict[int, type] = {}


def _rule_class(iptc: types.ModuleType) -> type:
    """iptc.Rule that looks up jump targets only in the table it is built for.

    Stock iptc decides whether a target name is a chain by opening every
    table (filter, mangle, raw, nat, security): on a legacy host that loads
    and creates the tables nobody used, and a closed cached handle crashes
    it. A jump is only ever to a chain of the rule's own table.
    """
    cls = _rule_classes.get(id(iptc))
    if cls is None:
        class TableRule(iptc.Rule):  # type: ignore[name-defined]
            in_tables: Sequence = ()

            @property
            def tables(self):
                return list(self.in_tables)

            def final_check(self):
                # The extensions' own checks, as iptables runs them. Stock
                # iptc first prints every extension's options through its
                # save function and parses them back, for every rule.
                if self.target and self.target._module:
                    self.target._final_check()
                for m in self.matches:
                    if m._module:
                        m._final_check()

        cls = _rule_classes[id(iptc)] = TableRule
    return cls


def build_rule(iptc: types.ModuleType, spec: str, table=None):
    """An iptc.Rule (IPv4) equal to what iptables would build from `spec` in `table`.

    `table` answers is_chain() for jump targets (an iptc.Table, normally).
    """
    parsed = parse_spec(spec)
    rule = _rule_class(iptc)()
    rule.in_tables = (table,) if table is not None else ()
    for attr, value in parsed.addrs:
        setattr(rule, attr, value)
    for name, options in parsed.matches:
        m = rule.create_match(name)
        for opt, value in options:
            m.set_parameter(opt, value)
    if parsed.target is None:
        raise ValueError(f"no target in {spec!r}")
    name, goto, options = parsed.target
    t = rule.create_target(name, goto=goto)
    for opt, value in options:
        t.set_parameter(opt, value)
    return rule


def batch_sections(batch: str) -> List[Tuple[str, List[Tuple[int, str]]]]:
    """`*table` ... `COMMIT` sections of a restore batch, with 1-based line numbers.

    The numbers are the batch's own, so a RestoreError names the same line
    a restore tool would, and iptables_nft's _committed() stays right.
    """
    out: List[Tuple[str, List[Tuple[int, str]]]] = []
    cur: Optional[List[Tuple[int, str]]] = None
    for n, line in enumerate(batch.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            cur = []
            out.append((line[1:], cur))
        elif line == "COMMIT":
            if cur is None:
                raise ValueError(f"line {n}: COMMIT outside a table")
            cur.append((n, line))
            cur = None
        elif cur is None:
            raise ValueError(f"line {n}: {line!r} outside a table")
        else:
            cur.append((n, line))
    if cur is not None:
        raise ValueError("batch ends without COMMIT")
    return out


class IptcError(Exception):
    """One restore line could not be applied through libiptc."""


def apply_line(iptc: types.ModuleType, table, line: str) -> None:
    """Apply one restore line to an uncommitted libiptc handle, as the restore tool would."""
    if line.startswith(":"):
        chain = line[1:].split(" ", 1)[0]
        # Declaring an existing chain in a --noflush restore flushes it.
        if table.is_chain(chain):
            table.flush_entries(chain)
        else:
            table.create_chain(chain)
        return
    parts = line.split(" ", 2)
    op, chain = parts[0], parts[1] if len(parts) > 1 else ""
    rest = parts[2] if len(parts) > 2 else ""
    if op == "-F" and not rest:
        table.flush_entries(chain)
    elif op == "-X" and not rest:
        table.delete_chain(chain)
    elif op == "-A":
        iptc.Chain(table, chain).append_rule(build_rule(iptc, rest, table))
    elif op == "-I":
        pos, _, spec = rest.partition(" ")
        if not pos.isdigit() or int(pos) < 1:
            raise IptcError(f"bad rule number in {line!r}")
        iptc.Chain(table, chain).insert_rule(build_rule(iptc, spec, table), int(pos) - 1)
    elif op == "-D":
        iptc.Chain(table, chain).delete_rule(build_rule(iptc, rest, table))
    elif op == "-C":
        if not check_entry(iptc, table, chain, build_rule(iptc, rest, table)):
            raise IptcError("no such rule")
    else:
        raise IptcError(f"unsupported restore line {line!r}")


def check_entry(iptc: types.ModuleType, table, chain: str, rule) -> bool:
    """`iptables -C`: libiptc's own comparison (python-iptables' Rule == ignores jump targets)."""
    import ctypes

    fn = iptc.ip4tc._libiptc.iptc_check_entry
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    rule.final_check()  # what append_rule and delete_rule do first
    return fn(chain.encode(), ctypes.cast(rule.rule, ctypes.c_void_p),
              ctypes.cast(rule.mask, ctypes.c_void_p), table._handle) == 1


class IptablesLegacyBackend(IptablesNftBackend):
    """iptables-legacy: IPv4 through libiptc in-process, IPv6 through ip6tables-legacy-restore."""

    name = "iptables-legacy"
    forward_flavour = "legacy"
    # Shared chains only. A legacy commit replaces the whole table anyway,
    # so per-guest chains save nothing there and cost more: 3 chains per
    # guest make the blob and libiptc's chain handling bigger (slower with
    # 1000 guests in benchmarks/run, started and stopped alike). Both
    # layouts are read and changed by the same code (iptables_nft._plan).
    per_guest_chains = False
    # The marked layout: a change costs what the tables it replaces hold,
    # so per forward only a DNAT entry (iptables_rules' module docstring).
    marked = True
    restore_tools = {4: "iptables-legacy-restore", 6: "ip6tables-legacy-restore"}
    save_tools = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
    nf_tables = False
    restore_steps = False  # IPv4 goes through iptc (_restore below)

    def _restore(self, family: int, batch: str) -> None:
        if family != 4:
            super()._restore(family, batch)
            return
        self._iptc_restore(batch)

    def _remove_family(self, fam: int, sections: Dict[str, List[str]], old: List[str],
                       key: Optional[str] = None) -> None:
        removal = self._batch(sections)
        if fam == 4:
            # The teardown rides in the removal's commit when the removal
            # empties our chains: the table is read once, not twice.
            self._iptc_restore(removal, self._teardown_sections(fam))
        else:
            self._restore(fam, removal)
            self._teardown_if_empty(fam)  # fails, changing nothing, while guests remain

    def _iptc_restore(self, batch: str, teardown: Optional[Dict[str, List[str]]] = None) -> None:
        """Each `*table` section: one libiptc handle, its lines, one commit.

        Like a restore run: sections commit in order, a failing line leaves
        its table untouched, and the RestoreError names that line so the
        caller knows which tables already committed. `teardown`: sections
        applied with the batch's when, after its nat lines, nat's guest
        chains are empty (the last guest left); if they fail, the batch's
        own lines still commit, alone.
        """
        try:
            sections = batch_sections(batch)
        except ValueError as e:
            raise RestoreError(f"iptc: bad batch: {e}") from None
        own = {t for t, _ in sections}  # the tables the batch itself changes
        if teardown is not None:
            end = max((lines[-1][0] for _, lines in sections), default=0)
            sections += [(t, [(end, "COMMIT")]) for t in ir.TABLES if t not in own and teardown.get(t)]
            sections.sort(key=lambda s: ir.TABLES.index(s[0]) if s[0] in ir.TABLES else len(ir.TABLES))
        if not sections:
            return
        iptc = load_iptc()
        errors = (iptc.IPTCError, iptc.XTablesError, IptcError, ValueError, AttributeError,
                  TypeError)
        tear = False
        with xtables_lock():
            for table_name, lines in sections:
                if table_name not in own and table_name != "nat" and not tear:
                    continue  # there only for a teardown that is not happening
                n, line = lines[0][0] - 1, ""  # the `*table` line: nothing of it committed
                try:
                    table = iptc.Table(table_name, autocommit=False)  # reads it when new
                    if table_name in _opened:
                        table.refresh()  # the cached handle is stale: read it under the lock
                    _opened.add(table_name)
                    for n, line in lines:  # noqa: B007 (n names the failing line below)
                        if line != "COMMIT":
                            apply_line(iptc, table, line)
                    if teardown is not None:
                        tear = self._fold_teardown(iptc, table, table_name, lines, teardown, tear)
                    if table_name not in own and not tear:
                        continue  # read only to decide the teardown: nothing to commit
                    table.commit()
                except errors as e:
                    what = ("reading the table" if not line else
                            "commit" if line == "COMMIT" else repr(line))
                    raise RestoreError(f"iptc ({table_name}) line {n} failed: {what}: {e}",
                                       n) from None
                # The handle stays open (jump targets are looked up in it
                # while rules are built); the next section that uses this
                # table refreshes it, which also drops what a failed section
                # left uncommitted.


    def _fold_teardown(self, iptc, table, table_name: str, lines, teardown, tear: bool) -> bool:
        """Add the teardown to this table's uncommitted handle if the last guest left.

        nat decides (its guest chains exist and are empty); filter follows
        nat's decision. A teardown line that fails means the base is not
        what we left: the handle is read again and only the batch's own
        lines are applied; a later sync repairs the rest.
        """
        if table_name == "nat":
            base = ir.base_rules(4, self.marked)
            guest_chains = [c for c in ir.our_chains(self.marked)["nat"] if ("nat", c) not in base]
            tear = all(table.is_chain(c) and not table.first_rule(c) for c in guest_chains)
        if not tear:
            return False
        try:
            for line in teardown.get(table_name, []):
                apply_line(iptc, table, line)
            return True
        except (iptc.IPTCError, iptc.XTablesError, IptcError, ValueError):
            # as a failed teardown batch always was: silent, nothing lost
            table.refresh()
            for _, line in lines:
                if line != "COMMIT":
                    apply_line(iptc, table, line)
            return False


_opened: Set[str] = set()  # tables whose cached iptc handle this process has used
