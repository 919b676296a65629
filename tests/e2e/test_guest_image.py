"""The real guest's image builder (guest_image.py), without downloading:
its cpio writer, its .modinfo reader and the module load order."""

from __future__ import annotations

import lzma
import struct
import subprocess

import pytest

import guest_image as gi


def _elf_with_modinfo(info: bytes) -> bytes:
    """A minimal little-endian ELF64 with sections: null, .modinfo, .shstrtab."""
    shstr = b"\0.modinfo\0.shstrtab\0"
    body_off = 64
    modinfo_off = body_off
    shstr_off = modinfo_off + len(info)
    shoff = shstr_off + len(shstr)
    shoff += -shoff % 8
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    hdr = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    data = bytearray(hdr)
    data += info + shstr
    data += b"\0" * (shoff - len(data))
    sec = lambda name, off, size: struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, off, size, 0, 0, 1, 0)
    data += sec(0, 0, 0) + sec(1, modinfo_off, len(info)) + sec(10, shstr_off, len(shstr))
    return bytes(data)


def test_modinfo_reads_depends():
    ko = _elf_with_modinfo(b"license=GPL\0depends=virtio,net_failover\0name=virtio_net\0")
    assert gi.modinfo(ko) == {"license": "GPL", "depends": "virtio,net_failover", "name": "virtio_net"}


def test_module_order_dependencies_first_builtin_skipped_xz_decompressed():
    def mod(deps):
        return _elf_with_modinfo(f"depends={deps}\0".encode())

    base = "lib/modules/6.x/kernel/drivers/"
    members = {
        base + "net/virtio_net.ko.xz": lzma.compress(mod("net_failover,virtio")),
        base + "net/net_failover.ko": mod("failover"),
        base + "core/failover.ko": mod(""),
        base + "virtio/virtio.ko": mod(""),
        base + "acpi/button.ko": mod(""),
        base + "input/evdev.ko": mod(""),
    }
    config = ("CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_NET=m\n"
              "CONFIG_ACPI_BUTTON=m\nCONFIG_INPUT_EVDEV=m\n")
    order = [n for n, _ in gi.kernel_modules(members, config)]
    assert order == ["failover", "net_failover", "virtio", "virtio_net", "button", "evdev"]
    assert dict(gi.kernel_modules(members, config))["virtio_net"].startswith(b"\x7fELF")
    with pytest.raises(RuntimeError, match="lacks CONFIG_ACPI_BUTTON"):
        gi.kernel_modules(members, "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_NET=m\nCONFIG_INPUT_EVDEV=m\n")
    del members[base + "core/failover.ko"]
    with pytest.raises(RuntimeError, match="module failover"):
        gi.kernel_modules(members, config)


def test_cpio_is_newc_the_kernel_and_busybox_read():
    c = gi.Cpio()
    c.dir("bin")
    c.file("bin/hello", b"odd length!", 0o755)
    c.symlink("bin/sh", "busybox")
    c.chardev("dev/console", 5, 1)
    cp = subprocess.run(["busybox", "cpio", "-tv"], input=c.finish(), capture_output=True, check=True)
    lines = cp.stdout.decode().splitlines()
    assert [l.split()[0] for l in lines] == ["drwxr-xr-x", "-rwxr-xr-x", "lrwxrwxrwx", "crw-------"]
    assert lines[1].endswith("bin/hello") and " 11 " in lines[1]
    assert lines[2].endswith("bin/sh -> busybox")


def test_cache_key_names_every_package_version_and_the_recipe():
    key = gi.cache_key({"linux-image-6.1.0-57-amd64": "6.1.192-3", "busybox-static": "1:1.35.0-4"})
    assert "linux-image-6.1.0-57-amd64_6.1.192-3" in key and "busybox-static_1_1.35.0-4" in key
    assert key.endswith(gi.recipe_digest()) and "/" not in key
