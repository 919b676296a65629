#!/usr/bin/python3
"""vnethook benchmarks: what libvirt waits for, measured the way libvirt runs the hook.

Why whole processes: libvirt forks the hook for every event and waits for it,
so the figure that matters is interpreter start + imports + work + exit, not
the cost of a function call. Each hook run here is `/usr/bin/python3 HOOK
qemu DOMAIN OP SUBOP -` with the domain XML on stdin, cwd `/`, and an
environment reduced to LC_ALL=C + PATH (what libvirtd passes), plus the
three VNETHOOK_* variables that point config, state and libvirt's tree at
this benchmark's files. The hook file is the one `vnethook install` writes.

Why namespaces: the hook changes the firewall. Every backend and every
number of other guests (0, 100, 1000) is measured in its own fresh network
namespace, loaded with the rules libvirt 11.3 creates
(tests/acceptance/rulesets), as the acceptance tests do; the root
namespace is never touched. The outer process builds the namespaces and
runs this same file inside each (`--inner`, a worker answering requests on
stdin), so every spawned hook inherits its namespace.

Every figure is the median of repeated runs. Ratios are taken within one
run and from interleaved samples: the bare interpreter alternates with the
no-op events, and the scale pairs go round the namespaces in rotating order.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PY = "/usr/bin/python3"
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RULESETS = os.path.join(REPO, "tests", "acceptance", "rulesets")
STARTED_XML = os.path.join(REPO, "tests", "fixtures", "libvirt-11.3", "hooks", "06-qemu-web1-started-begin-_.xml")
STATUS_XML = os.path.join(REPO, "tests", "fixtures", "libvirt-11.3", "run-qemu-web1.xml")
NET_XML = os.path.join(REPO, "tests", "fixtures", "libvirt-11.3", "run-network-vnhnet.{}.xml")
BACKENDS = ("iptables-nft", "iptables-legacy", "nftables")
NETWORK, BRIDGE = "vnhnet", "vnhbr0"
FIXTURE_MAC, FIXTURE_NAME = "52:54:00:e2:00:01", "web1"

BENCH = "bench"  # the measured guest: 10 forwards, static DHCP host
BENCH_MAC, BENCH_IP = "52:54:00:be:00:01", "192.0.2.10"
RANGE = "range1"  # one 1000-port range
RANGE_MAC, RANGE_IP = "52:54:00:be:00:02", "192.0.2.11"
UNCONF = "notmapped"  # a guest the map does not mention
OTHER_FWDS = 2  # forwards per other guest (tcp + udp)

# Issue 15's targets.
TARGETS = {
    "noop_ratio": 1.6,  # x bare interpreter
    "pair_ms": 40.0,  # started + stopped, 10 forwards (iptables-nft, nftables)
    "scale_ratio": 1.2,  # 1000 others vs none, apply and remove
    "range_ms": 60.0,  # 1000-port range, apply + remove
    "sync_ms": 300.0,  # nothing to change, 1000 guests
}


# --------------------------------------------------------------------------
# Files: a libvirt tree, a port map, a state dir


def other_name(i: int) -> str:
    return f"g{i:04d}"


def other_mac(i: int) -> str:
    return f"52:54:00:a0:{i >> 8:02x}:{i & 0xFF:02x}"


def other_ip(i: int, flip: bool = False) -> str:
    # 1000 guests need 1000 addresses: the other guests live on a second
    # IPv4 subnet of the network, in 198.18.0.0/15 (RFC 2544's range for
    # benchmarks; a documentation /24 is too small). No packet is sent.
    return f"198.18.{(200 if flip else 1) + i // 250}.{1 + i % 250}"


class Tree:
    def __init__(self, base: str, backend: str, others: int):
        self.base = base
        self.backend = backend
        self.root = os.path.join(base, "root")
        self.config = os.path.join(base, "etc-vnethook")
        self.state = os.path.join(base, "state")
        self.qemu = os.path.join(self.root, "run/libvirt/qemu")
        self.netdir = os.path.join(self.root, "run/libvirt/network")
        self.dnsmasq = os.path.join(self.root, "var/lib/libvirt/dnsmasq")
        self.etc = os.path.join(self.root, "etc/libvirt")
        for d in (self.qemu, self.netdir, self.dnsmasq, self.etc, self.config, self.state):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.hook = os.path.join(base, "hook-qemu")
        self.cli = os.path.join(base, "vnethook")
        self.flipped = -1
        self._write_scripts()
        self._write_network()
        self._write_config(others)
        with open(STARTED_XML) as f:
            self.started_xml = f.read()
        with open(STATUS_XML) as f:
            self.status_xml = f.read()
        self.running = 0
        self.write_leases()  # empty: no other guest yet

    def env(self) -> dict:
        return {
            "LC_ALL": "C",
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "VNETHOOK_CONFIG": self.config,
            "VNETHOOK_STATE_DIR": self.state,
            "VNETHOOK_LIBVIRT_ROOT": self.root,
        }

    def _write_scripts(self) -> None:
        sys.path.insert(0, REPO)
        from vnethook.install import hook_text

        with open(self.hook, "w") as f:
            f.write(hook_text("qemu"))
        # libvirt executes the hook file itself: its #! line (with -S) counts.
        os.chmod(self.hook, 0o755)
        with open(self.cli, "w") as f:
            f.write(f"#!{PY}\nimport sys\nsys.path.insert(0, {REPO!r})\n"
                    "from vnethook.cli import main\nsys.exit(main())\n")

    def _write_network(self) -> None:
        flavour = "nftables" if self.backend == "nftables" else "iptables"
        with open(NET_XML.format(flavour)) as f:
            xml = f.read()
        # The measured guests have static DHCP hosts, as many real setups do.
        hosts = (f"<host mac='{BENCH_MAC}' name='{BENCH}' ip='{BENCH_IP}'/>\n"
                 f"        <host mac='{RANGE_MAC}' name='{RANGE}' ip='{RANGE_IP}'/>\n        ")
        xml = xml.replace("<host mac=", hosts + "<host mac=", 1)
        xml = xml.replace("<ip family='ipv6'", "<ip address='198.18.0.1' prefix='15'/>\n    <ip family='ipv6'", 1)
        _write(os.path.join(self.netdir, f"{NETWORK}.xml"), xml)
        conf = "nftables" if self.backend == "nftables" else "iptables"
        _write(os.path.join(self.etc, "network.conf"), f'firewall_backend = "{conf}"\n')

    def _write_config(self, others: int) -> None:
        lines = []
        if self.backend == "iptables-legacy":
            # auto-detection follows /usr/sbin/iptables, which is nft here
            lines += ["settings:", "  firewall: iptables-legacy"]
        lines += ["guests:", f"  {BENCH}:"]
        lines += [f"    - {8000 + i}:{80 + i}" for i in range(10)]
        lines += [f"  {RANGE}:", "    - 31000-31999:31000-31999"]
        for i in range(others):
            lines += [f"  {other_name(i)}:", f"    - {10000 + i}:22", f"    - {10000 + i}:53/udp"]
        _write(os.path.join(self.config, "ports.yaml"), "\n".join(lines) + "\n")

    def domain_xml(self, name: str, mac: str) -> str:
        return self.started_xml.replace(f"<name>{FIXTURE_NAME}</name>", f"<name>{name}</name>").replace(
            FIXTURE_MAC, mac)

    def set_running(self, n: int) -> None:
        """Status files of the first n other guests, as libvirt keeps them."""
        for i in range(self.running, n):
            xml = self.status_xml.replace(f"<name>{FIXTURE_NAME}</name>", f"<name>{other_name(i)}</name>")
            xml = xml.replace(FIXTURE_MAC, other_mac(i))
            _write(os.path.join(self.qemu, f"{other_name(i)}.xml"), xml)
        self.running = max(self.running, n)
        self.write_leases()

    def write_leases(self, flip: int = -1) -> None:
        """One lease per running other guest in <bridge>.status (guest `flip` gets another address)."""
        exp = int(time.time()) + 86400
        leases = [{"ip-address": other_ip(i, i == flip), "mac-address": other_mac(i),
                   "hostname": other_name(i), "client-id": "01:" + other_mac(i), "expiry-time": exp}
                  for i in range(self.running)]
        _write(os.path.join(self.dnsmasq, f"{BRIDGE}.status"), json.dumps(leases, indent=2))
        self.flipped = flip


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# Timing


def timed(argv, env, data: bytes = b"", check: bool = True, stdout_ok: bool = False) -> float:
    """Wall time (ms) of one process, start to exit, as libvirt sees it."""
    t = time.perf_counter()
    p = subprocess.run(argv, input=data, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ms = (time.perf_counter() - t) * 1000
    if check and (p.returncode != 0 or (p.stdout and not stdout_ok)):
        raise SystemExit(f"bench: {argv[1:]} -> {p.returncode}\nstdout: {p.stdout!r}\nstderr: {p.stderr.decode()}")
    if check and b": error:" in p.stderr:
        raise SystemExit(f"bench: {argv[1:]} logged an error:\n{p.stderr.decode()}")
    return ms


def gap(args, op: str) -> None:
    """--gap-ms: a pause after each `stopped`, as a real host has (libvirt
    runs the next `started` only once a QEMU has started). Without it, a
    `started` right after the last guest's `stopped` may wait some 10 ms
    for nf_tables' commit mutex, which the kernel holds while the
    previous hook's netlink socket is closed and the deleted rules' RCU
    grace period ends: whichever version runs, the figure is then a coin
    flip between two modes (README, Performance)."""
    if op == "stopped" and getattr(args, "gap_ms", 0):
        time.sleep(args.gap_ms / 1000)


def med(xs) -> float:
    return round(statistics.median(xs), 2)


class Inner:
    """Runs inside the namespace: every measurement of one backend."""

    def __init__(self, args):
        self.a = args
        self.backend = args.inner
        self.tree = Tree(args.workdir, self.backend, max(args.others))
        self.env = self.tree.env()
        self.out: dict = {"backend": self.backend}

    def hook(self, name: str, mac: str, op: str, check: bool = True) -> float:
        sub = "end" if op in ("stopped", "release") else "begin"
        ms = timed([self.tree.hook, name, op, sub, "-"], self.env,
                   self.tree.domain_xml(name, mac).encode(), check)
        gap(self.a, op)
        return ms

    def cli(self, *args: str) -> float:
        return timed([PY, self.tree.cli, *args], self.env, stdout_ok=True)

    def rules(self) -> int:
        """How many rules/elements the firewall holds now (to show the scale is real)."""
        if self.backend == "nftables":
            out = subprocess.run(["nft", "list", "table", "inet", "vnethook"], capture_output=True, text=True).stdout
            return out.count(" : ")
        fl = "legacy" if self.backend == "iptables-legacy" else "nft"
        n = 0
        for t in (f"iptables-{fl}-save", f"ip6tables-{fl}-save"):
            out = subprocess.run([t], capture_output=True, text=True).stdout
            n += sum(1 for ln in out.splitlines() if ln.startswith("-A VNETHOOK"))
        return n

    def pairs(self, name: str, mac: str, n: int) -> dict:
        up, down = [], []
        for _ in range(n):
            up.append(self.hook(name, mac, "started"))
            down.append(self.hook(name, mac, "stopped"))
        return {"started_ms": med(up), "stopped_ms": med(down),
                "pair_ms": med([a + b for a, b in zip(up, down)])}

    def noop(self, n: int) -> dict:
        bare, prep, unconf = [], [], []
        for _ in range(n):
            bare.append(timed([PY, "-c", "pass"], self.env))
            prep.append(self.hook(BENCH, BENCH_MAC, "prepare"))
            unconf.append(self.hook(UNCONF, "52:54:00:be:00:ff", "started"))
        b = med(bare)
        return {"bare_python_ms": b, "prepare_ms": med(prep), "unconfigured_started_ms": med(unconf),
                "prepare_ratio": round(med(prep) / b, 2), "unconfigured_ratio": round(med(unconf) / b, 2)}

    def sync_figures(self, n: int) -> dict:
        same, one = [], []
        for i in range(n):
            same.append(self.cli("sync"))
        for i in range(n):
            self.tree.write_leases(flip=-1 if self.tree.flipped == 7 else 7)
            one.append(self.cli("sync"))
        return {"guests": self.tree.running, "unchanged_ms": med(same), "one_changed_ms": med(one)}

    def serve(self) -> None:
        """Answer the coordinator's requests, one JSON line each, until stdin closes."""
        for line in sys.stdin:
            req = json.loads(line)
            cmd, n = req["cmd"], req.get("n", 0)
            if cmd == "setup":
                # warm-up: bytecode, config cache, backend detection cache
                self.hook(BENCH, BENCH_MAC, "prepare")
                self.hook(BENCH, BENCH_MAC, "started")
                self.hook(BENCH, BENCH_MAC, "stopped")
                out: dict = {"setup_sync_ms": 0.0}
                if n:
                    self.tree.set_running(n)
                    out["setup_sync_ms"] = round(self.cli("sync"), 1)
            elif cmd == "pair":
                out = {"up": self.hook(BENCH, BENCH_MAC, "started"),
                       "down": self.hook(BENCH, BENCH_MAC, "stopped")}
            elif cmd == "rules":
                out = {"rules": self.rules()}
            elif cmd == "noop":
                out = self.noop(n)
            elif cmd == "range":
                out = self.pairs(RANGE, RANGE_MAC, n)
            elif cmd == "sync":
                out = self.sync_figures(n)
            else:
                raise SystemExit(f"bench: unknown request {cmd}")
            print(json.dumps(out), flush=True)


