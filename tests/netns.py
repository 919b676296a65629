"""A throwaway libvirt-like host in network namespaces, for real-packet tests.

Why namespaces: backends change the firewall, and the only honest test of
a port forward is a packet that gets through (or does not). Each test gets
its own set of namespaces, named with the pid and a counter, so tests never
see each other's rules and the root namespace is never touched.

Layout (documentation ranges only):

    guest g1 192.0.2.10, 2001:db8:1::10 --+
                                          +-- virbr9 [host] 192.0.2.1/24, 2001:db8:1::1/64
    guest g2 192.0.2.11, 2001:db8:1::11 --+   (libvirt's NAT network)
    external 198.51.100.2 (+ .3), 2001:db8:2::2 --- ext0 [host] 198.51.100.1/24, 2001:db8:2::1/64
    remote   203.0.113.2, 2001:db8:3::2 ----------- rem0 [host] 203.0.113.1/24, 2001:db8:3::1/64

Every non-host namespace routes by default via the host; ip_forward is on
in the host namespace only. `load_libvirt(kind)` installs the rules libvirt
11.3 creates for this network (observed from a real libvirtd), through the
same tool libvirt would use: iptables-nft, iptables-legacy or nft.

`teardown()` kills every process started here (by pid) and deletes the
namespaces; fixtures register it as a finalizer so it runs on failure too.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import select
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

PY = "/usr/bin/python3"
HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(HERE, "tools")
RULESETS = os.path.join(HERE, "acceptance", "rulesets")
BRIDGE = "virbr9"
SUBNET4, SUBNET6 = "192.0.2.0/24", "2001:db8:1::/64"

A = {
    "host_br4": "192.0.2.1", "host_br6": "2001:db8:1::1",
    "g1_4": "192.0.2.10", "g1_6": "2001:db8:1::10",
    "g2_4": "192.0.2.11", "g2_6": "2001:db8:1::11",
    "host_ext4": "198.51.100.1", "host_ext6": "2001:db8:2::1",
    "ext4": "198.51.100.2", "ext4_alt": "198.51.100.3", "ext6": "2001:db8:2::2",
    "host_rem4": "203.0.113.1", "host_rem6": "2001:db8:3::1",
    "rem4": "203.0.113.2", "rem6": "2001:db8:3::2",
}

_counter = itertools.count()


class NetnsError(Exception):
    pass


@dataclass
class Reply:
    ok: bool
    text: str  # the peer's answer, or REFUSED / TIMEOUT / UNREACHABLE / ERROR ...

    @property
    def who(self) -> Optional[str]:
        return self.text.split()[0] if self.ok else None

    @property
    def port(self) -> Optional[int]:
        return int(self.text.split()[1]) if self.ok else None

    @property
    def client(self) -> Optional[str]:
        """The client address the server saw."""
        return self.text.split()[2] if self.ok else None


def run(argv: Sequence[str], input: Optional[str] = None, check: bool = True,
        timeout: float = 60) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} -> {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


class Topology:
    """The namespaces, links and helpers of one test."""

    def __init__(self) -> None:
        n = next(_counter)
        base = f"vnh-{os.getpid()}-{n}"
        self.ns = {r: f"{base}-{r}" for r in ("host", "g1", "g2", "ext", "rem")}
        self.procs: List[subprocess.Popen] = []
        self.made: List[str] = []

    # --- building ---------------------------------------------------------

    def ip(self, role: str, *args: str, check: bool = True):
        return run(["ip", "-n", self.ns[role], *args], check=check)

    def exec(self, role: str, *argv: str, input: Optional[str] = None, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.ns[role], *argv], input=input, check=check,
                   timeout=timeout)

    def build(self) -> "Topology":
        for role, name in self.ns.items():
            run(["ip", "netns", "add", name])
            self.made.append(name)
            self.ip(role, "link", "set", "lo", "up")
            # No duplicate address detection: addresses usable at once, so
            # the first IPv6 packet of a test is not lost to a tentative address.
            for conf in ("default", "all"):
                self.exec(role, "sysctl", "-qw", f"net.ipv6.conf.{conf}.accept_dad=0")
        h = "host"
        self.exec(h, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.exec(h, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self.ip(h, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self.ip(h, "addr", "add", "192.0.2.1/24", "dev", BRIDGE)
        self.ip(h, "addr", "add", "2001:db8:1::1/64", "dev", BRIDGE, "nodad")
        self.ip(h, "link", "set", BRIDGE, "up")
        links = [
            ("g1", "vnet0", [("192.0.2.10/24", "2001:db8:1::10/64")], True),
            ("g2", "vnet1", [("192.0.2.11/24", "2001:db8:1::11/64")], True),
            ("ext", "ext0", [("198.51.100.2/24", "2001:db8:2::2/64"), ("198.51.100.3/24", None)], False),
            ("rem", "rem0", [("203.0.113.2/24", "2001:db8:3::2/64")], False),
        ]
        gw = {"g1": ("192.0.2.1", "2001:db8:1::1"), "g2": ("192.0.2.1", "2001:db8:1::1"),
              "ext": ("198.51.100.1", "2001:db8:2::1"), "rem": ("203.0.113.1", "2001:db8:3::1")}
        for role, hostif, addrs, bridged in links:
            self.ip(h, "link", "add", hostif, "type", "veth", "peer", "name", "eth0",
                    "netns", self.ns[role])
            if bridged:
                self.ip(h, "link", "set", hostif, "master", BRIDGE)
            elif role == "ext":
                self.ip(h, "addr", "add", "198.51.100.1/24", "dev", hostif)
                self.ip(h, "addr", "add", "2001:db8:2::1/64", "dev", hostif, "nodad")
            else:
                self.ip(h, "addr", "add", "203.0.113.1/24", "dev", hostif)
                self.ip(h, "addr", "add", "2001:db8:3::1/64", "dev", hostif, "nodad")
            self.ip(h, "link", "set", hostif, "up")
            for a4, a6 in addrs:
                self.ip(role, "addr", "add", a4, "dev", "eth0")
                if a6:
                    self.ip(role, "addr", "add", a6, "dev", "eth0", "nodad")
            self.ip(role, "link", "set", "eth0", "up")
            self.ip(role, "route", "add", "default", "via", gw[role][0])
            self.ip(role, "-6", "route", "add", "default", "via", gw[role][1])
        return self

    def load_libvirt(self, kind: str) -> None:
        """Install libvirt's own rules for the NAT network, as libvirt would."""
        if kind in ("iptables-nft", "iptables-legacy"):
            flavour = kind.split("-")[1]
            self.exec("host", f"iptables-{flavour}-restore",
                      input=_read(os.path.join(RULESETS, "libvirt-iptables-v4.rules")))
            self.exec("host", f"ip6tables-{flavour}-restore",
                      input=_read(os.path.join(RULESETS, "libvirt-iptables-v6.rules")))
        elif kind == "nftables":
            self.exec("host", "nft", "-f", os.path.join(RULESETS, "libvirt-nftables.nft"))
        else:
            raise ValueError(kind)

    def load_foreign(self, kind: str) -> None:
        """Other people's rules that vnethook must never change.

        A Docker-like set of iptables chains (through the same iptables
        flavour the host uses, or iptables-nft next to libvirt's nftables),
        plus an admin's own rule and an admin's own nftables table.
        """
        flavour = "legacy" if kind == "iptables-legacy" else "nft"
        self.exec("host", f"iptables-{flavour}-restore", "--noflush",
                  input=_read(os.path.join(RULESETS, "foreign-v4.rules")))
        self.exec("host", f"ip6tables-{flavour}-restore", "--noflush",
                  input=_read(os.path.join(RULESETS, "foreign-v6.rules")))
        self.exec("host", "nft", "-f", os.path.join(RULESETS, "foreign.nft"))

    # --- traffic ------------------------------------------------------------

    def server(self, role: str, name: str, ports: str, proto: str = "tcp",
               bind4: Optional[str] = None) -> subprocess.Popen:
        argv = ["ip", "netns", "exec", self.ns[role], PY, os.path.join(TOOLS, "peer.py"), "serve",
                "--proto", proto, "--ports", ports, "--name", name, "--lifetime", "300"]
        if bind4:
            argv += ["--bind4", bind4]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        ready, _, _ = select.select([p.stdout], [], [], 10)
        line = p.stdout.readline() if ready else ""
        if line.strip() != "READY":
            p.kill()
            raise NetnsError(f"server {name} in {role} did not start: {line!r} {p.stderr.read() if p.poll() is not None else ''}")
        return p

    def connect(self, role: str, addr: str, port: int, proto: str = "tcp",
                source: Optional[str] = None, timeout: float = 1.5) -> Reply:
        argv = [PY, os.path.join(TOOLS, "peer.py"), "connect", "--proto", proto, "--addr", addr,
                "--port", str(port), "--timeout", str(timeout)]
        if source:
            argv += ["--source", source]
        p = self.exec(role, *argv, check=False, timeout=timeout + 20)
        return Reply(p.returncode == 0, (p.stdout.strip() or p.stderr.strip()))

    # --- driving the backend --------------------------------------------------

    def drive(self, cmd: str, backend: str, *args: str, forwards: Optional[list] = None,
              check: bool = True) -> dict:
        argv = [PY, os.path.join(TOOLS, "drive.py"), cmd, backend, *args]
        data = json.dumps([f.to_dict() for f in forwards]) if forwards is not None else ""
        p = self.exec("host", *argv, input=data, check=False, timeout=120)
        try:
            out = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise NetnsError(f"drive {cmd} crashed: {p.stderr.strip()}") from None
        if check and not out.get("ok"):
            raise NetnsError(f"drive {cmd} failed: {out.get('error')}")
        return out

    def drive_popen(self, cmd: str, backend: str, *args: str, forwards: list) -> subprocess.Popen:
        """Start a drive without waiting (for kill-mid-change tests)."""
        argv = ["ip", "netns", "exec", self.ns["host"], PY, os.path.join(TOOLS, "drive.py"), cmd,
                backend, *args]
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        p.stdin.write(json.dumps([f.to_dict() for f in forwards]))
        p.stdin.close()
        return p

    # --- looking at the firewall ------------------------------------------------

    def dumps(self, kind: str) -> Dict[str, str]:
        """Normalized rulesets (comments and packet counters removed)."""
        out: Dict[str, str] = {}
        if kind == "iptables-legacy":
            tools = ["iptables-legacy-save", "ip6tables-legacy-save"]
        else:
            tools = ["iptables-nft-save", "ip6tables-nft-save"]
        for t in tools:
            text = self.exec("host", t).stdout
            lines = [re.sub(r"\[\d+:\d+\]", "[0:0]", ln) for ln in text.splitlines()
                     if not ln.startswith("#")]
            out[t] = "\n".join(lines)
        nft = self.exec("host", "nft", "list", "ruleset").stdout
        out["nft"] = re.sub(r"counter packets \d+ bytes \d+", "counter", nft)
        out["nft-foreign"] = self.exec("host", "nft", "list", "table", "inet", "adminfw",
                                       check=False).stdout
        return out

    # --- attackers and witnesses ---------------------------------------------------

    def sniff(self, role: str, iface: str = "eth0") -> "Sniffer":
        """Record every TCP/UDP packet that reaches `iface` in `role`'s namespace."""
        out = os.path.join(self._tmp(), f"sniff-{role}-{iface}-{len(self.procs)}.jsonl")
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[role], PY, os.path.join(TOOLS, "sniff.py"),
                              iface, out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        ready, _, _ = select.select([p.stdout], [], [], 10)
        if not ready or p.stdout.readline().strip() != "READY":
            p.kill()
            raise NetnsError(f"sniffer on {role}/{iface} did not start")
        return Sniffer(out)

    def craft(self, role: str, dst_mac: str, src: str, dst: str, proto: str, dport: int,
              iface: str = "eth0", count: int = 3) -> None:
        """Put hand-made packets on the wire (tools/craft.py, scapy)."""
        self.exec(role, PY, os.path.join(TOOLS, "craft.py"), iface, dst_mac, src, dst, proto,
                  str(dport), str(count), timeout=60)

    def mac(self, role: str, iface: str) -> str:
        return json.loads(self.ip(role, "-j", "link", "show", iface).stdout)[0]["address"]

    def route_loopback_via(self, role: str, gateway: str) -> None:
        """Make `role` send 127.0.0.0/8 to `gateway` instead of its own lo,
        as an attacker in full control of its own host can."""
        self.exec(role, "sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1")
        self.ip(role, "route", "del", "local", "127.0.0.0/8", "dev", "lo", "table", "local")
        self.ip(role, "route", "del", "local", "127.0.0.1", "dev", "lo", "table", "local")
        self.ip(role, "route", "add", "127.0.0.0/8", "via", gateway, "dev", "eth0")

    def _tmp(self) -> str:
        if not getattr(self, "_tmpdir", None):
            import tempfile

            self._tmpdir = tempfile.mkdtemp(prefix="vnh-netns-")
        return self._tmpdir

    def sysctl(self, path: str) -> str:
        return self.exec("host", "cat", f"/proc/sys/{path}").stdout.strip()

    # --- cleanup ----------------------------------------------------------------

    def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdout, p.stderr, p.stdin):
                if f:
                    f.close()
        for name in self.made:
            # Anything still running in our namespaces was started by us.
            pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "del", name], check=False)
        self.made.clear()
        if getattr(self, "_tmpdir", None):
            import shutil

            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


class Sniffer:
    """What a sniffer recorded so far."""

    def __init__(self, path: str) -> None:
        self.path = path

    def packets(self, **match) -> List[dict]:
        try:
            with open(self.path) as f:
                seen = [json.loads(ln) for ln in f if ln.strip()]
        except FileNotFoundError:
            return []
        return [p for p in seen if all(p.get(k) == v for k, v in match.items())]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def wait_for(pred, timeout: float = 5.0, step: float = 0.05):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(step)
