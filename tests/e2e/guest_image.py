"""A real Linux guest for e2e tests, built from Debian packages at test time.

The sandbox's usual guests sit in their firmware and a netns plays their
network side. This one boots: Debian's own kernel (linux-image-amd64's
vmlinuz, taken out of the .deb with dpkg-deb, so the host's /boot is never
touched) and a busybox initramfs whose /init loads virtio-net from the same
kernel package, takes its own DHCP lease with udhcpc on eth0 and serves TCP
and UDP with replies naming the guest. Its lease therefore arrives after
libvirt's `started` hook, as on every real boot.

Every file in the image comes from a Debian package fetched with
`apt-get download` (never installed):

- the kernel package linux-image-amd64 points at: vmlinuz, and the .ko
  files of virtio_pci, virtio_net, button (ACPI power button) and evdev
  plus their dependencies (from each module's own .modinfo `depends=`),
  decompressed here when the package ships .ko.xz/.ko.gz;
- busybox-static: /bin/busybox (sh, insmod, udhcpc, nc for TCP, acpid);
- netcat-traditional + libc6: busybox's nc has no UDP, so the UDP server is
  nc.traditional with the two libc files it needs.

The result (vmlinuz + initrd.img) is cached in CACHE_DIR under a key made
of those packages' versions and a digest of this recipe, so a run downloads
and builds only when a package or the recipe changed.

`virsh shutdown` is real: the guest runs busybox acpid, which turns the ACPI
power button (QEMU's system_powerdown, what libvirt sends) into `poweroff
-f`, and QEMU exits as for any guest that shut itself down.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

CACHE_DIR = "/var/tmp/vnethook-e2e-guest"
KERNEL_META = "linux-image-amd64"
# Another kernel image package instead of the one KERNEL_META depends on
# (e.g. linux-image-6.12.95+bpo-amd64, to try a kernel with .ko.xz modules).
KERNEL_OVERRIDE = os.environ.get("VNETHOOK_E2E_GUEST_KERNEL")
# kernel config option -> the module that provides it when it is =m
WANTED_MODULES = {
    "CONFIG_VIRTIO_PCI": "virtio_pci",
    "CONFIG_VIRTIO_NET": "virtio_net",
    "CONFIG_ACPI_BUTTON": "button",
    "CONFIG_INPUT_EVDEV": "evdev",
}
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}

INIT = r"""#!/bin/sh
# vnethook e2e guest: the whole userland of a real (if tiny) Linux guest.
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in /modules/*.ko; do
    insmod "$m" || echo "vnh-guest: insmod $m failed"
done
name=guest tcp=80 udp=53
for w in $(cat /proc/cmdline); do
    case "$w" in
    vnh.name=*) name=${w#vnh.name=} ;;
    vnh.tcp=*) tcp=${w#vnh.tcp=} ;;
    vnh.udp=*) udp=${w#vnh.udp=} ;;
    esac
done
hostname "$name"
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
ip link set eth0 up
# ACPI power button (virsh shutdown) -> /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /dev/null
nc -ll -p "$tcp" -e /bin/vnh-reply-tcp &
( while true; do nc.traditional -u -l -p "$udp" -e /bin/vnh-reply-udp; done ) &
echo "vnh-guest: $name up, asking for a lease"
udhcpc -i eth0 -s /etc/udhcpc.script -x "hostname:$name" -t 60 -T 1 -A 1 -b
while true; do sleep 3600; done
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip -4 addr add "$ip/$mask" dev "$interface"
    for r in $router; do
        ip -4 route replace default via "$r" dev "$interface"
        break
    done
    echo "vnh-guest: lease $ip"
    ;;
esac
exit 0
"""

# One read (a TCP segment or a UDP datagram), then a reply naming the guest.
REPLY = r"""#!/bin/sh
x=$(dd bs=65536 count=1 2>/dev/null)
echo "$(hostname) {proto}"
"""

POWER = r"""#!/bin/sh
echo "vnh-guest: power button, powering off" > /dev/console
poweroff -f
"""

FILES = {
    "init": INIT,
    "etc/udhcpc.script": UDHCPC_SCRIPT,
    "bin/vnh-reply-tcp": REPLY.replace("{proto}", "tcp"),
    "bin/vnh-reply-udp": REPLY.replace("{proto}", "udp"),
    "etc/acpi/PWRF/00000080": POWER,
}


class GuestUnavailable(Exception):
    """The packages for the guest cannot be obtained (e.g. no network)."""


@dataclass(frozen=True)
class GuestImage:
    kernel: str
    initrd: str
    key: str
    built: bool  # False: taken from the cache
    seconds: float  # time spent obtaining it (download + build, or cache check)


# ---- apt ------------------------------------------------------------------

def _apt(argv: List[str], cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=ENV)


def _candidates(pkgs: List[str]) -> Dict[str, Tuple[str, str]]:
    """pkg -> (candidate version, its Depends line), in one apt-cache call."""
    cp = _apt(["apt-cache", "show", "--no-all-versions", *pkgs])
    found: Dict[str, Tuple[str, str]] = {}
    for stanza in cp.stdout.split("\n\n"):
        fields: Dict[str, str] = {}
        for line in stanza.splitlines():
            if ":" in line and not line.startswith(" "):
                k, _, v = line.partition(":")
                fields.setdefault(k.strip(), v.strip())
        if fields.get("Package") in pkgs:
            found.setdefault(fields["Package"], (fields.get("Version", ""), fields.get("Depends", "")))
    missing = [p for p in pkgs if p not in found]
    if missing:
        raise GuestUnavailable(f"apt knows no package {', '.join(missing)} here: {cp.stderr.strip()}")
    return found


def resolve_packages() -> Dict[str, str]:
    """package name -> candidate version, for everything the image uses.
    Empty or stale package lists (apt knows none of them) get one apt-get
    update first."""
    others = ["busybox-static", "netcat-traditional", "libc6"]
    try:
        found = _candidates([KERNEL_META] + others)
    except GuestUnavailable:
        _apt(["apt-get", "update", "-q"])
        found = _candidates([KERNEL_META] + others)
    if KERNEL_OVERRIDE:
        kpkg = KERNEL_OVERRIDE
    else:
        depends = found[KERNEL_META][1]
        m = re.match(r"\s*(linux-image-[^\s,(|]+)", depends)
        if not m:
            raise GuestUnavailable(f"{KERNEL_META} depends on no kernel image: {depends!r}")
        kpkg = m.group(1)
    pkgs = {kpkg: _candidates([kpkg])[kpkg][0]}
    pkgs.update({p: found[p][0] for p in others})
    return pkgs


def _one_file(deb: str, basename: str) -> bytes:
    """The contents of the file called `basename` in a bin or lib dir of
    the package (bookworm: /bin, /lib/...; merged-/usr releases: /usr/...),
    following symlinks inside the package."""
    dirs = ("bin/", "usr/bin/", "lib/x86_64-linux-gnu/", "usr/lib/x86_64-linux-gnu/")
    members = _members(deb, lambda p: p.startswith(dirs) and p.count("/") <= 3)
    for d in dirs:
        path = d + basename
        for _ in range(8):
            data = members.get(path)
            if data is None or not data.startswith(b"->"):
                break
            target = data[2:].decode()
            path = os.path.normpath(target.lstrip("/") if target.startswith("/")
                                    else os.path.join(os.path.dirname(path), target))
        if data is not None and not data.startswith(b"->"):
            return data
    raise RuntimeError(f"{os.path.basename(deb)} has no file {basename} in {dirs}")


def _download(pkgs: Dict[str, str], into: str) -> Dict[str, str]:
    """apt-get download each pkg=version into `into`; returns name -> .deb path.
    A stale package list (a newer version on the mirror) gets one apt-get
    update; no network at all is GuestUnavailable."""
    argv = ["apt-get", "download", "-q"] + [f"{p}={v}" for p, v in pkgs.items()]
    cp = _apt(argv, cwd=into)
    if cp.returncode != 0:
        _apt(["apt-get", "update", "-q"])
        cp = _apt(argv, cwd=into)
    if cp.returncode != 0:
        errors = [l for l in (cp.stderr + cp.stdout).splitlines() if l.startswith("E:")]
        raise GuestUnavailable("apt-get download " + " ".join(pkgs) + " failed: "
                               + (errors[0] if errors else (cp.stderr.strip() or cp.stdout.strip())[-300:]))
    debs = {}
    for f in os.listdir(into):
        if f.endswith(".deb"):
            debs[f.split("_", 1)[0]] = os.path.join(into, f)
    missing = set(pkgs) - set(debs)
    if missing:
        raise GuestUnavailable(f"apt-get download gave no .deb for {sorted(missing)}")
    return debs


def _members(deb: str, want) -> Dict[str, bytes]:
    """Stream the data tarball of a .deb; keep the regular files (and the
    symlinks' targets as text) whose path want(path) accepts."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE, env=ENV)
    out: Dict[str, bytes] = {}
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for ti in tar:
            path = ti.name.lstrip("./")
            if not want(path):
                continue
            if ti.isfile():
                f = tar.extractfile(ti)
                out[path] = f.read() if f else b""
            elif ti.issym():
                out[path] = ("->" + ti.linkname).encode()
    proc.stdout.close()
    if proc.wait() != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} failed")
    return out


# ---- kernel modules ---------------------------------------------------------

def _decompress(path: str, data: bytes) -> bytes:
    if path.endswith(".ko"):
        return data
    if path.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.endswith(".ko.gz"):
        return gzip.decompress(data)
    raise RuntimeError(f"cannot decompress {path} (only .ko, .ko.xz, .ko.gz)")


def modinfo(ko: bytes) -> Dict[str, str]:
    """The key=value strings of an ELF64 module's .modinfo section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2 or ko[5] != 1:
        raise RuntimeError("not a little-endian ELF64 module")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i):
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = ko.index(b"\0", stroff + name)
        if ko[stroff + name:end] == b".modinfo":
            info = {}
            for item in ko[off:off + size].split(b"\0"):
                if b"=" in item:
                    k, _, v = item.decode("utf-8", "replace").partition("=")
                    info.setdefault(k, v)
            return info
    return {}


def kernel_modules(members: Dict[str, bytes], config: str) -> List[Tuple[str, bytes]]:
    """(name, .ko bytes) of WANTED_MODULES that the kernel has as modules,
    with their dependencies, in load order (dependencies first)."""
    by_name: Dict[str, Tuple[str, bytes]] = {}
    for path, data in members.items():
        m = re.search(r"/([^/]+)\.ko(\.xz|\.gz|\.zst)?$", path)
        if m and "/kernel/" in path:
            by_name[m.group(1).replace("-", "_")] = (path, data)
    roots = []
    for opt, mod in WANTED_MODULES.items():
        val = re.search(rf"^{opt}=(\S+)", config, re.M)
        if val is None:
            raise RuntimeError(f"the guest kernel lacks {opt} ({mod})")
        if val.group(1) == "m":
            roots.append(mod)
    order: List[Tuple[str, bytes]] = []
    done = set()

    def visit(name: str, chain: Tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise RuntimeError(f"module dependency loop: {chain + (name,)}")
        if name not in by_name:
            raise RuntimeError(f"module {name} (needed by {chain}) is not in the kernel package")
        path, raw = by_name[name]
        ko = _decompress(path, raw)
        for dep in filter(None, modinfo(ko).get("depends", "").split(",")):
            visit(dep.replace("-", "_"), chain + (name,))
        done.add(name)
        order.append((name, ko))

    for r in roots:
        visit(r, ())
    return order


# ---- initramfs --------------------------------------------------------------

class Cpio:
    """A newc ("070701") archive, as the kernel unpacks an initramfs."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: Tuple[int, int] = (0, 0)) -> None:
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + nameb)
        self.buf.write(b"\0" * (-(110 + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def recipe_digest() -> str:
    h = hashlib.sha256()
    for k in sorted(FILES):
        h.update(k.encode() + b"\0" + FILES[k].encode() + b"\0")
    h.update(repr(sorted(WANTED_MODULES.items())).encode())
    h.update(b"layout-1")
    return h.hexdigest()[:12]


def cache_key(pkgs: Dict[str, str]) -> str:
    parts = [f"{p}_{v}" for p, v in sorted(pkgs.items())] + [recipe_digest()]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "__".join(parts))


def build(pkgs: Dict[str, str], dest: str) -> None:
    """Download the packages and write dest/vmlinuz and dest/initrd.img."""
    with tempfile.TemporaryDirectory(prefix="build-", dir=CACHE_DIR) as work:
        os.chmod(work, 0o755)
        try:  # apt-get download drops privileges to _apt for the fetch
            shutil.chown(work, user="_apt")
        except (LookupError, OSError):
            pass
        debs = _download(pkgs, work)
        kpkg = next(p for p in pkgs if p.startswith("linux-image-"))
        kmem = _members(debs[kpkg], lambda p: p.startswith(("boot/vmlinuz-", "boot/config-"))
                        or (p.startswith(("lib/modules/", "usr/lib/modules/")) and re.search(r"\.ko(\.\w+)?$", p) is not None))
        vmlinuz = [p for p in kmem if p.startswith("boot/vmlinuz-")]
        config = [p for p in kmem if p.startswith("boot/config-")]
        if len(vmlinuz) != 1 or len(config) != 1:
            raise RuntimeError(f"{kpkg}: expected one vmlinuz and one config, got {vmlinuz} {config}")
        modules = kernel_modules(kmem, kmem[config[0]].decode())
        bb = _one_file(debs["busybox-static"], "busybox")
        nc = _one_file(debs["netcat-traditional"], "nc.traditional")
        libc = {n: _one_file(debs["libc6"], n) for n in ("libc.so.6", "ld-linux-x86-64.so.2")}

        c = Cpio()
        for d in ("bin", "dev", "proc", "sys", "etc", "etc/acpi", "etc/acpi/PWRF", "lib",
                  "lib/x86_64-linux-gnu", "lib64", "modules", "tmp", "run", "var", "var/run"):
            c.dir(d)
        c.chardev("dev/console", 5, 1)
        c.chardev("dev/null", 1, 3)
        c.file("bin/busybox", bb)
        c.symlink("bin/sh", "busybox")
        c.file("bin/nc.traditional", nc)
        for n, data in sorted(libc.items()):
            c.file(f"lib/x86_64-linux-gnu/{n}", data)
        c.symlink("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        for i, (name, ko) in enumerate(modules):
            c.file(f"modules/{i:02d}-{name}.ko", ko, 0o644)
        for path, text in sorted(FILES.items()):
            c.file(path, text.encode())
        initrd = gzip.compress(c.finish(), 6)

        tmp = tempfile.mkdtemp(prefix="new-", dir=CACHE_DIR)
        with open(os.path.join(tmp, "vmlinuz"), "wb") as f:
            f.write(kmem[vmlinuz[0]])
        with open(os.path.join(tmp, "initrd.img"), "wb") as f:
            f.write(initrd)
        with open(os.path.join(tmp, "modules.txt"), "w", encoding="ascii") as f:
            f.write("".join(f"{n}\n" for n, _ in modules))
        for n in os.listdir(tmp):
            os.chmod(os.path.join(tmp, n), 0o644)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, dest)  # atomic: a half-built image is never used
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(dest):
                raise


def _check_private(path: str) -> None:
    """/var/tmp is world-writable: boot nothing from a cache dir that
    someone other than root could have made or can write."""
    import stat

    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise RuntimeError(f"{path} must be a directory owned by root and writable only by "
                           f"it (uid {st.st_uid}, mode {stat.filemode(st.st_mode)}); remove it")


def ensure() -> GuestImage:
    """The cached image for the current candidate packages, built if needed.
    Raises GuestUnavailable when the packages cannot be had."""
    import time

    t0 = time.monotonic()
    os.makedirs(CACHE_DIR, mode=0o755, exist_ok=True)
    _check_private(CACHE_DIR)
    pkgs = resolve_packages()
    key = cache_key(pkgs)
    dest = os.path.join(CACHE_DIR, key)
    built = False
    if not os.path.isfile(os.path.join(dest, "initrd.img")):
        build(pkgs, dest)
        built = True
        # older images (other package versions) are not needed any more
        for n in os.listdir(CACHE_DIR):
            p = os.path.join(CACHE_DIR, n)
            if n != key and os.path.isdir(p) and not n.startswith(("build-", "new-")):
                shutil.rmtree(p, ignore_errors=True)
    return GuestImage(os.path.join(dest, "vmlinuz"), os.path.join(dest, "initrd.img"), key,
                      built, time.monotonic() - t0)


if __name__ == "__main__":
    img = ensure()
    print(f"{img.key}\n  kernel {img.kernel}\n  initrd {img.initrd}\n"
          f"  {'built' if img.built else 'cached'} in {img.seconds:.1f}s")
