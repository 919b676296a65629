#!/usr/bin/python3
"""Interleaved A/B: this checkout's hook against another checkout's, in one run.

Why: on a shared or loaded machine the figures of two separate
`benchmarks/run`s differ by more than any change under test. Here both
versions run in the same namespaces, against the same firewall and files,
in alternation (A, B, B, A, ...), so drift hits both alike; the ratio B/A
is the figure to read.

  benchmarks/ab.py OTHER_CHECKOUT [--repeat N] [--backends ...] [--others 0,1000]

A is OTHER_CHECKOUT, B is this one. Per backend and number of other guests:
started/stopped of the 10-forward guest; with no others also the no-op
events and the 1000-port range; with others `sync` (nothing to change) in
alternating blocks (each version rewrites the records in its own format on
its first sync, which is not counted). Needs root; uses bench.py's trees
and namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402


def _retarget(path: str, other: str) -> str:
    """A copy of the script at `path` that imports vnethook from `other`."""
    with open(path) as f:
        text = f.read()
    if repr(bench.REPO) not in text:
        raise SystemExit(f"ab: {path} does not name {bench.REPO}")
    out = path + "-A"
    with open(out, "w") as f:
        f.write(text.replace(repr(bench.REPO), repr(os.path.abspath(other))))
    os.chmod(out, os.stat(path).st_mode & 0o777)
    return out


class Inner(bench.Inner):
    def __init__(self, args):
        super().__init__(args)
        self.hooks = {"A": _retarget(self.tree.hook, args.other), "B": self.tree.hook}
        self.clis = {"A": _retarget(self.tree.cli, args.other), "B": self.tree.cli}
        # Without other guests each version keeps its own state directory:
        # the compiled port map is cached per version (each would throw the
        # other's away and compile again on every event). With others both
        # share the records of the others, so both pay that alike there.
        self.envs = {"A": self.env, "B": self.env}
        if max(args.others) == 0:
            state_a = self.tree.state + "-A"
            os.makedirs(state_a, mode=0o700, exist_ok=True)
            self.envs["A"] = dict(self.env, VNETHOOK_STATE_DIR=state_a)

    def run_hook(self, v: str, name: str, mac: str, op: str) -> float:
        sub = "end" if op in ("stopped", "release") else "begin"
        ms = bench.timed([self.hooks[v], name, op, sub, "-"], self.envs[v],
                         self.tree.domain_xml(name, mac).encode())
        bench.gap(self.a, op)
        return ms

    def serve(self) -> None:
        for line in sys.stdin:
            req = json.loads(line)
            cmd, v = req["cmd"], req.get("v", "B")
            if cmd == "setup":
                for w in ("A", "B"):
                    for op in ("prepare", "started", "stopped"):
                        self.run_hook(w, bench.BENCH, bench.BENCH_MAC, op)
                if req.get("n"):
                    self.tree.set_running(req["n"])
                    bench.timed([bench.PY, self.clis["B"], "sync"], self.env, stdout_ok=True)
                out: dict = {}
            elif cmd == "pair":
                out = {"up": self.run_hook(v, bench.BENCH, bench.BENCH_MAC, "started"),
                       "down": self.run_hook(v, bench.BENCH, bench.BENCH_MAC, "stopped")}
            elif cmd == "range":
                out = {"up": self.run_hook(v, bench.RANGE, bench.RANGE_MAC, "started"),
                       "down": self.run_hook(v, bench.RANGE, bench.RANGE_MAC, "stopped")}
            elif cmd == "noop":
                out = {"bare": bench.timed([bench.PY, "-c", "pass"], self.env),
                       "prepare": self.run_hook(v, bench.BENCH, bench.BENCH_MAC, "prepare"),
                       "unconf": self.run_hook(v, bench.UNCONF, "52:54:00:be:00:ff", "started")}
            elif cmd == "sync":
                out = {"ms": bench.timed([bench.PY, self.clis[v], "sync"], self.envs[v], stdout_ok=True)}
            else:
                raise SystemExit(f"ab: unknown request {cmd}")
            print(json.dumps(out), flush=True)


class Worker(bench.Worker):
    """bench.Worker, but the process in the namespace is this file's Inner."""

    def __init__(self, backend: str, others: int, base: str, args):
        real = bench.subprocess.Popen

        me = os.path.join(HERE, "bench.py")

        def popen(argv, *a, **kw):
            if isinstance(argv, list) and me in argv:
                i = argv.index(me)
                argv = argv[:i] + [os.path.abspath(__file__), "--other", args.other] + argv[i + 1:]
            return real(argv, *a, **kw)

        bench.subprocess.Popen = popen
        try:
            super().__init__(backend, others, base, args)
        finally:
            bench.subprocess.Popen = real

    def ask_v(self, cmd: str, v: str) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, "v": v}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"ab: the worker in {self.ns} failed")
        return json.loads(line)


