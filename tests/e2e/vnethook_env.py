"""vnethook installed into a sandboxed libvirtd, and ways to look at it.

By default the hooks run this checkout (hooks/qemu, hooks/network). With
VNETHOOK_E2E_INSTALLED=1 they run the hooks and /usr/bin/vnethook of the
installed package instead, so the same suite proves what users get.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import textwrap

from sandbox import COUNTERS as _COUNTERS, PYTHON

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTALLED = os.environ.get("VNETHOOK_E2E_INSTALLED") == "1"
INSTALLED_HOOKS = {"qemu": "/etc/libvirt/hooks/qemu.d/vnethook", "network": "/etc/libvirt/hooks/network.d/vnethook"}
# nft (1.0.6) lists a rule iptables-nft wrote without its comment match, so
# others.py's "vnethook:forward" accept in DOCKER-USER/FORWARD shows only as
# its ct mark bit (no one else uses it).
_OURS_MARK = "0x2000000"

# A hook wrapper: libvirt clears the environment, so the test's VNETHOOK_*
# settings are baked in; the hook's stderr is both passed on to libvirt
# (which quotes it when a start fails) and appended to a log file, since
# there is no journal in the sandbox.
WRAPPER = """#!{python}
import os, subprocess, sys
os.environ.update({env!r})
cp = subprocess.run({argv!r} + sys.argv[1:], stdin=sys.stdin.buffer, stdout=sys.stdout.buffer, stderr=subprocess.PIPE)
with open({log!r}, "ab") as f:
    f.write(cp.stderr)
