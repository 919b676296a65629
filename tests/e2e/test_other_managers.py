"""vnethook next to the real other firewall managers: Docker's dockerd and ufw.

tests/hostile/test_other_managers.py proves firewall/others.py against
simulated Docker and ufw rulesets; this file runs the real ones, Debian's
docker.io (20.10) and ufw (0.36), inside a sandbox's mount and network
namespaces (sandbox.py), next to a real libvirtd and real traffic from an
external client. Nothing of them touches the host: dockerd gets private
data, exec and config roots, a private /etc/docker and a docker0 on a
documentation range; ufw gets private copies of /etc/ufw, /etc/default/ufw
and /lib/ufw bind-mounted inside the sandbox's mount namespace only.

Each test runs on libvirt's iptables backend and on its nftables backend
(the one Docker's iptables-nft FORWARD policy DROP breaks without
vnethook's accept), with the host's iptables being iptables-nft.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time

import pytest

from sandbox import DAEMON_ENV, PYTHON, Sandbox, SandboxError, mac_for
from vnethook_env import VnethookEnv

pytestmark = pytest.mark.e2e

HOST_EXT = "198.51.100.1"
DOCKER_BIP = "203.0.113.129/25"  # docker0: a documentation range
DOCKERD = shutil.which("dockerd", path=DAEMON_ENV["PATH"])
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker", path=DAEMON_ENV["PATH"])
UFW = shutil.which("ufw", path=DAEMON_ENV["PATH"])

needs_docker = pytest.mark.skipif(not (DOCKERD and DOCKER), reason="needs docker.io (dockerd); tests/deps.sh installs it")
needs_ufw = pytest.mark.skipif(not UFW or not os.path.isdir("/lib/ufw"), reason="needs ufw; tests/deps.sh installs it")

# One probe loop in the external client's netns: a TCP connect every 50 ms
# until the stop file appears; one line "t ok" per try.
PROBE = textwrap.dedent(
    """
    import os, socket, sys, time
    host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    while not os.path.exists(stop):
        t = time.monotonic()
        ok = 0
        try:
            with socket.create_connection((host, port), timeout=0.2) as s:
                s.settimeout(0.3)
                s.sendall(b"probe")
                ok = int(bool(s.recv(100)))
        except OSError:
            pass
        print(f"{t:.3f} {ok}", flush=True)
        time.sleep(max(0.0, t + 0.05 - time.monotonic()))
    """
)


@pytest.fixture(params=["iptables", "nftables"])
def sb(make_sandbox, request):
    return make_sandbox(request.param)


@pytest.fixture
def vh(sb, tmp_path):
    env = VnethookEnv(sb, tmp_path)
    env.install()
    sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    return env


def _reach(ext, port=8080, timeout=2):
    return ext.connect_tcp(HOST_EXT, port, "ping", timeout=timeout)


def _guest(sb, name, index, dhcp=True):
    mac = mac_for(index)
    sb.define_domain(name, macs=[mac])
    g = sb.add_guest_netns(name, mac)
    if dhcp:
        g.dhcp(hostname=name)
    g.serve_tcp(80, f"{name} tcp")
    g.serve_udp(53, f"{name} udp")
    return g


MAP = """
    guests:
      web1:
        - 8080:80
        - 5353:53/udp
    """


def _assert_forwards(ext, name="web1"):
    r = _reach(ext)
    assert r.ok and r.data == f"{name} tcp", r
    u = ext.send_udp(HOST_EXT, 5353, "q")
    assert u.ok and u.data == f"{name} udp", u


def _assert_truthful_ok(vh):
    cp = vh.run(vh.cli_argv("status", "--json"), check=False)
    st = json.loads(cp.stdout)
    assert cp.returncode == 0, st
    assert st["problems"] == [] and not st.get("path_problems"), st
    assert all(g["drift"] == [] and g["errors"] == [] for g in st["guests"]), st
    doc = vh.run(vh.cli_argv("doctor", "web1", "8080"), check=False)
    assert doc.returncode == 0, doc.stdout + doc.stderr


def _assert_closed(ext, g):
    """Nothing but the map is open: an unmapped port and the guest's own
    address stay unreachable from outside."""
    assert not _reach(ext, 8090, timeout=1).ok
    assert not ext.connect_tcp(g.ip, 80, "x", timeout=1).ok


def _assert_no_trace(sb, vh):
    """Exact teardown: no line of vnethook's in any listing. nft shows the
    accept iptables-nft put into DOCKER-USER/FORWARD without its comment,
    so its ct mark bit counts too, and iptables-save is asked as well."""
    assert vh.our_rules() == [], "vnethook rules left after the guest stopped"
    for argv in (["nft", "list", "ruleset"], ["iptables-save"], ["ip6tables-save"]):
        text = sb.run(argv).stdout
        left = [ln for ln in text.splitlines() if "vnethook" in ln.lower() or "0x2000000" in ln]
        assert left == [], f"{argv[0]} still lists: {left}"


def _probe(sb, ext, tmp_path, port=8080):
    stop = str(tmp_path / f"probe-stop-{time.monotonic_ns()}")
    proc = subprocess.Popen(ext.argv([PYTHON, "-c", PROBE, HOST_EXT, str(port), stop]),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=sb._env(None))

    def finish():
        open(stop, "w").close()
        out, _ = proc.communicate(timeout=20)
        tries = [(float(t), ok == "1") for t, ok in (ln.split() for ln in out.splitlines() if ln)]
        worst = cur = 0.0
        start = None
        for t, ok in tries:
            if ok:
                if start is not None:
                    cur = t - start
                    worst = max(worst, cur)
                start = None
            elif start is None:
                start = t
        if start is not None:  # still failing at the end
            worst = max(worst, tries[-1][0] - start + 0.05)
        return worst, tries

    return finish


class Dockerd:
    """A dockerd in the sandbox's namespaces with private everything."""

    def __init__(self, sb: Sandbox, tmp_path):
        self.sb = sb
        self.root = tmp_path / "docker"
        self.etc = self.root / "etc-docker"
        for d in ("data", "etc-docker"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # containerd's sockets live under the exec root: a unix socket path
        # has at most 107 bytes, pytest's tmp paths are longer
        self.run_dir = tempfile.mkdtemp(prefix="vnhd-", dir="/tmp")
        self.config = self.root / "daemon.json"
        self.config.write_text("{}\n")
        self.sock = f"unix://{self.run_dir}/docker.sock"
        self.log = self.root / "dockerd.log"
        self.proc = None
        # /etc/docker (key.json and friends) is private to the sandbox
        sb.run(["mount", "--bind", str(self.etc), "/etc/docker"])

    def start(self, timeout=60):
        argv = [DOCKERD, "--data-root", str(self.root / "data"), "--exec-root", self.run_dir + "/exec",
                "--pidfile", str(self.root / "dockerd.pid"), "-H", self.sock,
                "--config-file", str(self.config), "--bip", DOCKER_BIP, "--iptables=true",
                "--ip6tables=false", "--userland-proxy=false"]
        log = open(self.log, "ab")
        # nsenter execs dockerd itself (no pid namespace): proc.pid is dockerd's
        self.proc = subprocess.Popen(self.sb.enter_argv(argv), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=log, env=self.sb._env(None))
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            cp = self.sb.run([DOCKER, "-H", self.sock, "info", "--format", "{{.ID}}"], check=False)
            if cp.returncode == 0 and self._rules_done():
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SandboxError(f"dockerd did not come up: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def _rules_done(self):
        cp = self.sb.run(["iptables", "-S", "FORWARD"], check=False)
        return "-j DOCKER-USER" in cp.stdout

    def stop(self, timeout=30):
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def close(self):
        self.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def restart(self):
        self.stop()
        self.start()


@pytest.fixture
def dockerd(sb, tmp_path):
    d = Dockerd(sb, tmp_path)
    yield d
    d.close()


def _assert_first_in_docker_user(sb):
    """others.py's placement: vnethook's one accept heads DOCKER-USER (on
    both backends: the iptables backend's own jump is below Docker's)."""
    rules = [ln for ln in sb.run(["iptables", "-S", "DOCKER-USER"]).stdout.splitlines() if ln.startswith("-A")]
    assert rules and "vnethook:forward" in rules[0], rules
    assert sum("vnethook" in r for r in rules) == 1, rules


def _forward_policy(sb):
    return sb.run(["iptables", "-S", "FORWARD"]).stdout.splitlines()[0]


@needs_docker
def test_docker_first_then_guest_restart_and_teardown(sb, vh, dockerd, tmp_path):
    vh.write_map(MAP)
    ext = sb.add_external()
    # As on a host where dockerd starts before any libvirt network: Docker
    # finds forwarding off, turns it on and sets FORWARD's policy to DROP.
    sb.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
    dockerd.start()
    assert _forward_policy(sb) == "-P FORWARD DROP", "Docker sets DROP when it enables forwarding"
    before = vh.foreign_rules()

    g = _guest(sb, "web1", 21)
    sb.start("web1")
    _assert_forwards(ext)
    _assert_truthful_ok(vh)
    _assert_closed(ext, g)
    _assert_first_in_docker_user(sb)

    # dockerd restart: it deletes and re-inserts its FORWARD jumps, never
    # touches DOCKER-USER's contents: the forward survives with no sync.
    rules = sorted(vh.our_rules())
    finish = _probe(sb, ext, tmp_path)
    time.sleep(0.5)
    t0 = time.monotonic()
    dockerd.restart()
    took = time.monotonic() - t0
    time.sleep(0.5)
    worst, tries = finish()
    print(f"\n[{sb.firewall_backend}] dockerd restart ({took:.1f}s): longest outage "
          f"{worst * 1000:.0f} ms over {len(tries)} probes, {sum(not ok for _, ok in tries)} failed")
    assert len(tries) > 10 and worst < 2.0, f"the dockerd restart cut the forward for {worst:.2f}s"
    _assert_forwards(ext)
    assert sorted(vh.our_rules()) == rules
    _assert_truthful_ok(vh)
    _assert_first_in_docker_user(sb)

    sb.destroy("web1")
    assert not _reach(ext, timeout=1).ok
    _assert_no_trace(sb, vh)
    # dockerd re-created its chains at the restart, in another order
    assert sorted(vh.foreign_rules()) == sorted(before)


@needs_docker
def test_guest_first_then_dockerd(sb, vh, dockerd, tmp_path):
    vh.write_map(MAP)
    ext = sb.add_external()
    g = _guest(sb, "web1", 22)
    sb.start("web1")
    _assert_forwards(ext)
    # libvirt already turned forwarding on, so Docker leaves FORWARD's
    # policy as it is; the admin then sets DROP as Docker's docs advise.
    finish = _probe(sb, ext, tmp_path)
    time.sleep(0.3)
    dockerd.start()
    sb.run(["iptables", "-P", "FORWARD", "DROP"])
    time.sleep(0.3)
    worst, tries = finish()
    reached = _reach(ext, timeout=1).ok
    if sb.firewall_backend == "iptables":
        print(f"\n[iptables] dockerd first start under a running guest: longest outage "
              f"{worst * 1000:.0f} ms over {len(tries)} probes")
    st = vh.status_json()
    if sb.firewall_backend == "nftables":
        # vnethook had no reason for a rule in iptables' FORWARD when the
        # guest started (no other manager there): the new DROP policy cuts
        # the forward, status says so, and a sync (or the sync timer) puts
        # the accept into DOCKER-USER.
        assert not reached
        assert st.get("path_problems") or st["problems"], st
        finish = _probe(sb, ext, tmp_path)  # the probe sees a cut (it is what measures outages)
        time.sleep(0.8)
        worst, tries = finish()
        assert tries and not any(ok for _, ok in tries) and worst > 0.5, (worst, tries)
        vh.run(vh.cli_argv("sync"))
    else:
        # vnethook's own accepting jump is in the same iptables FORWARD
        # chain, below Docker's jumps that RETURN for non-Docker traffic.
        assert reached, "the iptables backend's own FORWARD jump should carry it"
    _assert_forwards(ext)
    _assert_truthful_ok(vh)
    _assert_closed(ext, g)
    sb.destroy("web1")
    _assert_no_trace(sb, vh)


# ---- ufw ---------------------------------------------------------------------------


class Ufw:
    def __init__(self, sb: Sandbox, tmp_path):
        self.sb = sb
        root = tmp_path / "ufw"
        shutil.copytree("/etc/ufw", root / "etc-ufw", symlinks=True)
        shutil.copytree("/lib/ufw", root / "lib-ufw", symlinks=True)
        (root / "sysctl.conf").write_text("")  # ufw sets no sysctls here
        default = open("/etc/default/ufw").read()
        default = _set(default, "DEFAULT_FORWARD_POLICY", '"DROP"')
        default = _set(default, "IPT_SYSCTL", str(root / "sysctl.conf"))
        default = _set(default, "IPT_MODULES", '""')  # and loads no kernel module
        (root / "default-ufw").write_text(default)
        for src, dst in ((root / "etc-ufw", "/etc/ufw"), (root / "lib-ufw", "/lib/ufw"),
                         (root / "default-ufw", "/etc/default/ufw")):
            sb.run(["mount", "--bind", str(src), dst])

    def __call__(self, *args):
        return self.sb.run([UFW, *args]).stdout


def _set(text, key, value):
    lines = [ln for ln in text.splitlines() if not ln.startswith(key + "=")]
    return "\n".join(lines + [f"{key}={value}"]) + "\n"


@needs_ufw
def test_ufw_enable_reload_default_disable(sb, vh, tmp_path):
    vh.write_map(MAP)
    ext = sb.add_external()
    ufw = Ufw(sb, tmp_path)
    g = _guest(sb, "web1", 23)  # its lease before ufw's INPUT DROP
    sb.start("web1")
    _assert_forwards(ext)

    # ufw enabled under a running guest: no libvirt hook fires, so on the
    # nftables backend vnethook has no accept in iptables' FORWARD yet (it
    # had no reason for one): the forward is cut until a sync (or the sync
    # timer), and status says so meanwhile. The iptables backend's own
    # jump sits at the head of FORWARD, above the jumps ufw appends.
    finish = _probe(sb, ext, tmp_path)
    time.sleep(0.3)
    ufw("--force", "enable")
    time.sleep(0.3)
    worst, tries = finish()
    assert _forward_policy(sb) == "-P FORWARD DROP"
    if sb.firewall_backend == "iptables":
        print(f"\n[iptables] first ufw enable: longest outage {worst * 1000:.0f} ms over {len(tries)} probes")
        assert worst < 1.0
    else:
        assert not _reach(ext, timeout=1).ok
        st = vh.status_json()
        assert st.get("path_problems") or st["problems"], st
        vh.run(vh.cli_argv("sync"))

    steps = [("enable",), ("reload", ["reload"]),
             ("default deny routed", ["default", "deny", "routed"]),
             ("disable + enable", ["disable"], ["--force", "enable"])]
    for what, *cmds in steps:
        if cmds:
            finish = _probe(sb, ext, tmp_path)
            time.sleep(0.3)
            for args in cmds:
                ufw(*args)
            time.sleep(0.3)
            worst, tries = finish()
            print(f"\n[{sb.firewall_backend}] ufw {what}: longest outage {worst * 1000:.0f} ms "
                  f"over {len(tries)} probes")
            assert worst < 1.0, f"ufw {what} cut the forward for {worst:.2f}s"
        assert _forward_policy(sb) == "-P FORWARD DROP", what
        try:
            _assert_forwards(ext)
            _assert_truthful_ok(vh)
            _assert_closed(ext, g)
        except AssertionError as e:
            raise AssertionError(f"after ufw {what}: {e}\n" + sb.run(["iptables-save", "-t", "filter"]).stdout)
    sb.destroy("web1")
    _assert_no_trace(sb, vh)
