"""Permissions, hostile domain names, no shell, and the guest-network fence.

All through the real hook/CLI in a netns host with real rules.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

from hostile_support import REPO, yaml_str

# --------------------------------------------------------------------------- permissions

ONE = pytest.mark.parametrize("backend", ["iptables-nft"], indirect=True)


def _refusal_case(host, how):
    host.write_map({"web": "{address: 192.0.2.10, forward: [8080:80]}"})
    f = host.cfg / "ports.yaml"
    if how == "file owned by nobody":
        os.chown(f, 65534, 65534)
        return str(f), f"{f}: refusing: owned by uid 65534, not by root (chown root {f})"
    if how == "file group-writable":
        os.chmod(f, 0o664)
        return str(f), f"{f}: refusing: writable by group (chmod go-w {f})"
    if how == "dir others-writable":
        os.chmod(host.cfg, 0o757)
        return str(host.cfg), f"{host.cfg}: refusing: writable by others (chmod go-w {host.cfg})"
    if how == "drop-in dir owned by nobody":
        d = host.cfg / "ports.d"
        d.mkdir()
        os.chmod(d, 0o755)
        host.write_raw("guests:\n  db: [5432:5432]\n", "ports.d/10-db.yaml")
        os.chown(d, 65534, 65534)
        return str(d), f"{d}: refusing: owned by uid 65534, not by root (chown root {d})"
    raise ValueError(how)


@ONE
@pytest.mark.parametrize("how", ["file owned by nobody", "file group-writable", "dir others-writable",
                                 "drop-in dir owned by nobody"])
def test_unsafe_map_is_refused_logged_and_named(host, how):
    before = host.dump()
    path, message = _refusal_case(host, how)
    p = host.started("web", ["52:54:00:00:00:01"])
    assert p.returncode == 0 and p.stdout == b""
    err = p.stderr.decode()
    assert "port map is invalid, nothing changed" in err and message in err, err
    assert host.dump() == before and host.records() == {}
    c = host.cli("check")
    assert c.returncode == 1
    assert message in c.stderr.decode() and path in c.stderr.decode()
    s = host.cli("sync")
    assert s.returncode == 1 and message in s.stderr.decode()
    assert host.dump() == before


# --------------------------------------------------------------------------- names

NAMES = [
    "my guest",
    "quo\"te's",
    "new\nline",
    "semi;colon && ls",
    "$(touch vnethook-pwned)`id`",
    "ünïcødé ☃ 客人",
    "-j ACCEPT --comment x",
    "x" * 240,
    "p" * 100 + "A" * 120,
    "p" * 100 + "B" * 120,
    "a\t*{}[]:,#&!|>%@",
]


def test_hostile_names_apply_and_remove_without_collision(host):
    guests = {n: (f"52:54:00:00:01:{i:02x}", f"192.0.2.{20 + i}", 8000 + i) for i, n in enumerate(NAMES)}
    host.write_map({n: f"{{address: {a}, forward: [{p}:80]}}" for n, (_, a, p) in guests.items()})
    assert host.cli("check").returncode == 0, host.cli("check").stderr
    before = host.foreign()
    for n, (mac, _, _) in guests.items():
        p = host.started(n, [mac])
        assert p.returncode == 0 and b"Traceback" not in p.stderr, (n, p.stderr)
    recs = host.records()
    assert len(recs) == len(NAMES)  # one state file each, no collision
    assert {r["domain"] for r in recs.values()} == set(NAMES)
    for key in recs:
        assert re.fullmatch(r"[A-Za-z0-9_.-]{1,29}", key), key
    ours = host.ours()
    for key, rec in recs.items():
        _, addr, port = guests[rec["domain"]]
        mine = [l for l in ours if key in l]
        assert mine, key
        # every rule tagged with this key points at this guest only
        for l in mine:
            others = [a for n, (_, a, _) in guests.items() if a != addr]
            assert not any(re.search(re.escape(a) + r"(\b|:|/)(?!\d)", l) for a in others), (key, l)
    assert not os.path.exists("/vnethook-pwned") and not os.path.exists(os.path.join(REPO, "vnethook-pwned"))
    sync = host.cli("sync")
    assert sync.returncode == 0 and f"{len(NAMES)} unchanged" in sync.stdout.decode(), sync
    # Remove half: exactly their rules go.
    half = NAMES[::2]
    for n in half:
        assert host.stopped(n, [guests[n][0]]).returncode == 0
    left = host.records()
    assert {r["domain"] for r in left.values()} == set(NAMES) - set(half)
    gone_keys = set(recs) - set(left)
    assert not any(k in l for l in host.ours() for k in gone_keys)
    for n in NAMES[1::2]:
        host.stopped(n, [guests[n][0]])
    assert host.ours() == [] and host.records() == {}
    assert host.foreign() == before


def test_hostile_name_forward_carries_traffic(host):
    from netns import A

    name = "$(reboot); `halt` \"x\" 'y'\n☃"
    host.write_map({name: f"{{address: {A['g1_4']}, forward: [8080:80]}}"})
    host.topo.server("g1", "g1", "80")
    assert host.started(name, ["52:54:00:00:00:01"]).returncode == 0
    r = host.topo.connect("ext", A["host_ext4"], 8080)
    assert r.ok and r.who == "g1", r.text
    assert host.stopped(name, ["52:54:00:00:00:01"]).returncode == 0
    assert not host.topo.connect("ext", A["host_ext4"], 8080, timeout=0.5).ok


# --------------------------------------------------------------------------- no shell

_SPAWN = {("subprocess", n) for n in ("run", "Popen", "call", "check_call", "check_output", "getoutput",
                                      "getstatusoutput")}
_SPAWN |= {("os", n) for n in ("posix_spawn", "posix_spawnp", "execv", "execve", "execvp", "execvpe",
                               "spawnv", "spawnve", "spawnvp")}


def _sources():
    for top in ("vnethook", "hooks"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                path = os.path.join(root, f)
                if f.endswith(".py") or top == "hooks":
                    yield path


def test_no_shell_anywhere_in_the_package():
    found = []
    for path in _sources():
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        for pat in (r"shell\s*=\s*True", r"\bos\.system\s*\(", r"\bos\.popen\s*\(", r"\bos\.exec\w*p\w*\(\s*['\"]sh",
                    r"\bcommands\.", r"\bpty\.spawn", r"['\"]/bin/(ba)?sh['\"]", r"['\"]-c['\"]"):
            for m in re.finditer(pat, text):
                found.append(f"{path}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}")
    assert found == []


def test_every_spawn_gets_an_argv_list():
    """subprocess/os spawns are given a list/tuple (or a name bound to one), never a string."""
    bad, seen = [], 0
    for path in _sources():
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            base = node.func.value
            if not (isinstance(base, ast.Name) and (base.id, node.func.attr) in _SPAWN):
                continue
            seen += 1
            if any(k.arg == "shell" for k in node.keywords):
                bad.append(f"{path}:{node.lineno}: shell= given")
            args = node.args[1:2] if base.id == "os" and node.func.attr.startswith("posix_spawn") else node.args[:1]
            if base.id == "os" and node.func.attr.startswith(("exec", "spawn")) and not node.func.attr.startswith("posix"):
                args = node.args[1:2] if node.func.attr.startswith("exec") else node.args[2:3]
            for a in args:
                if isinstance(a, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                    bad.append(f"{path}:{node.lineno}: {ast.unparse(a)[:60]} is not an argv list")
    assert seen >= 3, "found no spawns at all: the scan is broken"
    assert bad == []


# --------------------------------------------------------------------------- network fence

def test_address_outside_the_guest_network_is_refused_unless_allowed(host):
    before = host.dump()
    host.write_map({"web": "{address: 203.0.113.50, forward: [8080:80]}"})
    p = host.started("web", ["52:54:00:00:00:01"])
    assert p.returncode == 0
    err = p.stderr.decode()
    assert "address 203.0.113.50 is outside network 'default' (192.0.2.0/24, 2001:db8:1::/64)" in err, err
    assert "ports.yaml:" in err  # located in the map
    assert host.dump() == before
    assert all(not r["forwards"] for r in host.records().values())
    assert "203.0.113.50" not in "\n".join(host.ours())
    # Explicitly allowed: forwarded.
    host.write_map({"web": "{address: 203.0.113.50, allow_outside_network: true, forward: [8080:80]}"})
    assert host.started("web", ["52:54:00:00:00:01"]).returncode == 0
    assert any("203.0.113.50" in l for l in host.ours())
    assert host.stopped("web", ["52:54:00:00:00:01"]).returncode == 0
    assert host.ours() == []
    assert host.foreign() == host.foreign(before)


def test_domain_name_whitespace_is_kept():
    from vnethook import libvirt

    d = libvirt.parse_domain(b"<domain><name> web </name></domain>", source="t")
    assert d.name == " web "
