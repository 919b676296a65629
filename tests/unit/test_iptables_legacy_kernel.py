"""The legacy backend's libiptc transport against a real kernel, in a private netns.

Each test runs a small script under `unshare --net`, so the legacy tables
it touches are that namespace's own (the root namespace's firewall is never
read or changed). It checks what the acceptance tests can only see through
packets: that rules built through iptc are the very rules iptables builds
(iptables-legacy-save prints our canonical strings back, and libiptc finds
rules loaded by iptables-legacy-restore), that a failing line leaves its
table untouched while earlier tables stay committed, and that the lock is
iptables' own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap

import pytest

from vnethook.firewall import iptables_rules as ir
from forward_factory import fwd

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = "/usr/bin/python3"


def _why_not():
    if os.geteuid() != 0:
        return "needs root (a private network namespace)"
    for tool in ("unshare", "iptables-legacy-save", "iptables-legacy-restore"):
        if not shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin"):
            return f"needs {tool}"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


FORWARDS = [
    fwd(),
    fwd(protocol="udp", host_ports=(30000, 30009), guest_ports=(40000, 40009)),
    fwd(host_address="198.51.100.1", sources=("203.0.113.0/24",)),
    fwd(host_address="127.0.0.1", host_ports=(2222, 2222), guest_ports=(22, 22)),
]
RULES = ir.render(FORWARDS)
JUMPS = ir.base_jumps(4)

PRELUDE = """
import json, os, subprocess, sys
sys.path.insert(0, %r)
from vnethook.firewall import iptables_legacy as il
from vnethook.firewall.iptables_nft import RestoreError
from vnethook.firewall.base import FirewallError
be = il.IptablesLegacyBackend()
def save():
    return subprocess.run(["iptables-legacy-save"], capture_output=True, text=True, check=True).stdout
def rules(text):
    out, table = [], None
    for ln in text.splitlines():
        if ln.startswith("*"):
            table = ln[1:]
        elif ln.startswith("-A "):
            out.append(table + " " + ln)
    return out
