"""The legacy backend's own parts: restore lines -> iptc objects, library lookup, import cost.

The rules themselves are iptables_rules' (shared with iptables-nft) and are
proven with real packets in tests/acceptance. Here: that every canonical
rule string splits and builds into the iptc rule iptables would build
(checked through iptc's own decoding of the rule buffer, i.e. the
extensions' save functions), that batches keep their line numbers, that
the lookups which make `import iptc` cheap find the real files, and that
iptc is imported only by this backend and only when an IPv4 change is made.
tests/unit/test_iptables_legacy_kernel.py does the same against a kernel,
in a private network namespace.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from vnethook.firewall import iptables_legacy as il
from vnethook.firewall import iptables_rules as ir
from forward_factory import fwd

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


FORWARDS = [
    fwd(),
    fwd(protocol="udp", host_ports=(30000, 30009), guest_ports=(40000, 40009)),
    fwd(host_address="198.51.100.1", sources=("203.0.113.0/24", "198.51.100.9")),
    fwd(host_address="127.0.0.1", host_ports=(2222, 2222), guest_ports=(22, 22)),
]
RULES = ir.render(FORWARDS) + ir.base_jumps(4)
KEY = FORWARDS[0].key


def run_py(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


# --- splitting specs ----------------------------------------------------------------


def test_split_matches_shell_rules():
    cases = [r.spec for r in RULES] + [
        '-m comment --comment "two words" -j ACCEPT',
        r'-m comment --comment "a \"quoted\" word" -j ACCEPT',
        '-m comment --comment "glued"tail -j ACCEPT',
        "! -d 127.0.0.0/8 -j X",
    ]
    for spec in cases:
        assert il._split(spec) == shlex.split(spec), spec


def test_parse_dnat_with_negated_destination_and_shifted_range():
    (r,) = [r for r in RULES if r.target == "DNAT" and r.protocol == "udp"]
    p = il.parse_spec(r.spec)
    assert p.addrs == (("dst", "!127.0.0.0/8"), ("protocol", "udp"))
    assert p.matches == (("udp", (("dport", "30000:30009"),)),
                         ("comment", (("comment", f"vnethook:{KEY}"),)))
    assert p.target == ("DNAT", False, (("to-destination", "192.0.2.10:40000-40009/30000"),))


def test_parse_accept_masquerade_and_jumps():
    acc = il.parse_spec('-d 192.0.2.10/32 -p tcp -m tcp --dport 80 -m conntrack --ctstate DNAT '
                        '-m comment --comment "vnethook:x" -j ACCEPT')
    assert acc.addrs == (("dst", "192.0.2.10/32"), ("protocol", "tcp"))
    assert [m[0] for m in acc.matches] == ["tcp", "conntrack", "comment"]
    assert acc.target == ("ACCEPT", False, ())
    jump = il.parse_spec("-m addrtype --dst-type LOCAL -j VNETHOOK-DNAT")
    assert jump == il.Spec((), (("addrtype", (("dst-type", "LOCAL"),)),), ("VNETHOOK-DNAT", False, ()))
    assert il.parse_spec("-g CHAIN").target == ("CHAIN", True, ())
    assert il.parse_spec("-m tcp ! --dport 80 -j X").matches == (("tcp", (("dport", "!80"),)),)


@pytest.mark.parametrize("spec", [
    "-d", "! ! -d 1.2.3.4 -j X", "-j X -m tcp", "-j X -d 1.2.3.4", "--dport 80 -j X",
    "-m tcp -d 1.2.3.4 -j X", "! -m tcp -j X", "-j X !", "-f -j X",
])
def test_parse_refuses_what_iptables_save_never_prints(spec):
    with pytest.raises(ValueError):
        il.parse_spec(spec)


def test_every_rendered_rule_parses_back_to_its_parts():
    for r in RULES:
        p = il.parse_spec(r.spec)
        assert p.target[0] == r.target
        assert dict(p.addrs).get("protocol") == r.protocol
        names = [m[0] for m in p.matches]
        assert ("comment" in names) == bool(r.comment)
        assert ("addrtype" in names) == r.addrtype_local
        assert ("conntrack" in names) == bool(r.ctstate)


# --- batches ---------------------------------------------------------------------------


def test_batch_sections_keep_restore_line_numbers():
    batch = "*nat\n-A A x\n-D B y\nCOMMIT\n*filter\n:C - [0:0]\nCOMMIT\n"
    assert il.batch_sections(batch) == [
        ("nat", [(2, "-A A x"), (3, "-D B y"), (4, "COMMIT")]),
        ("filter", [(6, ":C - [0:0]"), (7, "COMMIT")]),
    ]
    # The same numbers iptables_nft's _committed() counts with.
    from vnethook.firewall.iptables_nft import IptablesNftBackend
    b = IptablesNftBackend()
    sections = {"nat": ["-A A x", "-D B y"], "filter": [":C - [0:0]"]}
    assert b._batch(sections) == batch
    assert b._committed(sections, 6) == ["nat"]
    assert b._committed(sections, 5) == ["nat"]  # the `*filter` line: nat is done
    assert b._committed(sections, 3) == []


@pytest.mark.parametrize("batch", ["-A X y\n", "*nat\n-A X y\n", "COMMIT\n"])
def test_batch_sections_refuse_malformed(batch):
    with pytest.raises(ValueError):
        il.batch_sections(batch)


# --- finding the libraries -------------------------------------------------------------


def test_lib_dirs_put_multiarch_first():
    d = il.lib_dirs("x86_64-linux-gnu")
    assert d[:2] == ["/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu"]
    assert "/usr/lib64" in d and "/usr/lib" in d
    assert il.lib_dirs("")[0] == "/usr/lib64"


def test_find_xtables_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("XTABLES_LIBDIR", raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    (b / "xtables").mkdir(parents=True)
    a.mkdir()
    assert il.find_xtables_dir([str(a), str(b)]) == str(b / "xtables")
    assert il.find_xtables_dir([str(a)]) is None
    monkeypatch.setenv("XTABLES_LIBDIR", "/opt/x")
    assert il.find_xtables_dir([str(b)]) == "/opt/x"


def test_find_soname_prefers_the_soname_link(tmp_path):
    for n in ("libxtables.so.12.7.0", "libxtables.so.12", "libxtables.so", "libip4tc.so.2"):
        (tmp_path / n).touch()
    assert il.find_soname("xtables", [str(tmp_path)]) == str(tmp_path / "libxtables.so.12")
    assert il.find_soname("ip6tc", [str(tmp_path)]) is None


def test_import_env_points_at_real_files(monkeypatch):
    for k in ("XTABLES_LIBDIR", "IPTABLES_LIBDIR", "PYTHON_IPTABLES_XTABLES_VERSION"):
        monkeypatch.delenv(k, raising=False)
    import importlib.util
    spec = importlib.util.find_spec("iptc")
    if spec is None:
        pytest.skip("python3-iptables is not installed")
    pkg_parent = os.path.dirname(list(spec.submodule_search_locations)[0])
    env = il.import_env(il.lib_dirs(), pkg_parent)
    assert os.path.isfile(os.path.join(env["XTABLES_LIBDIR"], "libxt_NAT.so"))
    libdir = env["IPTABLES_LIBDIR"].split(":")[0]
    assert os.path.exists(os.path.join(libdir, f"libxtables.so.{env['PYTHON_IPTABLES_XTABLES_VERSION']}"))
    monkeypatch.setenv("XTABLES_LIBDIR", "/mine")
    assert "XTABLES_LIBDIR" not in il.import_env(il.lib_dirs(), pkg_parent)  # the caller's wins


# --- importing iptc: only here, only when needed, cheaply ---------------------------------


def test_iptc_is_not_imported_by_other_backends_or_by_this_module():
    p = run_py("""
        import sys
        import vnethook.firewall as f
        f.get_backend("iptables-nft")
        import vnethook.firewall.iptables_legacy
        f.get_backend("iptables-legacy")
        print("iptc" in sys.modules)
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def test_load_iptc_runs_no_helper_and_leaves_no_trace():
    p = run_py("""
        import ctypes.util, json, os, subprocess, sys, time
        spawned = []
        real = subprocess.Popen.__init__
        def rec(self, args, *a, **k):
            spawned.append(list(args) if not isinstance(args, str) else [args])
            return real(self, args, *a, **k)
        subprocess.Popen.__init__ = rec
        fl = ctypes.util.find_library
        env = dict(os.environ)
        from vnethook.firewall.iptables_legacy import load_iptc
        t = time.perf_counter()
        iptc = load_iptc()
        ms = (time.perf_counter() - t) * 1000
        print(json.dumps({"spawned": spawned, "ms": ms, "env_same": dict(os.environ) == env,
                          "find_library_same": ctypes.util.find_library is fl,
                          "distutils": "distutils" in sys.modules,
                          "xtdir": iptc.xtables._xtables_libdir, "same": load_iptc() is iptc}))
    """)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    # iptc may ask modprobe for ip_tables; never ldconfig or a compiler.
    assert [a for a in out["spawned"] if "modprobe" not in a[0]] == [], out["spawned"]
    assert out["env_same"] and out["find_library_same"] and out["same"]
    assert not out["distutils"]
    assert os.path.isfile(os.path.join(out["xtdir"], "libxt_NAT.so"))
    print(f"import iptc through load_iptc: {out['ms']:.1f} ms")


