"""Oversized inputs: refused quickly with a located message, never parsed."""

from __future__ import annotations

import os
import time

from vnethook import libvirt
from vnethook.config import ConfigError, load_config
from vnethook.paths import Paths


def test_ten_megabyte_map_is_refused_without_parsing(tmp_path):
    f = tmp_path / "ports.yaml"
    with open(f, "w") as fh:
        fh.write("guests:\n  web: [8080:80]\n")
        fh.write(("# padding " + "x" * 1013 + "\n") * 10240)
    os.chmod(f, 0o644)
    size = os.path.getsize(f)
    assert size > 10 * 1024 * 1024
    t = time.monotonic()
    try:
        load_config(Paths(config=str(f), libvirt_root="/", state_dir=str(tmp_path / "s")))
    except ConfigError as e:
        assert [str(p) for p in e.problems] == [f"{f}: refusing: file is larger than 1 MiB ({size} bytes)"]
    else:
        raise AssertionError("a 10 MB map was accepted")
    assert time.monotonic() - t < 2


def test_oversized_lease_and_status_files_are_errors(tmp_path):
    big = tmp_path / "vnhbr0.status"
    with open(big, "wb") as fh:
        fh.write(b"[" + b" " * (libvirt.MAX_INPUT + 10) + b"]")
    try:
        libvirt.read_leases(str(big))
    except libvirt.LibvirtDataError as e:
        assert str(e) == f"{big}: over the {libvirt.MAX_INPUT} byte limit"
    else:
        raise AssertionError("accepted")
    qemu = tmp_path / "run/libvirt/qemu"
    qemu.mkdir(parents=True)
    os.rename(big, qemu / "web.xml")
    errors = []
    assert libvirt.running_domains(str(qemu), errors) == []
    assert errors == [f"{qemu}/web.xml: over the {libvirt.MAX_INPUT} byte limit"]