""" % REPO


def in_netns(body: str, env=None) -> dict:
    code = PRELUDE + textwrap.dedent(body)
    p = subprocess.run(["unshare", "--net", PY, "-c", code], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _declare_batch(rules, jumps) -> str:
    sections = {"nat": [f":{c} - [0:0]" for c in ir.OUR_CHAINS["nat"]],
                "filter": [f":{c} - [0:0]" for c in ir.OUR_CHAINS["filter"]]}
    for j in jumps:
        sections[j.table].append(f"-I {j.chain} 1 {j.spec}")
    for r in rules:
        sections[r.table].append(f"-A {r.chain} {r.spec}")
    out = []
    for t in ir.TABLES:
        out += [f"*{t}", *sections[t], "COMMIT"]
    return "\n".join(out) + "\n"


def test_iptc_rules_are_what_iptables_save_prints_back():
    batch = _declare_batch(RULES, JUMPS)
    out = in_netns(f"""
        be._restore(4, {batch!r})
        text = save()
        print(json.dumps({{"rules": rules(text),
                          "tables": [l[1:] for l in text.splitlines() if l.startswith("*")]}}))
    """)
    want = [f"{r.table} -A {r.chain} {r.spec}" for r in JUMPS + RULES]
    assert sorted(out["rules"]) == sorted(want)
    # Only the tables a change touches are opened (stock iptc would load them all).
    assert sorted(out["tables"]) == ["filter", "nat"]


def test_iptc_finds_and_deletes_rules_iptables_made():
    batch = _declare_batch(RULES, JUMPS)
    near_misses = [  # each differs from a loaded rule in one detail
        ("nat", "PREROUTING", "-m addrtype --dst-type LOCAL -j VNETHOOK-SNAT"),
        ("nat", ir.CHAIN_DNAT, RULES[0].spec.replace("--dport 8080", "--dport 8081")),
        ("nat", ir.CHAIN_DNAT, RULES[0].spec.replace("192.0.2.10:80", "192.0.2.11:80")),
        ("filter", ir.CHAIN_FWD, RULES[1].spec.replace("web1", "web2")),
    ]
    checks = "\n".join(f"*{r.table}\n-C {r.chain} {r.spec}\nCOMMIT" for r in JUMPS + RULES) + "\n"
    deletes = "\n".join(f"*{r.table}\n-D {r.chain} {r.spec}\nCOMMIT" for r in JUMPS + RULES) + "\n"
    out = in_netns(f"""
        subprocess.run(["iptables-legacy-restore", "--noflush"], input={batch!r}, text=True, check=True)
        be._restore(4, {checks!r})
        missed = []
        for table, chain, spec in {near_misses!r}:
            try:
                be._restore(4, "*%s\\n-C %s %s\\nCOMMIT\\n" % (table, chain, spec))
            except RestoreError:
                missed.append(spec)
        be._restore(4, {deletes!r})
        print(json.dumps({{"missed": len(missed), "left": rules(save())}}))
    """)
    assert out["missed"] == len(near_misses)
    assert out["left"] == []


def test_failing_line_leaves_its_table_and_names_its_line():
    good = RULES[0]  # nat
    acc = [r for r in RULES if r.table == "filter"][0]
    batch = (f"*nat\n:{ir.CHAIN_DNAT} - [0:0]\n-A {ir.CHAIN_DNAT} {good.spec}\nCOMMIT\n"
             f"*filter\n:{ir.CHAIN_FWD} - [0:0]\n-A {ir.CHAIN_FWD} {acc.spec}\n"
             f"-A {ir.CHAIN_FWD} -j VNETHOOK-NO-SUCH-CHAIN\nCOMMIT\n")
    out = in_netns(f"""
        try:
            be._restore(4, {batch!r})
            err = None
        except RestoreError as e:
            err = [e.line, str(e)]
        text = save()
        print(json.dumps({{"err": err, "rules": rules(text), "fwd_chain": ":{ir.CHAIN_FWD} " in text}}))
    """)
    assert out["err"] is not None and out["err"][0] == 8, out["err"]
    assert "VNETHOOK-NO-SUCH-CHAIN" in out["err"][1]
    assert out["rules"] == [f"nat -A {ir.CHAIN_DNAT} {good.spec}"]  # nat committed, filter not
    assert not out["fwd_chain"]


def test_lock_is_iptables_own(tmp_path):
    lock = str(tmp_path / "xtables.lock")
    env = dict(os.environ, XTABLES_LOCKFILE=lock)
    batch = f"*filter\n:{ir.CHAIN_FWD} - [0:0]\nCOMMIT\n"
    out = in_netns(f"""
        import fcntl, time
        # iptables-legacy holding the lock: we wait, then give up cleanly.
        fd = os.open({lock!r}, os.O_CREAT | os.O_WRONLY, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        il.LOCK_TIMEOUT = 0.3
        t = time.monotonic()
        try:
            be._restore(4, {batch!r})
            waited = None
        except FirewallError as e:
            waited = [time.monotonic() - t, str(e)]
        changed = ":{ir.CHAIN_FWD} " in save()
        os.close(fd)
        # We holding it: iptables-legacy -w waits for us.
        with il.xtables_lock():
            p = subprocess.run(["iptables-legacy", "-w", "1", "-N", "X"], capture_output=True, text=True)
        print(json.dumps({{"waited": waited, "changed": changed, "ipt_rc": p.returncode,
                          "ipt_err": p.stderr}}))
    """, env=env)
    assert out["waited"] is not None and out["waited"][0] >= 0.3
    assert "xtables lock" in out["waited"][1]
    assert not out["changed"]
    assert out["ipt_rc"] != 0 and "holding the xtables lock" in out["ipt_err"]