# --- restore lines -> iptc objects -----------------------------------------------------------


class Chains:
    """Stands in for a libiptc table: only says which names are chains."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def is_chain(self, name: str) -> bool:
        return name in self.names


@pytest.fixture(scope="module")
def iptc():
    try:
        return il.load_iptc()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"python-iptables unavailable: {e}")


def _params(ext) -> dict:
    return {k: " ".join(v) for k, v in ext.get_all_parameters().items()}


def test_build_dnat_shifted_range_uses_revision_2(iptc):
    (r,) = [r for r in RULES if r.target == "DNAT" and r.protocol == "udp"]
    rule = il.build_rule(iptc, r.spec, Chains())
    assert rule.dst == "!127.0.0.0/255.0.0.0"
    assert rule.protocol == "udp"
    assert [m.name for m in rule.matches] == ["udp", "comment"]
    assert _params(rule.matches[0]) == {"dport": "30000:30009"}
    assert _params(rule.matches[1]) == {"comment": f"vnethook:{KEY}"}
    assert rule.target.name == "DNAT"
    assert rule.target.target.u.user.revision == 2  # xt_DNAT's shifted-range form
    assert _params(rule.target) == {"to-destination": "192.0.2.10:40000-40009/30000"}


def test_build_sourced_dnat_and_accept_and_masquerade(iptc):
    by = {}
    for r in RULES:
        by.setdefault((r.chain, r.target), []).append(r)
    dnat = [r for r in by[(ir.CHAIN_DNAT, "DNAT")] if r.src == "203.0.113.0/24"][0]
    rule = il.build_rule(iptc, dnat.spec, Chains())
    assert (rule.src, rule.dst) == ("203.0.113.0/255.255.255.0", "198.51.100.1/255.255.255.255")
    assert _params(rule.target) == {"to-destination": "192.0.2.10:80"}

    acc = by[(ir.CHAIN_FWD, "ACCEPT")][0]
    rule = il.build_rule(iptc, acc.spec, Chains())
    assert [m.name for m in rule.matches] == ["tcp", "conntrack", "comment"]
    assert _params(rule.matches[1]) == {"ctstate": "DNAT"}
    assert rule.target.name == "ACCEPT"

    loop = [r for r in by[(ir.CHAIN_SNAT, "MASQUERADE")] if r.src == "127.0.0.0/8"][0]
    rule = il.build_rule(iptc, loop.spec, Chains())
    assert rule.src == "127.0.0.0/255.0.0.0"
    assert rule.target.name == "MASQUERADE" and _params(rule.target) == {}


def test_build_jump_is_a_chain_of_the_rules_own_table(iptc):
    spec = ir.base_jumps(4)[0].spec  # -m addrtype --dst-type LOCAL -j VNETHOOK-DNAT
    rule = il.build_rule(iptc, spec, Chains(ir.CHAIN_DNAT))
    assert rule.target.name == ir.CHAIN_DNAT
    assert rule.target.standard_target == ir.CHAIN_DNAT
    assert _params(rule.matches[0]) == {"dst-type": "LOCAL"}
    # Not a chain of that table: iptc looks for an extension and finds none.
    with pytest.raises(iptc.XTablesError):
        il.build_rule(iptc, spec, Chains())


def test_build_refuses_unknown_options(iptc):
    with pytest.raises((iptc.XTablesError, AttributeError, ValueError)):
        il.build_rule(iptc, "-p tcp -m tcp --no-such-option 1 -j ACCEPT", Chains())
    with pytest.raises(ValueError):
        il.build_rule(iptc, "-p tcp", Chains())  # no target


def test_final_check_runs_the_extensions_checks(iptc):
    # `-m conntrack` without options: libxt_conntrack's own check refuses it,
    # as `iptables -m conntrack -j ACCEPT` does ("At least one option").
    rule = il.build_rule(iptc, "-m conntrack -j ACCEPT", Chains())
    with pytest.raises(iptc.XTablesError):
        rule.final_check()
    il.build_rule(iptc, "-m conntrack --ctstate DNAT -j ACCEPT", Chains()).final_check()