def med(xs) -> float:
    return round(statistics.median(xs), 1)


def order(i: int):
    return ("A", "B") if i % 2 == 0 else ("B", "A")


def run(backend: str, others: int, args) -> list:
    import shutil
    import tempfile

    base = tempfile.mkdtemp(prefix="vnh-ab-")
    w = Worker(backend, others, base, args)
    rows = []
    try:
        w.proc.stdin.write(json.dumps({"cmd": "setup", "n": others}) + "\n")
        w.proc.stdin.flush()
        w.proc.stdout.readline()
        s: dict = {}

        def add(name, v, ms):
            s.setdefault(name, {"A": [], "B": []})[v].append(ms)

        for i in range(args.repeat):
            for v in order(i):
                r = w.ask_v("pair", v)
                add("started", v, r["up"])
                add("stopped", v, r["down"])
                add("started+stopped", v, r["up"] + r["down"])
            if others == 0:
                for v in order(i):
                    r = w.ask_v("noop", v)
                    add("bare python", v, r["bare"])
                    add("prepare (no-op)", v, r["prepare"])
                    add("unconfigured started (no-op)", v, r["unconf"])
                    r = w.ask_v("range", v)
                    add("range started", v, r["up"])
                    add("range stopped", v, r["down"])
                    add("range started+stopped", v, r["up"] + r["down"])
        if others:
            for i in range(max(2, args.repeat // 3)):
                for v in order(i):
                    w.ask_v("sync", v)  # rewrites the records in v's format: not counted
                    for _ in range(2):
                        add("sync, nothing to change", v, w.ask_v("sync", v)["ms"])
        for name, d in s.items():
            a, b = med(d["A"]), med(d["B"])
            rows.append((backend, others, name, a, b, round(b / a, 2) if a else 0.0))
    finally:
        w.close()
        shutil.rmtree(base, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("other", nargs="?")
    ap.add_argument("--other", dest="other_opt")
    ap.add_argument("--repeat", type=int, default=11)
    ap.add_argument("--backends", default=",".join(bench.BACKENDS))
    ap.add_argument("--others", default="0")
    ap.add_argument("--gap-ms", type=float, default=0.0, help="pause after each stopped (bench.gap())")
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.other = args.other or args.other_opt
    if not args.other:
        ap.error("name the other checkout")
    args.others = [int(x) for x in str(args.others).split(",") if x != ""]
    if args.inner:
        Inner(args).serve()
        return 0
    if os.geteuid() != 0:
        sys.stderr.write("ab: needs root (network namespaces)\n")
        return 1
    rev = subprocess.run(["git", "-C", args.other, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or args.other
    print(f"A = {args.other} ({rev}), B = {bench.REPO}; median of {args.repeat} interleaved runs (ms)"
          + (f", {args.gap_ms:g} ms after each stopped" if args.gap_ms else "") + "\n")
    print("| backend | others | figure | A | B | B/A |")
    print("|---|---:|---|---:|---:|---:|")
    for b in [x for x in args.backends.split(",") if x]:
        for n in args.others:
            for row in run(b, n, args):
                print("| {} | {} | {} | {} | {} | {} |".format(*row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
