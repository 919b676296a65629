"""Helpers shared by the hostile tests (a uniquely named module: several test
directories have a conftest.py, so `from conftest import` is ambiguous)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
REPO = os.path.dirname(TESTS)
for p in (REPO, TESTS):
    if p not in sys.path:
        sys.path.insert(0, p)

from netns import BRIDGE, Topology  # noqa: E402

PY = "/usr/bin/python3"
BACKENDS = ["iptables-nft", "iptables-legacy", "nftables"]
TOOLS = ["ip", "iptables-nft-restore", "ip6tables-nft-restore", "iptables-legacy-restore",
         "ip6tables-legacy-restore", "nft", "unshare"]
NETWORK = "default"


def why_not_netns() -> Optional[str]:
    if os.geteuid() != 0:
        return "needs root (network namespaces, firewall)"
    missing = [t for t in TOOLS if not shutil.which(t, path="/usr/sbin:/sbin:/usr/bin:/bin")]
    if missing:
        return "needs " + ", ".join(missing)
    return None


def domain_xml(name: str, macs: List[str], network: str = NETWORK, bridge: str = BRIDGE) -> str:
    """A <domain> as the qemu `started` hook sees it (libvirt 11.3 shape)."""
    nics = "".join(
        f"    <interface type='network'>\n"
        f"      <mac address='{m}'/>\n"
        f"      <source network='{network}' portid='00000000-0000-4000-8000-{i:012x}' bridge='{bridge}'/>\n"
        f"      <target dev='vnet{i}'/>\n"
        f"      <model type='virtio'/>\n"
        f"    </interface>\n"
        for i, m in enumerate(macs)
    )
    return (f"<domain type='qemu' id='1'>\n  <name>{_esc(name)}</name>\n"
            f"  <uuid>7173025f-8590-4473-9433-945ce04714f5</uuid>\n  <devices>\n{nics}  </devices>\n</domain>\n")


def status_xml(name: str, macs: List[str], network: str = NETWORK, bridge: str = BRIDGE) -> str:
    """/run/libvirt/qemu/<dom>.xml: <domstatus> with the bridge under <actual>."""
    nics = "".join(
        f"      <interface type='network'>\n"
        f"        <mac address='{m}'/>\n"
        f"        <source network='{network}' portid='00000000-0000-4000-8000-{i:012x}'/>\n"
        f"        <actual type='network'>\n          <source bridge='{bridge}'/>\n        </actual>\n"
        f"        <target dev='vnet{i}'/>\n"
        f"      </interface>\n"
        for i, m in enumerate(macs)
    )
    return (f"<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.\n-->\n\n"
            f"<domstatus state='running' reason='booted' pid='1'>\n"
            f"  <domain type='qemu' id='1'>\n    <name>{_esc(name)}</name>\n"
            f"    <devices>\n{nics}    </devices>\n  </domain>\n</domstatus>\n")


def network_xml(name: str = NETWORK, bridge: str = BRIDGE, hosts=()) -> str:
    h = "".join(f"        <host mac='{m}' ip='{ip}'/>\n" for m, ip in hosts)
    return (f"<networkstatus>\n  <network>\n    <name>{name}</name>\n"
            f"    <forward mode='nat'/>\n    <bridge name='{bridge}' stp='off' delay='0'/>\n"
            f"    <ip address='192.0.2.1' prefix='24'>\n      <dhcp>\n"
            f"        <range start='192.0.2.100' end='192.0.2.199'/>\n{h}      </dhcp>\n    </ip>\n"
            f"    <ip family='ipv6' address='2001:db8:1::1' prefix='64'/>\n"
            f"  </network>\n</networkstatus>\n")


def hook_data(network: str = NETWORK, bridge: str = BRIDGE) -> str:
    inner = network_xml(network, bridge).replace("<networkstatus>", "<hookData>").replace(
        "</networkstatus>", "</hookData>")
    return inner


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;").replace('"', "&quot;")


def yaml_str(s: str) -> str:
    """A YAML double-quoted scalar for any text (JSON strings are YAML)."""
    return json.dumps(s)


class FakeHost:
    """A netns host + a fake libvirt tree + vnethook's config and state dirs."""

    def __init__(self, topo: Optional[Topology], tmp, backend: str):
        self.topo = topo
        self.backend = backend
        self.tmp = tmp
        self.root = tmp / "libvirt-root"
        self.cfg = tmp / "etc-vnethook"
        self.state = tmp / "run-vnethook"
        for d in (self.root / "run/libvirt/qemu", self.root / "run/libvirt/network",
                  self.root / "var/lib/libvirt/dnsmasq", self.root / "etc/libvirt", self.cfg):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.cfg, 0o755)
        conf = "nftables" if backend == "nftables" else "iptables"
        (self.root / "etc/libvirt/network.conf").write_text(f'firewall_backend = "{conf}"\n')
        (self.root / "run/libvirt/network" / f"{NETWORK}.xml").write_text(network_xml())
        self.env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL": "C",
            "PYTHONPATH": REPO,
            "PYTHONDONTWRITEBYTECODE": "1",
            "VNETHOOK_CONFIG": str(self.cfg),
            "VNETHOOK_LIBVIRT_ROOT": str(self.root),
            "VNETHOOK_STATE_DIR": str(self.state),
            "VNETHOOK_LOG": "stderr",
        }

    # ---- the map ---------------------------------------------------------
    def write_map(self, guests: Dict[str, str], extra: str = "", name: str = "ports.yaml") -> None:
        """guests: domain name -> YAML body of its entry (a flow list or mapping)."""
        lines = ["settings:", f"  firewall: {self.backend}", "  lease_watch: off", "guests:"]
        for g, body in guests.items():
            lines.append(f"  {yaml_str(g)}: {body}")
        self.write_raw(("\n".join(lines) + "\n" + extra), name)

    def write_raw(self, text, name: str = "ports.yaml") -> None:
        p = self.cfg / name
        tmp = p.with_name("." + p.name + ".tmp")
        if isinstance(text, bytes):
            tmp.write_bytes(text)
        else:
            tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)

    # ---- libvirt's files ---------------------------------------------------
    def status_path(self, name: str):
        return self.root / "run/libvirt/qemu" / f"{name}.xml"

    def lease_path(self, bridge: str = BRIDGE):
        return self.root / "var/lib/libvirt/dnsmasq" / f"{bridge}.status"

    def run_domain(self, name: str, macs: List[str]) -> bytes:
        """Mark the domain running (status file); return the hook's stdin."""
        self.status_path(name).write_text(status_xml(name, macs))
        return domain_xml(name, macs).encode()

    def stop_domain(self, name: str) -> None:
        try:
            self.status_path(name).unlink()
        except FileNotFoundError:
            pass

    def set_leases(self, leases: list) -> None:
        p = self.lease_path()
        tmp = p.with_suffix(".new")
        tmp.write_text(json.dumps(leases))
        os.replace(tmp, p)

    # ---- running vnethook --------------------------------------------------
    def _argv(self, argv: List[str]) -> List[str]:
        if self.topo is None:
            return argv
        return ["ip", "netns", "exec", self.topo.ns["host"], *argv]

    def hook_argv(self, kind: str, obj: str, op: str, sub: str = "begin", extra: str = "-") -> List[str]:
        return self._argv([PY, os.path.join(REPO, "hooks", kind), obj, op, sub, extra])

    def hook(self, kind: str, obj: str, op: str, stdin: bytes = b"", sub: Optional[str] = None,
             timeout: float = 60) -> subprocess.CompletedProcess:
        if sub is None:
            sub = "end" if op in ("stopped", "release") else "begin"
        return subprocess.run(self.hook_argv(kind, obj, op, sub), input=stdin, capture_output=True,
                              env=self.env, timeout=timeout, cwd="/")

    def cli_argv(self, *args: str) -> List[str]:
        return self._argv([PY, "-m", "vnethook", *args])

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.cli_argv(*args), capture_output=True, env=self.env, timeout=timeout,
                              cwd=REPO)

    def status(self):
        """`vnethook status --json`: (exit status, the report)."""
        p = self.cli("status", "--json")
        return p.returncode, json.loads(p.stdout)

    def started(self, name: str, macs: List[str]) -> subprocess.CompletedProcess:
        return self.hook("qemu", name, "started", self.run_domain(name, macs))

    def stopped(self, name: str, macs: List[str]) -> subprocess.CompletedProcess:
        data = domain_xml(name, macs).encode()
        self.stop_domain(name)
        return self.hook("qemu", name, "stopped", data)

    # ---- looking -------------------------------------------------------------
    def records(self) -> Dict[str, dict]:
        d = self.state / "guests"
        out = {}
        if d.is_dir():
            for p in sorted(d.glob("*.json")):
                out[p.name[:-5]] = json.loads(p.read_text())
        return out

    def dump(self) -> Dict[str, str]:
        """Every ruleset view, normalized (counters), comments kept."""
        out = {}
        for t in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"):
            text = self.topo.exec("host", t).stdout
            out[t] = "\n".join(re.sub(r"\[\d+:\d+\]", "[0:0]", ln) for ln in text.splitlines()
                               if not ln.startswith("#"))
        nft = self.topo.exec("host", "nft", "list", "ruleset").stdout
        out["nft"] = re.sub(r"counter packets \d+ bytes \d+", "counter", nft)
        return out

    def views(self) -> List[str]:
        """The views where this backend's own rules show with their tags."""
        if self.backend == "iptables-nft":
            return ["iptables-nft-save", "ip6tables-nft-save"]
        if self.backend == "iptables-legacy":
            return ["iptables-legacy-save", "ip6tables-legacy-save"]
        return ["nft"]

    def ours(self, dump: Optional[Dict[str, str]] = None) -> List[str]:
        """Every tagged line of this backend's views, with its table/chain/map
        path, so a real duplicate shows as a repeated item."""
        dump = dump if dump is not None else self.dump()
        out = []
        for view in self.views():
            stack: List[str] = []
            table = ""
            for ln in dump[view].splitlines():
                s = ln.strip()
                if not s:
                    continue
                if s.startswith("*"):
                    table = s
                if s.endswith("{"):
                    stack.append(s[:-1].strip())
                    if any(_OWN_BLOCK.match(b) for b in stack):
                        out.append(f"{view}: {table}{' / '.join(stack)}")
                    continue
                if s.startswith("}") and stack:
                    stack.pop()
                    continue
                if any(_OWN_BLOCK.match(b) for b in stack) or _OWN_LINE.search(s):
                    out.append(f"{view}: {table}{' / '.join(stack)}: {s}")
        return out

    def foreign(self, dump: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """Every view without vnethook's lines/blocks: must stay byte-identical."""
        dump = dump if dump is not None else self.dump()
        out = {}
        for view, text in dump.items():
            keep, skip = [], 0
            for ln in text.splitlines():
                s = ln.strip()
                if skip:
                    skip += s.count("{") - s.count("}")
                    continue
                if _OWN_BLOCK.match(s) and s.endswith("{"):
                    skip = 1
                    continue
                if _OWN_LINE.search(s):
                    continue
                keep.append(ln)
            out[view] = "\n".join(keep)
        if self.backend == "iptables-nft":
            # iptables-nft rules show in `nft list ruleset` without their
            # comments, and it leaves the builtin chains it created: compare
            # its tables through the save views, the rest of nft as is.
            out["nft"] = _drop_tables(out["nft"], ("ip filter", "ip nat", "ip6 filter", "ip6 nat"))
        else:
            # Our accept in another manager's iptables-nft FORWARD/DOCKER-USER
            # (firewall/others.py): nft prints it without its comment.
            out["nft"] = "\n".join(ln for ln in out["nft"].splitlines() if _OTHERS_NFT not in ln)
        return out


_OTHERS_NFT = "ct status dnat ct mark and 0x2000000 == 0x2000000  counter accept"


_OWN_BLOCK = re.compile(r"(table \S+ vnethook|chain VNETHOOK-)")
_OWN_LINE = re.compile(r'--comment "?vnethook:|VNETHOOK-|comment "vnethook')


def _drop_tables(text: str, names) -> str:
    out, skip = [], 0
    for ln in text.splitlines():
        s = ln.strip()
        if skip:
            skip += s.count("{") - s.count("}")
            continue
        if any(s == f"table {n} {{" for n in names):
            skip = 1
            continue
        out.append(ln)
    return "\n".join(out)


def reaches_g1(host) -> bool:
    """From outside, TCP 8000 and UDP 5300 of the host's external address
    reach the servers g1 and g1u (the guest 192.0.2.10 of the hostile tests'
    map: `8000:80, 5300:53/udp`)."""
    from netns import A

    tcp = host.topo.connect("ext", A["host_ext4"], 8000)
    udp = host.topo.connect("ext", A["host_ext4"], 5300, proto="udp")
    return tcp.ok and tcp.who == "g1" and udp.ok and udp.who == "g1u"
