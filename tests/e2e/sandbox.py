"""A private, real libvirtd for end-to-end tests.

vnethook's claims are about what a *real* libvirt does: which hooks fire in
which order, what XML arrives on stdin, where libvirt's own firewall rules
land, whether a real DHCP lease shows up. So e2e tests run the installed
libvirtd, dnsmasq and QEMU (TCG, no disk), but inside a mount+network
namespace of their own, so that nothing reaches the host: the host's
/etc/libvirt, /var/lib/libvirt, /run/libvirt, firewall and routes are never
touched, and several sandboxes can run at once.

One long-lived holder process (tools/holder.py under `unshare --mount --net
--fork`) owns the namespaces; every command enters them with nsenter. The
holder is also a dead-man switch: if the test process dies, the pipe to the
holder closes and it kills everything left in the sandbox.

Guests are not real operating systems: the QEMU guest just sits in its
firmware, with its NIC's option ROM off so it never sends a packet. The
guest's *network side* is a named netns holding a veth that carries the
domain's MAC, enslaved to libvirt's bridge, so DHCP, leases and forwarded
connections are real while boots take a second instead of a minute.
The exception is define_linux_guest: a real Debian kernel + busybox
initramfs (guest_image.py) that boots and takes its own lease
(test_real_guest.py).

Files inside the sandbox are reachable from the test process through
`/proc/<holder>/root/...` (see `Sandbox.path`), which is also a valid
VNETHOOK_LIBVIRT_ROOT for product code run outside the sandbox.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools")
PYTHON = "/usr/bin/python3"
NETPEER = os.path.join(TOOLS, "netpeer.py")
UDHCPC_SCRIPT = os.path.join(TOOLS, "udhcpc-script")
TC_WRAPPER = os.path.join(TOOLS, "tc-wrapper")
HOLDER = os.path.join(TOOLS, "holder.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIREWALLD = os.path.join(TOOLS, "firewalld-sandbox.py")
PROBE = os.path.join(TOOLS, "probe.py")
# Counters and handles in `nft list ruleset` / iptables-save output.
COUNTERS = re.compile(r"[ \t]*counter packets \d+ bytes \d+[ \t]*|\[\d+:\d+\]|[ \t]*# handle \d+")
# A private system bus: only the sandbox's firewalld, libvirtd and tests use it.
DBUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""
FIREWALLD_CONF = """DefaultZone=public
CleanupOnExit=yes
CleanupModulesOnExit=no
Lockdown=no
IPv6_rpfilter=yes
IndividualCalls=no
LogDenied=off
FirewallBackend=nftables
FlushAllOnReload=yes
RFC3964_IPv4=yes
"""
# The QEMU capabilities probe takes ~1 s per daemon start; a cache shared by
# all sandboxes (but not the host's /var/cache/libvirt) keeps that cost once.
CACHE_DIR = "/var/tmp/vnethook-e2e-libvirt-cache"
PRIVATE_TC_DIR = "/run/libvirt/vnethook-sandbox"
DAEMON_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}
REQUIRED_TOOLS = ("libvirtd", "virtlogd", "virsh", "unshare", "nsenter", "ip",
                  "qemu-system-x86_64", "busybox", "dnsmasq", "tc")


class SandboxError(Exception):
    """The sandbox could not do what a test asked; the message says why."""


def missing_requirements() -> Optional[str]:
    """Why e2e tests cannot run here, or None. Used for pytest skip reasons."""
    if os.geteuid() != 0:
        return "e2e tests need root (namespaces, libvirtd)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t, path=DAEMON_ENV["PATH"]) is None]
    if missing:
        return "e2e tests need " + ", ".join(missing) + " (not installed)"
    return None


def mac_for(index: int, prefix: str = "52:54:00:e2") -> str:
    """A deterministic, locally-assigned-looking MAC for test domains."""
    return f"{prefix}:{(index >> 8) & 0xff:02x}:{index & 0xff:02x}"


@dataclass(frozen=True)
class Reply:
    """What a client saw: status ok|refused|timeout|error, and the data."""

    status: str
    data: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Server:
    """A netpeer server running in some namespace of the sandbox."""

    def __init__(self, proc: subprocess.Popen, logfile: str, desc: str):
        self.proc = proc
        self.logfile = logfile
        self.desc = desc

    def peers(self) -> List[dict]:
        """Each connection/datagram received: {"proto","peer","port","data"}."""
        try:
            with open(self.logfile, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for s in (self.proc.stdout, self.proc.stderr):
            if s:
                s.close()


class Netns:
    """A network namespace inside the sandbox (None = the sandbox itself,
    which plays the libvirt host)."""

    def __init__(self, sandbox: "Sandbox", ns: Optional[str]):
        self.sandbox = sandbox
        self.ns = ns

    def argv(self, argv: Sequence[str]) -> List[str]:
        inner = list(argv)
        if self.ns:
            inner = ["nsenter", f"--net=/run/netns/{self.ns}", "--"] + inner
        return self.sandbox.enter_argv(inner)

    def run(self, argv: Sequence[str], input: Optional[Union[str, bytes]] = None,
            check: bool = True, timeout: float = 60, env: Optional[Mapping[str, str]] = None
            ) -> subprocess.CompletedProcess:
        return self.sandbox._exec(self.argv(argv), input=input, check=check,
                                  timeout=timeout, env=env)

    def _serve(self, proto: str, port: int, reply: str, bind: str) -> Server:
        sb = self.sandbox
        sb._seq += 1
        logfile = os.path.join(sb.tmpdir, f"server-{sb._seq}-{self.ns or 'host'}-{proto}{port}.log")
        argv = self.argv([PYTHON, NETPEER, "serve", proto, str(port), reply, logfile, bind])
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=sb._env(None))
        line = _readline_timeout(proc, 10)
        if line.strip() != b"ready":
            err = b""
            if proc.poll() is not None and proc.stderr:
                err = proc.stderr.read()
            proc.kill()
            raise SandboxError(f"server {proto}/{port} in {self.ns or 'host'} did not start: "
                               f"{line!r} {err.decode(errors='replace')}")
        srv = Server(proc, logfile, f"{proto}/{port}@{self.ns or 'host'}")
        sb._servers.append(srv)
        return srv

    def serve_tcp(self, port: int, reply: str = "hello", bind: str = "::") -> Server:
        return self._serve("tcp", port, reply, bind)

    def serve_udp(self, port: int, reply: str = "hello", bind: str = "::") -> Server:
        return self._serve("udp", port, reply, bind)

    def _connect(self, proto: str, addr: str, port: int, payload: str, timeout: float,
                 source: Optional[str]) -> Reply:
        argv = [PYTHON, NETPEER, "connect", proto, addr, str(port), payload, str(timeout)]
        if source:
            argv.append(source)
        cp = self.run(argv, check=False, timeout=timeout + 30)
        status = {0: "ok", 2: "refused", 3: "timeout"}.get(cp.returncode, "error")
        return Reply(status, cp.stdout if status == "ok" else cp.stderr.strip())

    def connect_tcp(self, addr: str, port: int, payload: str = "ping", timeout: float = 3,
                    source: Optional[str] = None) -> Reply:
        return self._connect("tcp", addr, port, payload, timeout, source)

    def send_udp(self, addr: str, port: int, payload: str = "ping", timeout: float = 3,
                 source: Optional[str] = None) -> Reply:
        return self._connect("udp", addr, port, payload, timeout, source)

    def ping(self, addr: str, count: int = 1, timeout: int = 3) -> bool:
        cp = self.run(["busybox", "ping", "-c", str(count), "-W", str(timeout), addr], check=False,
                      timeout=count * timeout + 30)
        return cp.returncode == 0

    def addresses(self, family: int = 4) -> List[str]:
        cp = self.run(["ip", "-j", f"-{family}", "addr", "show"])
        out = []
        for link in json.loads(cp.stdout or "[]"):
            for a in link.get("addr_info", []):
                if a.get("scope") == "global":
                    out.append(a["local"])
        return out


class GuestNet(Netns):
    """The network side of one guest NIC: a netns whose eth0 carries the MAC,
    its veth peer enslaved to libvirt's bridge."""

    def __init__(self, sandbox: "Sandbox", ns: str, domain: str, mac: str, bridge: str,
                 host_if: str):
        super().__init__(sandbox, ns)
        self.domain = domain
        self.mac = mac
        self.bridge = bridge
        self.host_if = host_if
        self.ip: Optional[str] = None

    def pin_mac(self) -> None:
        """Keep the bridge sending this MAC's frames to the netns. A QEMU
        whose guest is restored or migrated in announces the NIC's MAC
        (the same MAC) from its tap, and the bridge would learn it there:
        a sticky fdb entry on our port is not moved by learning."""
        self.sandbox.run(["bridge", "fdb", "replace", self.mac, "dev", self.host_if, "master",
                          "static", "sticky"])

    def dhcp(self, hostname: Optional[str] = None, timeout: float = 30) -> str:
        """Get a real lease from libvirt's dnsmasq; returns the address."""
        lease_file = os.path.join(self.sandbox.tmpdir, f"{self.ns}.lease")
        try:
            os.unlink(lease_file)
        except FileNotFoundError:
            pass
        argv = ["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t", "8", "-T", "1",
                "-A", "1", "-s", UDHCPC_SCRIPT]
        if hostname:
            argv += ["-x", f"hostname:{hostname}"]
        cp = self.run(argv, check=False, timeout=timeout, env={"VNH_LEASE_FILE": lease_file})
        try:
            with open(lease_file, encoding="ascii") as f:
                self.ip = f.read().strip()
        except FileNotFoundError:
            raise SandboxError(f"guest {self.ns} ({self.mac}) got no DHCP lease: "
                               f"rc={cp.returncode} {cp.stdout} {cp.stderr}") from None
        return self.ip

    def release(self) -> None:
        """Drop the address (no DHCP release is sent: like a guest that vanishes)."""
        self.run(["ip", "-4", "addr", "flush", "dev", "eth0"])
        self.ip = None

    def set_address(self, cidr: str, gateway: Optional[str] = None) -> None:
        """A static address (IPv6 tests, or a guest that ignores DHCP)."""
        fam = "-6" if ":" in cidr else "-4"
        self.run(["ip", fam, "addr", "add", cidr, "dev", "eth0", "nodad"] if fam == "-6"
                 else ["ip", fam, "addr", "add", cidr, "dev", "eth0"])
        if gateway:
            self.run(["ip", fam, "route", "replace", "default", "via", gateway, "dev", "eth0"])
        if fam == "-4":
            self.ip = cidr.split("/")[0]


