"""Stock Debian roots with their own libvirt, for the e2e host matrix.

The suite's own libvirt is whatever this machine has (11.3 from
bookworm-backports on Debian 12). Real hypervisors run their distro's:
Debian 12's 9.0 (iptables backend only, no network.conf) on most Debian 12
hosts, Debian 13's 11.3 with Python 3.13, nftables 1.1 and iptables 1.8.11
on Debian 13. Two libvirts cannot be installed side by side, so the sandbox
runs them from a second root: debootstrap builds a minimal system of that
release, then apt installs libvirt-daemon-system, QEMU, dnsmasq, iptables,
nftables and vnethook's Python dependencies, all from the Debian archive
this machine's apt already uses. The sandbox's holder chroots into it
(sandbox.py, `distro=`), so libvirtd, virsh, the hooks and their
/usr/bin/python3, iptables and nft all run as on a stock host of that
release.

A root is built once and cached by recipe in /var/tmp (root's alone); a
new recipe builds a new root, and the old one is removed. Building one
takes about a minute and 600 MB.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import List, Optional

CACHE = "/var/tmp/vnethook-e2e-roots"
# distro -> Debian suite
SUITES = {"debian12": "bookworm", "debian13": "trixie"}
# First step, debootstrap (minbase): what the second step's maintainer
# scripts need, and the test tools.
FIRST = ("python3", "python3-lxml", "python3-yaml", "iproute2", "busybox", "kmod", "procps")
# Second step, apt in the chroot with /proc and /sys mounted (debootstrap
# cannot configure systemd, which libvirt's packages pull in on 13).
# libvirt-daemon-system brings the stock /etc/libvirt/*.conf and the
# libvirt-qemu user that QEMU runs as.
SECOND = ("libvirt-daemon-system", "libvirt-daemon", "libvirt-daemon-driver-qemu",
          "libvirt-clients", "qemu-system-x86", "dnsmasq-base", "iptables", "nftables",
          "python3-iptables", "python3-nftables", "python3-systemd", "python3-jeepney")
# Per release: Debian 12's libvirt-daemon-system would take systemd-sysv
# (not configurable in a chroot); 13 splits the network driver out.
EXTRA = {"debian12": ("libvirt-daemon-system-sysv",),
         "debian13": ("libvirt-daemon-driver-network",)}
RECIPE_VERSION = 2
TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


class RootUnavailable(Exception):
    """No such root can be had here; the message says why."""


def recipe(distro: str) -> str:
    return f"{RECIPE_VERSION} {SUITES[distro]} {' '.join(FIRST)} | {' '.join(SECOND + EXTRA[distro])}"


def key(distro: str) -> str:
    return f"{distro}-" + hashlib.sha256(recipe(distro).encode()).hexdigest()[:16]


def cached(distro: str) -> Optional[str]:
    d = os.path.join(CACHE, key(distro))
    return os.path.join(d, "root") if os.path.exists(os.path.join(d, "complete")) else None


def mirror(suite: str) -> str:
    """The archive this machine's apt already uses: the source that serves
    `suite`, else the one that serves this machine's own Debian suite (the
    same archive carries every release)."""
    cands = [suite]
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VERSION_CODENAME="):
                    cands.append(line.split("=", 1)[1].strip().strip('"'))
    except OSError:
        pass
    for s in cands:
        cp = subprocess.run([os.path.join(TOOLS, "apt-mirror"), s], capture_output=True,
                            text=True)
        if cp.returncode == 0 and cp.stdout.strip():
            return cp.stdout.strip()
    raise RootUnavailable("no apt source of this machine serves Debian's main archive")


def ensure(distro: str) -> str:
    """The path of a complete root of `distro`, building it if needed."""
    if distro not in SUITES:
        raise ValueError(f"no recipe for {distro!r}: one of {', '.join(SUITES)}")
    done = cached(distro)
    if done:
        return done
    if shutil.which("debootstrap") is None:
        raise RootUnavailable("debootstrap is not installed (tests/deps.sh installs it)")
    os.makedirs(CACHE, mode=0o700, exist_ok=True)
    st = os.lstat(CACHE)
    if st.st_uid != 0 or st.st_mode & 0o022 or not os.path.isdir(CACHE) or os.path.islink(CACHE):
        raise RootUnavailable(f"{CACHE} is not a directory that only root can write")
    suite = SUITES[distro]
    work = tempfile.mkdtemp(prefix="build-", dir=CACHE)
    try:
        root = os.path.join(work, "root")
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(FIRST)}", suite, root,
              mirror(suite)], "debootstrap")
        policy = os.path.join(root, "usr/sbin/policy-rc.d")
        with open(policy, "w", encoding="ascii") as f:
            f.write("#!/bin/sh\n# vnethook e2e: no service starts in this root\nexit 101\n")
        os.chmod(policy, 0o755)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
               "LC_ALL": "C"}
        # Maintainer scripts want /proc and /sys: a private mount namespace
        # holds them, so nothing stays mounted on the host. The script is a
        # constant; the root and the packages are its arguments.
        _run(["unshare", "--mount", "--fork", "--propagation", "private", "sh", "-c",
              'r=$1; shift; mount -t proc proc "$r/proc" && mount -t sysfs sysfs "$r/sys" && '
              'exec chroot "$r" apt-get install -y -q --no-install-recommends "$@"',
              "sh", root, *SECOND, *EXTRA[distro]], "apt-get install", env=env)
        _run(["chroot", root, "apt-get", "clean"], "apt-get clean", env=env)
        final = os.path.join(CACHE, key(distro))
        open(os.path.join(work, "complete"), "w").close()
        shutil.rmtree(final, ignore_errors=True)
        os.rename(work, final)
        work = ""
        for old in os.listdir(CACHE):  # this distro's roots of older recipes
            if old.startswith(f"{distro}-") and old != key(distro):
                shutil.rmtree(os.path.join(CACHE, old), ignore_errors=True)
        return os.path.join(final, "root")
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)


def _run(argv: List[str], what: str, env=None) -> None:
    cp = subprocess.run(argv, capture_output=True, text=True, env=env)
    if cp.returncode != 0:
        lines = [ln for ln in (cp.stderr + cp.stdout).splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith(("E:", "W: Failure"))] or lines[-5:]
        raise RootUnavailable(f"{what} failed (rc={cp.returncode}): " + " | ".join(errs[:5]))