sys.stderr.buffer.write(cp.stderr)
sys.exit(cp.returncode)
"""


class VnethookEnv:
    def __init__(self, sandbox, tmp_path):
        self.sb = sandbox
        self.tmp = tmp_path
        self.cfg = tmp_path / "etc-vnethook"
        self.state = tmp_path / "run-vnethook"
        self.log = tmp_path / "hook.log"
        self.cfg.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.cfg, 0o755)
        self.env = {
            "VNETHOOK_CONFIG": str(self.cfg),
            "VNETHOOK_STATE_DIR": str(self.state),
            "VNETHOOK_LOG": "stderr",
        }
        if not INSTALLED:
            self.env["PYTHONPATH"] = REPO
        self._installed_text = {}
        if INSTALLED:
            for kind, path in INSTALLED_HOOKS.items():
                with open(path, encoding="utf-8") as f:
                    self._installed_text[kind] = f.read()

    # ---- setup -------------------------------------------------------------
    def install(self) -> None:
        for kind in ("qemu", "network"):
            if INSTALLED:
                hook = self.tmp / f"installed-{kind}-hook"
                hook.write_text(self._installed_text[kind])
                os.chmod(hook, 0o755)
                argv = [str(hook)]
            else:
                argv = [PYTHON, os.path.join(REPO, "hooks", kind)]
            text = WRAPPER.format(python=PYTHON, env=self.env, argv=argv, log=str(self.log))
            self.sb.install_hook(f"{kind}.d/50-vnethook", text)
        self.sb.reload_libvirtd()

    def write_map(self, text: str, name: str = "ports.yaml") -> None:
        p = self.cfg / name
        tmp = self.cfg / (name + ".tmp")
        tmp.write_text(textwrap.dedent(text).lstrip("\n"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)

    # ---- running vnethook ----------------------------------------------------
    def cli_argv(self, *args: str) -> list:
        if INSTALLED:
            return ["/usr/bin/vnethook", *args]
        return [PYTHON, "-m", "vnethook", *args]

    def run(self, argv, check: bool = True):
        return self.sb.run(argv, env=self.env, check=check)

    def status_json(self) -> dict:
        cp = self.run(self.cli_argv("status", "--json"), check=False)
        return json.loads(cp.stdout)

    def unit_exec(self, unit: str) -> list:
        """argv of a systemd unit's ExecStart (packaging/systemd)."""
        with open(os.path.join(REPO, "packaging", "systemd", unit), encoding="utf-8") as f:
            for line in f:
                if line.startswith("ExecStart="):
                    argv = shlex.split(line.split("=", 1)[1].lstrip("-@+!"))
                    if argv[0].endswith("/vnethook"):
                        return self.cli_argv(*argv[1:])
                    return argv
        raise AssertionError(f"{unit} has no ExecStart")

    # ---- looking -------------------------------------------------------------
    def ruleset_text(self) -> str:
        return _COUNTERS.sub("", self.sb.ruleset())

    def our_rules(self) -> list:
        """Every line of the firewall that belongs to vnethook, prefixed with
        its table and chain, so a real duplicate shows as a repeated item."""
        out = []
        table = chain = None
        for line in self.ruleset_text().splitlines():
            s = line.strip()
            if s.startswith("table "):
                table, chain = s.rstrip(" {"), None
                continue
            if s.startswith(("chain ", "map ", "set ")):
                chain = s.rstrip(" {")
            if not s or s == "}":
                continue
            if "vnethook" in s.lower() or _OURS_MARK in s or (table and "vnethook" in table.lower()):
                out.append(f"{table} / {chain}: {s}")
        return out

    def foreign_rules(self) -> list:
        """Every line that is not vnethook's, in order, with the same prefixes.

        Empty builtin chains that iptables-nft creates on first use (and
        never deletes) are not rules; they are left out.
        """
        out = []
        table = chain = None
        lines = [l.strip() for l in self.ruleset_text().splitlines()]
        for i, s in enumerate(lines):
            if s.startswith("table "):
                table, chain = s.rstrip(" {"), None
                continue
            if s.startswith(("chain ", "map ", "set ")):
                chain = s.rstrip(" {")
                continue
            if not s or s == "}":
                continue
            if "vnethook" in s.lower() or _OURS_MARK in s or (table and "vnethook" in table.lower()):
                continue
            out.append(f"{table} / {chain}: {s}")
        return _drop_empty_base_chains(out)

    def assert_same_foreign(self, before: list) -> None:
        after = self.foreign_rules()
        if after != before:
            import difflib

            diff = "\n".join(difflib.unified_diff(before, after, "before", "after", lineterm=""))
            raise AssertionError(f"rules vnethook does not own changed:\n{diff}")

    def records(self) -> list:
        d = self.state / "guests"
        out = []
        if d.is_dir():
            for p in sorted(d.glob("*.json")):
                out.append(json.loads(p.read_text()))
        return out

    def records_of(self, domain: str) -> dict:
        for r in self.records():
            if r.get("domain") == domain:
                return r
        return {}

    def watcher_running(self) -> bool:
        p = self.state / "watch.lock"
        if not p.exists():
            return False
        fd = os.open(p, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _drop_empty_base_chains(lines: list) -> list:
    """A chain whose only line is its `type ... hook ...` header holds no rule."""
    by_chain = {}
    for l in lines:
        by_chain.setdefault(l.split(": ", 1)[0], []).append(l)
    keep = []
    for l in lines:
        own = by_chain[l.split(": ", 1)[0]]
        if len(own) == 1 and l.split(": ", 1)[1].startswith("type ") and l.rstrip().endswith("policy accept;"):
            continue
        keep.append(l)
    return keep


_EMPTY_BASE_CHAIN = re.compile(r"\n\n\tchain (\S+) \{\n\t\ttype [^\n]* policy accept;\n\t\}")


def without_new_empty_base_chains(after: str, before: str):
    """`after` minus the empty, policy-accept base chains that `before` did
    not have, and their names. iptables-nft creates a table's builtin
    chains when a rule first goes there (vnethook's DNAT: nat PREROUTING
    and OUTPUT) and never deletes them; they hold no rule and pass every
    packet. Everything else must be byte-identical."""
    dropped = []

    def drop(m):
        if m.group(0) in before:
            return m.group(0)
        dropped.append(m.group(1))
        return ""

    return _EMPTY_BASE_CHAIN.sub(drop, after), dropped