class External(Netns):
    """A client outside the host: its own netns, routed to the sandbox."""

    def __init__(self, sandbox: "Sandbox", ns: str, host_if: str, ip: str, host_ip: str,
                 ip6: Optional[str], host_ip6: Optional[str]):
        super().__init__(sandbox, ns)
        self.host_if = host_if
        self.ip = ip
        self.host_ip = host_ip
        self.ip6 = ip6
        self.host_ip6 = host_ip6


class Sandbox:
    """A private libvirtd in its own mount+network namespace. Use as a
    context manager; teardown runs even when the test fails."""

    def __init__(self, firewall_backend: str = "iptables",
                 hooks: Optional[Mapping[str, str]] = None,
                 env: Optional[Mapping[str, str]] = None,
                 tmpdir: Optional[str] = None,
                 log_level: int = 3,
                 iptables: str = "nft",
                 firewalld: bool = False,
                 distro: str = "host",
                 listen_tcp: bool = False,
                 writable_root: bool = False):
        if firewall_backend not in ("iptables", "nftables"):
            raise ValueError(f"firewall_backend must be iptables or nftables, not {firewall_backend!r}")
        if iptables not in ("nft", "legacy"):
            raise ValueError(f"iptables must be nft or legacy, not {iptables!r}")
        if distro not in ("host", "debian12", "debian13"):
            raise ValueError(f"distro must be host, debian12 or debian13, not {distro!r}")
        if distro != "host" and (iptables != "nft" or firewalld):
            raise ValueError("a distro root runs its stock iptables (nft) and no firewalld")
        if distro == "debian12" and firewall_backend != "iptables":
            raise ValueError("Debian 12's libvirt 9.0 has only the iptables backend")
        # "host": the libvirt installed here; "debian12" (libvirt 9.0),
        # "debian13" (11.3): a stock root of that release (libvirt_root.py)
        # that the holder chroots into.
        self.distro = distro
        if writable_root and distro == "host":
            raise ValueError("writable_root is for a distro root")
        # A distro root is shared and cached: a sandbox that installs into it
        # (a package test) gets an overlay of its own, gone with the sandbox.
        self.writable_root = writable_root
        # A second host for `virsh migrate`: libvirtd also listens on TCP
        # (no auth: only the sandboxes' own link reaches it) and has a host
        # UUID of its own (libvirt refuses to migrate to "the same host").
        self.listen_tcp = listen_tcp
        self.chroot: Optional[str] = None
        self._in_chroot = False
        self.firewall_backend = firewall_backend
        # "legacy": inside the sandbox only, the iptables alternatives point
        # at iptables-legacy (a host where update-alternatives chose it):
        # libvirt then writes the legacy tables, and vnethook follows.
        self.iptables = iptables
        # A private system D-Bus and a real firewalld (nftables backend),
        # started before libvirtd so that libvirt sees firewalld.
        self.firewalld = firewalld
        self.firewalld_proc: Optional[subprocess.Popen] = None
        self.dbus_proc: Optional[subprocess.Popen] = None
        self.env: Dict[str, str] = dict(env or {})
        self._own_tmpdir = tmpdir is None
        self.tmpdir = tmpdir or tempfile.mkdtemp(prefix="vnh-sandbox-")
        os.makedirs(self.tmpdir, exist_ok=True)
        os.chmod(self.tmpdir, 0o755)
        self.etc = os.path.join(self.tmpdir, "etc-libvirt")
        self.varlib = os.path.join(self.tmpdir, "var-lib-libvirt")
        self.logdir = os.path.join(self.tmpdir, "var-log-libvirt")
        self.hooks_dir = os.path.join(self.etc, "hooks")
        self.log_level = log_level
        self._initial_hooks = dict(hooks or {})
        self.holder: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None
        self._servers: List[Server] = []
        self._guests: List[GuestNet] = []
        self._externals: List[External] = []
        self._seq = 0
        self.host = Netns(self, None)
        self.timings: Dict[str, float] = {}

    # ---- lifecycle -------------------------------------------------------
    def __enter__(self) -> "Sandbox":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        why = missing_requirements()
        if why:
            raise SandboxError(why)
        t0 = time.monotonic()
        if self.distro != "host":
            import libvirt_root

            try:
                self.chroot = libvirt_root.ensure(self.distro)
            except libvirt_root.RootUnavailable as e:
                raise SandboxError(f"no {self.distro} root: {e}") from None
        self._prepare_trees()
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--net", "--fork", "--propagation", "private",
             PYTHON, HOLDER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=DAEMON_ENV)
        line = _readline_timeout(self.holder, 10)
        try:
            self.pid = int(line)
        except ValueError:
            raise SandboxError(f"namespace holder did not start: {line!r}") from None
        if self.chroot:
            self._enter_chroot()
        self._mount_private_trees()
        self.run(["ip", "link", "set", "lo", "up"])
        self.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        if self.firewalld:
            self._start_dbus()
            self.start_firewalld()
        self._start_daemons()
        self.timings["start"] = time.monotonic() - t0

    def _prepare_trees(self) -> None:
        # /etc/libvirt: the host's config minus its domains, networks and hooks.
        shutil.copytree(self._outside("/etc/libvirt"), self.etc, symlinks=True,
                        ignore=shutil.ignore_patterns("*.xml", "autostart", "hooks"))
        for sub in ("qemu/networks/autostart", "qemu/autostart",
                    "hooks/qemu.d", "hooks/network.d"):
            os.makedirs(os.path.join(self.etc, sub), exist_ok=True)
        if self.distro != "debian12":  # 9.0 has no network.conf (iptables only)
            with open(os.path.join(self.etc, "network.conf"), "a", encoding="ascii") as f:
                f.write(f'\nfirewall_backend = "{self.firewall_backend}"\n')
        with open(os.path.join(self.etc, "libvirtd.conf"), "a", encoding="ascii") as f:
            f.write(f'\nlog_outputs = "{self.log_level}:file:/var/log/libvirt/libvirtd.log"\n')
            if self.listen_tcp:
                import uuid

                f.write(f'listen_tls = 0\nlisten_tcp = 1\nauth_tcp = "none"\n'
                        f'host_uuid = "{uuid.uuid4()}"\n')
        with open(os.path.join(self.etc, "qemu.conf"), "a", encoding="ascii") as f:
            # No host cgroups (they are not namespaced here), no per-guest
            # mount namespace (qemu then stays visible to the holder's sweep).
            f.write("\ncgroup_controllers = [ ]\nnamespaces = [ ]\n")
        for rel, content in self._initial_hooks.items():
            self.install_hook(rel, content)
        # /var/lib/libvirt: same skeleton and owners as the host's.
        os.makedirs(self.varlib, exist_ok=True)
        os.chmod(self.varlib, 0o755)
        for sub in ("qemu", "dnsmasq", "network", "boot", "images"):
            d = os.path.join(self.varlib, sub)
            os.makedirs(d, exist_ok=True)
            ref = self._outside(os.path.join("/var/lib/libvirt", sub))
            try:
                st = os.stat(ref)
                os.chown(d, st.st_uid, st.st_gid)
                os.chmod(d, st.st_mode & 0o7777)
            except FileNotFoundError:
                os.chmod(d, 0o755)
        os.makedirs(os.path.join(self.logdir, "qemu"), exist_ok=True)
        os.makedirs(self.cache_dir, mode=0o711, exist_ok=True)
        if self.iptables == "legacy":
            self.alternatives = os.path.join(self.tmpdir, "etc-alternatives")
            os.makedirs(self.alternatives)
            for name in os.listdir("/etc/alternatives"):
                src = os.path.join("/etc/alternatives", name)
                if not os.path.islink(src):
                    shutil.copy2(src, os.path.join(self.alternatives, name))
                    continue
                target = os.readlink(src)
                if name in ("iptables", "iptables-restore", "iptables-save",
                            "ip6tables", "ip6tables-restore", "ip6tables-save"):
                    target = "/usr/sbin/" + name.replace("tables", "tables-legacy", 1)
                os.symlink(target, os.path.join(self.alternatives, name))

    def _mount_private_trees(self) -> None:
        real_tc = os.path.realpath(shutil.which("tc", path=DAEMON_ENV["PATH"]) or "/usr/sbin/tc")
        steps = [] if self.chroot else [["mount", "--make-rprivate", "/"]]
        steps += [
            ["mount", "--bind", self.etc, "/etc/libvirt"],
            ["mount", "--bind", self.varlib, "/var/lib/libvirt"],
            ["mount", "--bind", self.logdir, "/var/log/libvirt"],
            ["mount", "--bind", self.cache_dir, "/var/cache/libvirt"],
            # A host without systemd may not have /run/libvirt (tmpfiles.d
            # makes it at boot): the mount point is created, empty.
            ["mkdir", "-p", "/run/libvirt"],
            ["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run/libvirt"],
            ["mkdir", "-p", "/run/netns"],
            ["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run/netns"],
            ["mkdir", "-p", PRIVATE_TC_DIR],
            ["touch", PRIVATE_TC_DIR + "/tc.real"],
            ["mount", "--bind", real_tc, PRIVATE_TC_DIR + "/tc.real"],
            ["mount", "--bind", TC_WRAPPER, real_tc],
        ]
        if self.iptables == "legacy":
            steps.append(["mount", "--bind", self.alternatives, "/etc/alternatives"])
        if self.firewalld:
            fw_etc = os.path.join(self.tmpdir, "etc-firewalld")
            for sub in ("zones", "policies", "services", "icmptypes", "ipsets", "helpers"):
                os.makedirs(os.path.join(fw_etc, sub), exist_ok=True)
            with open(os.path.join(fw_etc, "firewalld.conf"), "w", encoding="ascii") as f:
                f.write(FIREWALLD_CONF)
            with open(os.path.join(self.tmpdir, "dbus.conf"), "w", encoding="ascii") as f:
                f.write(DBUS_CONFIG)
            os.makedirs(os.path.join(self.tmpdir, "var-log-firewalld"), exist_ok=True)
            steps += [
                ["mkdir", "-p", "/run/dbus", "/etc/firewalld"],
                ["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run/dbus"],
                ["mount", "--bind", fw_etc, "/etc/firewalld"],
            ]
        for argv in steps:
            self.run(argv)

    @property
    def cache_dir(self) -> str:
        return CACHE_DIR if self.distro == "host" else f"{CACHE_DIR}-{self.distro}"

    def _outside(self, p: str) -> str:
        """Where the test process finds `p` of the sandbox's own root
        before the sandbox runs (the libvirt 9.0 root, or this host)."""
        return os.path.join(self.chroot, p.lstrip("/")) if self.chroot else p

    def _enter_chroot(self) -> None:
        """Mount what the second root needs (its own /proc, a sysfs of the
        sandbox's network namespace, /dev, an empty /run; /tmp, /var/tmp and
        this checkout at their own paths, so test files and tools keep their
        names), then have the holder chroot into it."""
        assert self.chroot is not None and self.holder is not None and self.holder.stdin is not None
        root = self.chroot
        shared = ["/tmp", "/var/tmp", REPO]
        if not any(self.tmpdir.startswith(d + "/") for d in shared):
            shared.append(self.tmpdir)
        for d in shared:  # mount points (in the cached root: the overlay has them too)
            os.makedirs(os.path.join(root, d.lstrip("/")), exist_ok=True)
        steps = [["mount", "--make-rprivate", "/"]]
        if self.writable_root:
            layers = {d: os.path.join(self.tmpdir, f"root-{d}") for d in ("upper", "work", "merged")}
            for d in layers.values():
                os.makedirs(d)
            steps.append(["mount", "-t", "overlay", "overlay", "-o",
                          f"lowerdir={root},upperdir={layers['upper']},workdir={layers['work']}",
                          layers["merged"]])
            root = layers["merged"]
        else:
            steps.append(["mount", "--bind", root, root])
        steps += [
            ["mount", "-t", "proc", "proc", f"{root}/proc"],
            ["mount", "-t", "sysfs", "sysfs", f"{root}/sys"],
            ["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", f"{root}/run"],
        ]
        steps += self._dev_steps(f"{root}/dev")
        steps += [["mount", "--bind", d, os.path.join(root, d.lstrip("/"))] for d in shared]
        for argv in steps:
            self.run(argv)
        self.holder.stdin.write(f"chroot {root}\n".encode())
        self.holder.stdin.flush()
        line = _readline_timeout(self.holder, 10)
        if line.strip() != b"chrooted":
            raise SandboxError(f"the holder did not chroot into {root}: {line!r}")
        self._in_chroot = True

    # Device nodes a distro root gets: what libvirt, QEMU (TCG, a tap NIC)
    # and the tools need, and no /dev/kvm. The guests are TCG; with this kind
    # of machine's nested KVM, libvirt 9.0's capability probe waits ~30 s on
    # every daemon start, and a stand-in node makes 11.3 re-probe every time.
    DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty", "net/tun")

    @classmethod
    def _dev_steps(cls, dev: str) -> List[List[str]]:
        steps = [["mount", "-t", "tmpfs", "-o", "mode=755,nosuid", "tmpfs", dev],
                 ["mkdir", "-p", f"{dev}/net", f"{dev}/pts", f"{dev}/shm"]]
        for n in cls.DEV_NODES:
            if os.path.exists(f"/dev/{n}"):
                steps += [["touch", f"{dev}/{n}"], ["mount", "--bind", f"/dev/{n}", f"{dev}/{n}"]]
        steps += [
            ["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620", "devpts",
             f"{dev}/pts"],
            ["ln", "-s", "pts/ptmx", f"{dev}/ptmx"],
            ["mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", f"{dev}/shm"],
            ["ln", "-s", "/proc/self/fd", f"{dev}/fd"],
        ]
        steps += [["ln", "-s", f"/proc/self/fd/{i}", f"{dev}/{name}"]
                  for i, name in enumerate(("stdin", "stdout", "stderr"))]
        return steps

    # ---- D-Bus and firewalld (firewalld=True) ----------------------------
    def _start_dbus(self, timeout: float = 10) -> None:
        self.dbus_proc = subprocess.Popen(
            self.enter_argv(["dbus-daemon", f"--config-file={self.tmpdir}/dbus.conf", "--nofork",
                             "--nopidfile"]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=self._env(None))
        self.wait_for(lambda: os.path.exists(self.path("/run/dbus/system_bus_socket")),
                      timeout=timeout, interval=0.05, what="the sandbox's D-Bus")

    def firewall_cmd(self, *args: str, timeout: float = 120) -> str:
        return self.run(["firewall-cmd", *args], timeout=timeout).stdout.strip()

    def start_firewalld(self, timeout: float = 60) -> float:
        """Start firewalld and wait until it answers `--state`."""
        t0 = time.monotonic()
        log = os.path.join(self.tmpdir, "firewalld.log")
        self.firewalld_proc = subprocess.Popen(
            self.enter_argv([PYTHON, FIREWALLD, "--nofork", "--nopid", "--log-target", "file",
                             "--log-file", log]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=self._env(None))

        def up():
            if self.firewalld_proc.poll() is not None:
                raise SandboxError(f"firewalld exited ({self.firewalld_proc.returncode}): "
                                   + _tail(log, 20))
            return self.run(["firewall-cmd", "--state"], check=False, timeout=30).returncode == 0

        self.wait_for(up, timeout=timeout, interval=0.1, what="firewalld --state")
        self.timings["firewalld_start"] = time.monotonic() - t0
        return self.timings["firewalld_start"]

    def stop_firewalld(self, timeout: float = 30) -> None:
        """SIGTERM firewalld (by pid) and wait for it to exit."""
        p = self.firewalld_proc
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
        self.firewalld_proc = None

    def _start_daemons(self) -> None:
        self.run(["virtlogd", "-d", "-p", "/run/libvirt/vnethook-sandbox/virtlogd.pid"])
        self.start_libvirtd()

    def start_libvirtd(self, timeout: float = 60) -> float:
        t0 = time.monotonic()
        listen = ["--listen"] if self.listen_tcp else []
        self.run(["libvirtd", "-d", *listen, "-p", "/run/libvirt/vnethook-sandbox/libvirtd.pid"],
                 timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            cp = self.run(["virsh", "-c", "qemu:///system", "list", "--name"], check=False,
                          timeout=timeout)
            if cp.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise SandboxError(f"libvirtd did not answer within {timeout}s: {cp.stderr}\n"
                                   + self.libvirtd_log(tail=30))
            time.sleep(0.1)
        self.timings["libvirtd_start"] = time.monotonic() - t0
        return self.timings["libvirtd_start"]

    def _daemon_pid(self, name: str) -> Optional[int]:
        try:
            with open(self.path(f"{PRIVATE_TC_DIR}/{name}.pid"), encoding="ascii") as f:
                pid = int(f.read().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def libvirtd_pid(self) -> Optional[int]:
        return self._daemon_pid("libvirtd")

    def stop_libvirtd(self, timeout: float = 45, force_after: Optional[float] = None) -> None:
        """SIGTERM libvirtd and wait for it to exit (it can take ~30 s).
        force_after: SIGKILL after that many seconds (teardown only)."""
        pid = self.libvirtd_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        t0 = time.monotonic()
        while _alive(pid):
            elapsed = time.monotonic() - t0
            if force_after is not None and elapsed > force_after:
                os.kill(pid, signal.SIGKILL)
                force_after = None
            if elapsed > timeout:
                raise SandboxError(f"libvirtd {pid} did not exit within {timeout}s")
            time.sleep(0.05)
        self.timings["libvirtd_stop"] = time.monotonic() - t0

    def restart_libvirtd(self) -> None:
        self.stop_libvirtd()
        self.start_libvirtd()

    def reload_libvirtd(self, settle: float = 0.5, timeout: float = 20) -> None:
        """SIGHUP: libvirt reloads config, re-checks hooks and rebuilds its
        firewall rules asynchronously. Returns once the ruleset has stopped
        changing for `settle` seconds."""
        pid = self.libvirtd_pid()
        if pid is None:
            raise SandboxError("libvirtd is not running")
        # Without counters: traffic through the rules during the reload
        # would otherwise keep the ruleset "changing" until the timeout.
        def rules() -> str:
            return COUNTERS.sub("", self.ruleset())
        before = rules()
        os.kill(pid, signal.SIGHUP)
        self.wait_stable(rules, settle=settle, timeout=timeout, first=before)

    def ruleset(self) -> str:
        """The sandbox's whole firewall: nft list ruleset (covers iptables-nft)
        plus the legacy iptables tables."""
        out = [self.run(["nft", "list", "ruleset"], check=False).stdout]
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
            if shutil.which(tool, path=DAEMON_ENV["PATH"]):
                text = self.run([tool], check=False).stdout
                # without the "# Generated by ... on <date>" comments
                out.append("\n".join(ln for ln in text.splitlines() if not ln.startswith("#")))
        return "\n".join(out)

    @staticmethod
    def wait_stable(fn, settle: float = 0.5, timeout: float = 20, first=None):
        """Poll fn() until its value is unchanged for `settle` seconds."""
        last = fn() if first is None else first
        changed_at = time.monotonic()
        deadline = changed_at + timeout
        while time.monotonic() < deadline:
            time.sleep(0.1)
            cur = fn()
            if cur != last:
                last, changed_at = cur, time.monotonic()
            elif time.monotonic() - changed_at >= settle:
                return cur
        return last

    def close(self) -> None:
        """Tear down in libvirt's order; never raises (cleanup must finish)."""
        if self.holder is None:
            return
        errors: List[str] = []
        for srv in self._servers:
            _try(errors, srv.stop)
        if self.pid is not None and self.libvirtd_pid() is not None:
            names = self._virsh_names(["list", "--name"], errors)
            for name in names:
                _try(errors, self.virsh, "destroy", name, check=False, timeout=60)
            for net in self._virsh_names(["net-list", "--name"], errors):
                _try(errors, self.virsh, "net-destroy", net, check=False, timeout=60)
            _try(errors, self.stop_libvirtd, 45, 10)
        _try(errors, self.stop_firewalld)
        if self.dbus_proc is not None and self.dbus_proc.poll() is None:
            self.dbus_proc.terminate()
            _try(errors, self.dbus_proc.wait, 10)
        vl = self._daemon_pid("virtlogd") if self.pid is not None else None
        if vl is not None:
            _try(errors, os.kill, vl, signal.SIGTERM)
        # The holder kills whatever is left once its stdin closes.
        try:
            if self.holder.stdin:
                self.holder.stdin.close()
            self.holder.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"holder: {e}")
            self.holder.kill()
        if self.holder.stdout:
            self.holder.stdout.close()
        self.holder = None
        if errors:
            print("sandbox teardown problems: " + "; ".join(errors), file=sys.stderr)
        if self._own_tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _virsh_names(self, args: List[str], errors: List[str]) -> List[str]:
        try:
            return [n for n in self.virsh(*args, timeout=30).split() if n]
        except Exception as e:  # noqa: BLE001 - teardown goes on
            errors.append(f"virsh {args}: {e}")
            return []

    # ---- running things --------------------------------------------------
    def enter_argv(self, argv: Sequence[str]) -> List[str]:
        if self.pid is None:
            raise SandboxError("sandbox is not running")
        root = ["--root", "--wd"] if self._in_chroot else []
        return ["nsenter", f"--target={self.pid}", "--mount", "--net", *root, "--"] + list(argv)

    def _env(self, extra: Optional[Mapping[str, str]]) -> Dict[str, str]:
        env = dict(DAEMON_ENV)
        env.update(self.env)
        if extra:
            env.update(extra)
        return env

    def _exec(self, argv: List[str], input=None, check=True, timeout: float = 60,
              env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
        text = not isinstance(input, bytes)
        try:
            cp = subprocess.run(argv, input=input, capture_output=True, text=text,
                                timeout=timeout, env=self._env(env))
        except subprocess.TimeoutExpired as e:
            raise SandboxError(f"timed out after {timeout}s: {_shown(argv)}") from e
        if check and cp.returncode != 0:
            raise SandboxError(f"command failed (rc={cp.returncode}): {_shown(argv)}\n"
                               f"stdout: {cp.stdout}\nstderr: {cp.stderr}")
        return cp

    def run(self, argv: Sequence[str], input: Optional[Union[str, bytes]] = None,
            check: bool = True, timeout: float = 60,
            env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
        """Run argv in the sandbox's mount+net namespace (the libvirt host)."""
        return self._exec(self.enter_argv(argv), input=input, check=check, timeout=timeout,
                          env=env)

    def virsh(self, *args: str, check: bool = True, timeout: float = 120,
              input: Optional[str] = None) -> str:
        cp = self.run(["virsh", "-c", "qemu:///system", "-q", *args], check=check,
                      timeout=timeout, input=input)
        return cp.stdout

    def path(self, p: str) -> str:
        """A host-side path to `p` as the sandbox sees it (for reading
        /run/libvirt and friends from the test process)."""
        if self.pid is None:
            raise SandboxError("sandbox is not running")
        return f"/proc/{self.pid}/root/{p.lstrip('/')}"

    @property
    def root(self) -> str:
        """Usable as VNETHOOK_LIBVIRT_ROOT from outside the sandbox."""
        return self.path("/")

    def read(self, p: str) -> str:
        with open(self.path(p), encoding="utf-8") as f:
            return f.read()

    def libvirtd_log(self, tail: Optional[int] = None) -> str:
        try:
            with open(os.path.join(self.logdir, "libvirtd.log"), encoding="utf-8",
                      errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return ""
        if tail:
            text = "\n".join(text.splitlines()[-tail:])
        return text

    def qemu_log(self, domain: str) -> str:
        try:
            with open(os.path.join(self.logdir, "qemu", f"{domain}.log"), encoding="utf-8",
                      errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # ---- hooks -----------------------------------------------------------
    def install_hook(self, rel: str, content: str, mode: int = 0o755) -> str:
        """Write a hook (e.g. "qemu.d/50-vnethook", "network") into the private
        /etc/libvirt/hooks. libvirt notices new hook files only at daemon
        start and on SIGHUP."""
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"hook path must be relative to hooks/: {rel!r}")
        dst = os.path.join(self.hooks_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = dst + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, dst)
        return dst

    def remove_hook(self, rel: str) -> None:
        try:
            os.unlink(os.path.join(self.hooks_dir, rel))
        except FileNotFoundError:
            pass

    def hook_wrapper(self, argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> str:
        """Text of a hook script that execs argv + libvirt's arguments with
        env baked in: libvirt clears a hook's environment (LC_ALL, PATH), so
        VNETHOOK_* must live in the script itself. Python, not sh, so no
        value is ever shell-quoted."""
        full_env = dict(self.env)
        full_env.update(env or {})
        return (f"#!{PYTHON}\n"
                "import os, sys\n"
                f"os.environ.update({json.dumps(full_env)})\n"
                f"argv = {json.dumps(list(argv))}\n"
                "os.execv(argv[0], argv + sys.argv[1:])\n")

    # ---- networks --------------------------------------------------------
    def define_network(self, name: str = "vnhnet", bridge: str = "vnhbr0",
                       subnet: str = "192.0.2.0/24",
                       dhcp_range: Optional[Tuple[str, str]] = None,
                       static_hosts: Iterable[Sequence[str]] = (),
                       ipv6: Optional[str] = None, forward: Optional[str] = "nat",
                       start: bool = True, dnsmasq_options: Sequence[str] = ("no-ping",)) -> str:
        """Define (and by default start) a network. static_hosts: (mac, ip[, name]).
        ipv6: a CIDR like "2001:db8:1::/64" (host side gets ::1, DHCPv6 range
        ::100-::1ff). dnsmasq_options: extra dnsmasq options through libvirt's
        dnsmasq XML namespace. The default ("no-ping",) skips dnsmasq's ~3 s
        ping check before each new lease (0.1 s instead of 3.1 s per DHCP);
        pass () for libvirt's exact stock config. Returns the defined XML."""
        net4 = ipaddress.ip_network(subnet)
        root = ET.Element("network")
        ET.SubElement(root, "name").text = name
        if forward:
            ET.SubElement(root, "forward", mode=forward)
        ET.SubElement(root, "bridge", name=bridge, stp="off", delay="0")
        ip = ET.SubElement(root, "ip", address=str(net4.network_address + 1),
                           prefix=str(net4.prefixlen))
        dhcp = ET.SubElement(ip, "dhcp")
        lo, hi = dhcp_range or (str(net4.network_address + 100), str(net4.network_address + 199))
        ET.SubElement(dhcp, "range", start=lo, end=hi)
        for host in static_hosts:
            attrs = {"mac": host[0], "ip": host[1]}
            if len(host) > 2:
                attrs["name"] = host[2]
            ET.SubElement(dhcp, "host", **attrs)
        if ipv6:
            net6 = ipaddress.ip_network(ipv6)
            ip6 = ET.SubElement(root, "ip", family="ipv6", address=str(net6.network_address + 1),
                                prefix=str(net6.prefixlen))
            d6 = ET.SubElement(ip6, "dhcp")
            ET.SubElement(d6, "range", start=str(net6.network_address + 0x100),
                          end=str(net6.network_address + 0x1ff))
        if dnsmasq_options:
            ns = "http://libvirt.org/schemas/network/dnsmasq/1.0"
            ET.register_namespace("dnsmasq", ns)
            opts = ET.SubElement(root, f"{{{ns}}}options")
            for o in dnsmasq_options:
                ET.SubElement(opts, f"{{{ns}}}option", value=o)
        xml = ET.tostring(root, encoding="unicode")
        self.virsh_define("net-define", xml)
        if start:
            self.net_start(name)
        return xml

    def virsh_define(self, verb: str, xml: str) -> None:
        self._seq += 1
        f = os.path.join(self.tmpdir, f"define-{self._seq}.xml")
        with open(f, "w", encoding="utf-8") as fh:
            fh.write(xml)
        self.virsh(verb, f)

    def net_start(self, name: str = "vnhnet") -> float:
        t0 = time.monotonic()
        self.virsh("net-start", name)
        self.timings["net_start"] = time.monotonic() - t0
        return self.timings["net_start"]

    def net_destroy(self, name: str = "vnhnet") -> None:
        self.virsh("net-destroy", name)

    def net_update_add_host(self, mac: str, ip: str, name: str = "vnhnet",
                            hostname: Optional[str] = None) -> None:
        host = ET.Element("host", mac=mac, ip=ip)
        if hostname:
            host.set("name", hostname)
        self.virsh("net-update", name, "add", "ip-dhcp-host", ET.tostring(host, encoding="unicode"),
                   "--live", "--config")

    def bridge_of(self, network: str) -> str:
        xml = self.virsh("net-dumpxml", network)
        br = ET.fromstring(xml).find("bridge")
        if br is None:
            raise SandboxError(f"network {network} has no bridge")
        return br.get("name")

    # ---- domains ---------------------------------------------------------
    def define_domain(self, name: str, macs: Sequence[str] = (), network: str = "vnhnet",
                      interfaces: Sequence[Tuple[str, str]] = (), memory_mib: int = 64) -> str:
        """A TCG domain with no disk: it sits in its firmware, which is all
        the hooks and taps need. Each NIC's option ROM is off so the VM
        never PXE-boots with the MAC our guest netns also uses.
        interfaces: (mac, network) pairs, in addition to macs on `network`."""
        root = ET.Element("domain", type="qemu")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "memory", unit="MiB").text = str(memory_mib)
        ET.SubElement(root, "vcpu").text = "1"
        os_el = ET.SubElement(root, "os")
        ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
        features = ET.SubElement(root, "features")  # ACPI: i440fx PCI hotplug needs it
        ET.SubElement(features, "acpi")
        devices = ET.SubElement(root, "devices")
        for mac, net in [(m, network) for m in macs] + list(interfaces):
            devices.append(interface_xml(mac, net))
        ET.SubElement(devices, "memballoon", model="none")
        xml = ET.tostring(root, encoding="unicode")
        self.virsh_define("define", xml)
        return xml

    def define_linux_guest(self, name: str, mac: str, kernel: str, initrd: str, cmdline: str,
                           network: str = "vnhnet", memory_mib: int = 256,
                           accel: str = "qemu") -> str:
        """A domain that boots a real Linux kernel + initramfs directly
        (<kernel>/<initrd>/<cmdline>, no disk): see guest_image.py. Its
        serial console goes to console_log(name). accel: "qemu" (TCG) or
        "kvm" (libvirt's domain type)."""
        root = ET.Element("domain", type=accel)
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "memory", unit="MiB").text = str(memory_mib)
        ET.SubElement(root, "vcpu").text = "1"
        os_el = ET.SubElement(root, "os")
        ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
        ET.SubElement(os_el, "kernel").text = kernel
        ET.SubElement(os_el, "initrd").text = initrd
        ET.SubElement(os_el, "cmdline").text = cmdline
        features = ET.SubElement(root, "features")  # ACPI: the power button of virsh shutdown
        ET.SubElement(features, "acpi")
        devices = ET.SubElement(root, "devices")
        devices.append(interface_xml(mac, network))
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=f"/var/log/libvirt/qemu/{name}.console")
        ET.SubElement(serial, "target", port="0")
        ET.SubElement(devices, "memballoon", model="none")
        xml = ET.tostring(root, encoding="unicode")
        self.virsh_define("define", xml)
        return xml

    def console_log(self, name: str) -> str:
        """What a define_linux_guest domain wrote to its serial console."""
        try:
            with open(os.path.join(self.logdir, "qemu", f"{name}.console"), encoding="utf-8",
                      errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def start(self, name: str) -> float:
        t0 = time.monotonic()
        self.virsh("start", name)
        self.timings["virsh_start"] = time.monotonic() - t0
        return self.timings["virsh_start"]

    def destroy(self, name: str) -> None:
        self.virsh("destroy", name)

    def shutdown(self, name: str, timeout: float = 30) -> None:
        """A guest-initiated power-off. The firmware-only guest ignores ACPI,
        so QEMU is told to quit; libvirt sees the guest shut itself down."""
        self.virsh("qemu-monitor-command", name, "--hmp", "quit", check=False)
        deadline = time.monotonic() + timeout
        while name in self.virsh("list", "--name").split():
            if time.monotonic() > deadline:
                raise SandboxError(f"domain {name} did not shut down in {timeout}s")
            time.sleep(0.1)

    def undefine(self, name: str) -> None:
        self.virsh("undefine", name)

    def attach_interface(self, domain: str, mac: str, network: str = "vnhnet") -> None:
        self.virsh_define_device("attach-device", domain, interface_xml(mac, network))

    def detach_interface(self, domain: str, mac: str) -> None:
        self.virsh("detach-interface", domain, "network", "--mac", mac, "--live")

    def virsh_define_device(self, verb: str, domain: str, el: ET.Element) -> None:
        self._seq += 1
        f = os.path.join(self.tmpdir, f"device-{self._seq}.xml")
        with open(f, "w", encoding="utf-8") as fh:
            fh.write(ET.tostring(el, encoding="unicode"))
        self.virsh(verb, domain, f, "--live")

    # ---- guest and external namespaces -----------------------------------
    def add_guest_netns(self, domain: str, mac: str, network: str = "vnhnet",
                        bridge: Optional[str] = None) -> GuestNet:
        bridge = bridge or self.bridge_of(network)
        n = len(self._guests)
        ns, host_if, peer = f"vnhg{n}", f"vnhg{n}h", f"vnhg{n}p"
        self.run(["ip", "netns", "add", ns])
        self.run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer])
        self.run(["ip", "link", "set", peer, "netns", ns])
        g = Netns(self, ns)
        g.run(["ip", "link", "set", peer, "name", "eth0"])
        g.run(["ip", "link", "set", "eth0", "address", mac])
        g.run(["ip", "link", "set", "eth0", "up"])
        g.run(["ip", "link", "set", "lo", "up"])
        self.run(["ip", "link", "set", host_if, "master", bridge])
        self.run(["ip", "link", "set", host_if, "up"])
        guest = GuestNet(self, ns, domain, mac.lower(), bridge, host_if)
        self._guests.append(guest)
        return guest

    def add_external(self, subnet: str = "198.51.100.0/24",
                     ipv6: Optional[str] = None) -> External:
        """A client beyond the host: host side gets .1 (::1), the client .2 (::2)
        with its default route via the host."""
        n = len(self._externals)
        ns, host_if, peer = f"vnhx{n}", f"vnhx{n}h", f"vnhx{n}p"
        net = ipaddress.ip_network(subnet)
        host_ip, ip = str(net.network_address + 1), str(net.network_address + 2)
        self.run(["ip", "netns", "add", ns])
        self.run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer])
        self.run(["ip", "link", "set", peer, "netns", ns])
        x = Netns(self, ns)
        x.run(["ip", "link", "set", peer, "name", "eth0"])
        x.run(["ip", "link", "set", "eth0", "up"])
        x.run(["ip", "link", "set", "lo", "up"])
        x.run(["ip", "addr", "add", f"{ip}/{net.prefixlen}", "dev", "eth0"])
        x.run(["ip", "route", "add", "default", "via", host_ip])
        self.run(["ip", "addr", "add", f"{host_ip}/{net.prefixlen}", "dev", host_if])
        self.run(["ip", "link", "set", host_if, "up"])
        ip6 = host_ip6 = None
        if ipv6:
            net6 = ipaddress.ip_network(ipv6)
            host_ip6, ip6 = str(net6.network_address + 1), str(net6.network_address + 2)
            x.run(["ip", "-6", "addr", "add", f"{ip6}/{net6.prefixlen}", "dev", "eth0", "nodad"])
            x.run(["ip", "-6", "route", "add", "default", "via", host_ip6])
            self.run(["ip", "-6", "addr", "add", f"{host_ip6}/{net6.prefixlen}", "dev", host_if,
                      "nodad"])
            self.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])
        ext = External(self, ns, host_if, ip, host_ip, ip6, host_ip6)
        self._externals.append(ext)
        return ext

    def link(self, other: "Sandbox", subnet: str = "203.0.113.0/30") -> Tuple[str, str]:
        """A veth between this sandbox's host and another's (two hypervisors
        on one LAN, e.g. for migration). Returns (our address, theirs)."""
        if other.pid is None:
            raise SandboxError("the other sandbox is not running")
        net = ipaddress.ip_network(subnet)
        mine, theirs = str(net.network_address + 1), str(net.network_address + 2)
        self._seq += 1
        a, b = f"vnhl{self._seq}a", f"vnhl{self._seq}b"
        self.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
        self.run(["ip", "link", "set", b, "netns", str(other.pid)])
        self.run(["ip", "addr", "add", f"{mine}/{net.prefixlen}", "dev", a])
        self.run(["ip", "link", "set", a, "up"])
        other.run(["ip", "addr", "add", f"{theirs}/{net.prefixlen}", "dev", b])
        other.run(["ip", "link", "set", b, "up"])
        return mine, theirs

    # convenience: the host side acts like any other namespace
    def serve_tcp(self, port: int, reply: str = "hello", bind: str = "::") -> Server:
        return self.host.serve_tcp(port, reply, bind)

    def serve_udp(self, port: int, reply: str = "hello", bind: str = "::") -> Server:
        return self.host.serve_udp(port, reply, bind)

    def connect_tcp(self, addr: str, port: int, payload: str = "ping", timeout: float = 3,
                    source: Optional[str] = None) -> Reply:
        return self.host.connect_tcp(addr, port, payload, timeout, source)

    def send_udp(self, addr: str, port: int, payload: str = "ping", timeout: float = 3,
                 source: Optional[str] = None) -> Reply:
        return self.host.send_udp(addr, port, payload, timeout, source)

    def wait_for(self, pred, timeout: float = 20, interval: float = 0.1, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise SandboxError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    def lease_file(self, bridge: str = "vnhbr0") -> str:
        return self.path(f"/var/lib/libvirt/dnsmasq/{bridge}.status")

    def leases(self, bridge: str = "vnhbr0") -> list:
        try:
            with open(self.lease_file(bridge), encoding="utf-8") as f:
                return json.loads(f.read() or "[]")
        except FileNotFoundError:
            return []


def interface_xml(mac: str, network: str) -> ET.Element:
    iface = ET.Element("interface", type="network")
    ET.SubElement(iface, "mac", address=mac)
    ET.SubElement(iface, "source", network=network)
    ET.SubElement(iface, "model", type="virtio")
    ET.SubElement(iface, "rom", enabled="no")
    return iface


def _shown(argv: List[str]) -> List[str]:
    """The command itself, without the nsenter prefix."""
    return argv[argv.index("--") + 1:] if "--" in argv else argv


def _tail(path: str, n: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "\n".join(f.read().splitlines()[-n:])
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def _try(errors: List[str], fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - teardown goes on
        errors.append(f"{getattr(fn, '__name__', fn)}: {e}")


def _readline_timeout(proc: subprocess.Popen, timeout: float) -> bytes:
    """Read one line from proc.stdout, giving up after timeout."""
    import select

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
    return buf