# --------------------------------------------------------------------------
# Outside: namespaces, then the table


class Worker:
    """An Inner serving requests from inside its own namespace."""

    def __init__(self, backend: str, others: int, base: str, args):
        self.others = others
        self.ns = f"vnh-bench-{os.getpid()}-{backend.split('-')[-1]}-{others}"
        self.proc = None
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        ex = ["ip", "netns", "exec", self.ns]
        subprocess.run(ex + ["ip", "link", "set", "lo", "up"], check=True)
        # vnhbr0: the network of the captured fixtures; virbr9: the one the
        # acceptance rulesets name (nft refuses rules for a missing device)
        for br in (BRIDGE, "virbr9"):
            subprocess.run(ex + ["ip", "link", "add", br, "type", "bridge"], check=True)
            subprocess.run(ex + ["ip", "link", "set", br, "up"], check=True)
        subprocess.run(ex + ["ip", "addr", "add", "192.0.2.1/24", "dev", BRIDGE], check=True)
        if backend == "nftables":
            subprocess.run(ex + ["nft", "-f", os.path.join(RULESETS, "libvirt-nftables.nft")], check=True)
        else:
            fl = backend.split("-")[1]
            for tool, f in ((f"iptables-{fl}-restore", "libvirt-iptables-v4.rules"),
                            (f"ip6tables-{fl}-restore", "libvirt-iptables-v6.rules")):
                with open(os.path.join(RULESETS, f), "rb") as fh:
                    subprocess.run(ex + [tool], stdin=fh, check=True)
        workdir = os.path.join(base, f"others-{others}")
        os.makedirs(workdir)
        argv = ex + [PY, os.path.abspath(__file__), "--inner", backend, "--workdir", workdir,
                     "--repeat", str(args.repeat), "--others", ",".join(map(str, args.others)),
                     "--gap-ms", str(args.gap_ms)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, cmd: str, n: int = 0) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, "n": n}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"bench: the worker in {self.ns} failed")
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
        subprocess.run(["ip", "netns", "del", self.ns], check=False)


