"""A Debian 12 root with the stock libvirt 9.0, for the e2e matrix.

Most Debian 12 hypervisors run the libvirt that Debian 12 ships (9.0:
iptables backend only, no network.conf), while the rest of the suite runs
11.3 from bookworm-backports. Both cannot be installed side by side, so the
sandbox runs 9.0 from a second root: debootstrap builds a minimal bookworm
with libvirt-daemon-system, QEMU, dnsmasq, iptables and vnethook's Python
dependencies, all from the Debian archive this machine already uses. The
sandbox's holder chroots into it (sandbox.py, `libvirt="9.0"`), so libvirtd,
virsh, the hooks (and their /usr/bin/python3), iptables and the test tools
all run as they would on a stock Debian 12 host.

The root is built once and cached by recipe in /var/tmp (root's alone);
a new recipe builds a new root next to the old one, which is then removed.
Building takes about a minute and 600 MB.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import List, Optional

CACHE = "/var/tmp/vnethook-e2e-libvirt9"
SUITE = "bookworm"
# What debootstrap installs (Depends only, as apt --no-install-recommends).
INCLUDE = ("libvirt-daemon,libvirt-daemon-driver-qemu,libvirt-clients,qemu-system-x86,"
           "dnsmasq-base,iptables,nftables,python3,python3-lxml,python3-yaml,python3-iptables,"
           "python3-nftables,python3-systemd,python3-jeepney,iproute2,busybox,kmod,procps")
# Installed in a second step with apt: its systemd alternative cannot be
# configured by debootstrap in a chroot; the sysv one brings the stock
# /etc/libvirt/*.conf and the libvirt-qemu user that QEMU runs as.
SECOND = ("libvirt-daemon-system", "libvirt-daemon-system-sysv")
RECIPE = f"1 {SUITE} {INCLUDE} {' '.join(SECOND)}"
TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


class RootUnavailable(Exception):
    """No libvirt 9.0 root can be had here; the message says why."""


def key() -> str:
    return hashlib.sha256(RECIPE.encode()).hexdigest()[:16]


def cached() -> Optional[str]:
    root = os.path.join(CACHE, key(), "root")
    return root if os.path.exists(os.path.join(CACHE, key(), "complete")) else None


def mirror() -> str:
    """The archive this machine's apt already uses: the source that serves
    bookworm, else the one that serves this machine's own Debian suite (the
    same archive carries both)."""
    cands = [SUITE]
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VERSION_CODENAME="):
                    cands.append(line.split("=", 1)[1].strip().strip('"'))
    except OSError:
        pass
    for suite in cands:
        cp = subprocess.run([os.path.join(TOOLS, "apt-mirror"), suite], capture_output=True,
                            text=True)
        if cp.returncode == 0 and cp.stdout.strip():
            return cp.stdout.strip()
    raise RootUnavailable("no apt source of this machine serves Debian's main archive")


def ensure() -> str:
    """The path of a complete root, building it if needed."""
    done = cached()
    if done:
        return done
    if shutil.which("debootstrap") is None:
        raise RootUnavailable("debootstrap is not installed (tests/deps.sh installs it)")
    os.makedirs(CACHE, mode=0o700, exist_ok=True)
    st = os.lstat(CACHE)
    if st.st_uid != 0 or st.st_mode & 0o022 or not os.path.isdir(CACHE) or os.path.islink(CACHE):
        raise RootUnavailable(f"{CACHE} is not a directory that only root can write")
    work = tempfile.mkdtemp(prefix="build-", dir=CACHE)
    try:
        root = os.path.join(work, "root")
        _run(["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, root, mirror()],
             "debootstrap")
        policy = os.path.join(root, "usr/sbin/policy-rc.d")
        with open(policy, "w", encoding="ascii") as f:
            f.write("#!/bin/sh\n# vnethook e2e: no service starts in this root\nexit 101\n")
        os.chmod(policy, 0o755)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
               "LC_ALL": "C"}
        # apt's maintainer scripts want /proc: a private mount namespace
        # holds it, so nothing stays mounted on the host.
        _run(["unshare", "--mount", "--fork", "--propagation", "private", "sh", "-c",
              'r=$1; shift; mount -t proc proc "$r/proc" && exec chroot "$r" apt-get install -y -q '
              '--no-install-recommends "$@"', "sh", root, *SECOND], "apt-get install", env=env)
        _run(["chroot", root, "apt-get", "clean"], "apt-get clean", env=env)
        final = os.path.join(CACHE, key())
        open(os.path.join(work, "complete"), "w").close()
        shutil.rmtree(final, ignore_errors=True)
        os.rename(work, final)
        work = ""
        for old in os.listdir(CACHE):  # roots of older recipes
            if old != key() and not old.startswith("build-"):
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