def run_backend(backend: str, args) -> dict:
    """One namespace per number of other guests, measured in alternation.

    Why alternate: the scale targets are ratios between these figures, and
    a machine's speed drifts over a run (other load, clocks). Taking the
    0-, 100- and 1000-guest pairs round by round, in rotating order, lets
    drift hit all of them alike instead of whichever phase it fell in.
    """
    base = tempfile.mkdtemp(prefix="vnh-bench-")
    workers: list = []
    try:
        for n in sorted(args.others):
            workers.append(Worker(backend, n, base, args))
        out: dict = {"backend": backend}
        setup = {w.others: w.ask("setup", w.others)["setup_sync_ms"] for w in workers}
        ups: dict = {w.others: [] for w in workers}
        downs: dict = {w.others: [] for w in workers}
        for i in range(args.repeat):
            for w in workers[i % len(workers):] + workers[:i % len(workers)]:
                r = w.ask("pair")
                ups[w.others].append(r["up"])
                downs[w.others].append(r["down"])
        first, biggest = workers[0], workers[-1]
        if args.noop_backend == backend:
            out["noop"] = first.ask("noop", args.repeat)
        out["range"] = first.ask("range", args.repeat)
        out["scale"] = {str(n): {"started_ms": med(ups[n]), "stopped_ms": med(downs[n]),
                                 "pair_ms": med([a + b for a, b in zip(ups[n], downs[n])]),
                                 "rules_installed": w.ask("rules")["rules"], "setup_sync_ms": setup[n]}
                        for n, w in ((w.others, w) for w in workers)}
        if biggest.others:
            out["sync"] = biggest.ask("sync", max(3, args.repeat // 3))
        return out
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(base, ignore_errors=True)


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    cpu = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    py = subprocess.run([PY, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                        text=True).stdout.strip()
    ipt = subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout.strip()
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(), "python": py,
            "iptables": ipt, "nftables": nft}


def verdicts(res: dict) -> list:
    out = []
    noop = next((b["noop"] for b in res["backends"].values() if "noop" in b), None)
    if noop:
        worst = max(noop["prepare_ratio"], noop["unconfigured_ratio"])
        out.append((f"no-op event <= {TARGETS['noop_ratio']}x bare python", f"{worst:.2f}x", worst <= TARGETS["noop_ratio"]))
    for name, b in res["backends"].items():
        s = b["scale"]
        if "0" in s and name in ("iptables-nft", "nftables"):
            v = s["0"]["pair_ms"]
            out.append((f"{name}: started+stopped (10 fwd) <= {TARGETS['pair_ms']:.0f} ms", f"{v:.1f} ms", v <= TARGETS["pair_ms"]))
        if "0" in s and "1000" in s:
            for k, label in (("started_ms", "apply"), ("stopped_ms", "remove")):
                ratio = s["1000"][k] / s["0"][k]
                out.append((f"{name}: {label} with 1000 guests <= {TARGETS['scale_ratio']}x none", f"{ratio:.2f}x",
                            ratio <= TARGETS["scale_ratio"]))
        v = b["range"]["pair_ms"]
        out.append((f"{name}: 1000-port range apply+remove < {TARGETS['range_ms']:.0f} ms", f"{v:.1f} ms", v < TARGETS["range_ms"]))
        if "sync" in b and b["sync"]["guests"] >= 1000:
            v = b["sync"]["unchanged_ms"]
            out.append((f"{name}: sync, 1000 guests, nothing to change < {TARGETS['sync_ms']:.0f} ms", f"{v:.0f} ms",
                        v < TARGETS["sync_ms"]))
    return out


def table(res: dict) -> str:
    L = []
    m = res["machine"]
    L.append(f"machine: {m['cpu']} x{m['cpus']}, kernel {m['kernel']}, Python {m['python']}, "
             f"{m['iptables']}, {m['nftables']}; median of {res['repeat']} runs (ms)"
             + (f", {res['gap_ms']:g} ms after each stopped" if res.get("gap_ms") else ""))
    noop = next((b["noop"] for b in res["backends"].values() if "noop" in b), None)
    if noop:
        L.append("")
        L.append("| event that does nothing | ms | x bare |")
        L.append("|---|---:|---:|")
        L.append(f"| `/usr/bin/python3 -c pass` | {noop['bare_python_ms']:.1f} | 1.00 |")
        L.append(f"| qemu prepare (configured guest) | {noop['prepare_ms']:.1f} | {noop['prepare_ratio']:.2f} |")
        L.append(f"| qemu started (unconfigured guest) | {noop['unconfigured_started_ms']:.1f} | "
                 f"{noop['unconfigured_ratio']:.2f} |")
    others = sorted({int(k) for b in res["backends"].values() for k in b["scale"]})
    L.append("")
    hdr = "| backend | " + " | ".join(f"started / stopped, {n} others" for n in others) + \
          " | 1000-port range started / stopped | sync unchanged / one changed |"
    L.append(hdr)
    L.append("|---" * (3 + len(others)) + "|")
    for name, b in res["backends"].items():
        cells = []
        for n in others:
            s = b["scale"].get(str(n))
            cells.append(f"{s['started_ms']:.1f} / {s['stopped_ms']:.1f} (sum {s['pair_ms']:.1f})" if s else "-")
        r = b["range"]
        sy = b.get("sync")
        sc = f"{sy['unchanged_ms']:.0f} / {sy['one_changed_ms']:.0f} ({sy['guests']} guests)" if sy else "-"
        L.append(f"| {name} | " + " | ".join(cells) + f" | {r['started_ms']:.1f} / {r['stopped_ms']:.1f} | {sc} |")
    L.append("")
    L.append("| target | measured | met |")
    L.append("|---|---:|:---:|")
    for label, val, ok in res["targets"]:
        L.append(f"| {label} | {val} | {'yes' if ok else 'NO'} |")
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="5 runs, 0 and 100 others only")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--others", default="0,100,1000")
    ap.add_argument("--output", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--gap-ms", type=float, default=0.0, help="pause after each stopped (see gap())")
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.others = [int(x) for x in str(args.others).split(",") if x != ""]
    if args.inner:
        Inner(args).serve()
        return 0
    if os.geteuid() != 0:
        sys.stderr.write("bench: needs root (network namespaces)\n")
        return 1
    if args.quick:
        args.repeat = 5
        args.others = [n for n in args.others if n <= 100]
    backends = [b for b in args.backends.split(",") if b]
    args.noop_backend = backends[0]
    res = {"machine": machine(), "repeat": args.repeat, "gap_ms": args.gap_ms, "forwards_per_other_guest": OTHER_FWDS,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "backends": {}}
    for b in backends:
        t = time.monotonic()
        res["backends"][b] = run_backend(b, args)
        sys.stderr.write(f"bench: {b} done in {time.monotonic() - t:.0f} s: {json.dumps(res['backends'][b])}\n")
    res["targets"] = verdicts(res)
    print(table(res))
    with open(args.output, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    print(f"\nwritten: {os.path.relpath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
