"""Like sshd's StrictModes: a map others could write is refused, naming the file.

These run as root (the project's test environment), so chown to 65534 works;
modes are set explicitly so the umask does not matter.
"""

from __future__ import annotations

import os

import pytest

from vnethook.config import ConfigError, load_config
from vnethook.paths import Paths

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown test files")

MAP = "guests:\n  web1: [8080:80]\n"


def make_dir(tmp_path, dmode=0o755, pdmode=0o755, fmode=0o644):
    d = tmp_path / "etc"
    (d / "ports.d").mkdir(parents=True)
    (d / "ports.yaml").write_text(MAP)
    (d / "ports.d" / "10-db.yaml").write_text("guests:\n  db1: [6379:6379]\n")
    os.chmod(d, dmode)
    os.chmod(d / "ports.d", pdmode)
    os.chmod(d / "ports.yaml", fmode)
    os.chmod(d / "ports.d" / "10-db.yaml", 0o644)
    return d


def problems(config, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(Paths(config=str(config), libvirt_root="/", state_dir=str(tmp_path / "state")))
    return [str(p) for p in e.value.problems]


def test_sane_modes_are_accepted(tmp_path):
    d = make_dir(tmp_path, dmode=0o700, fmode=0o600)
    cfg = load_config(Paths(config=str(d), libvirt_root="/", state_dir=str(tmp_path / "s")))
    assert set(cfg.guests) == {"web1", "db1"}


def test_group_writable_file_is_refused(tmp_path):
    f = tmp_path / "ports.yaml"
    f.write_text(MAP)
    os.chmod(f, 0o664)
    assert problems(f, tmp_path) == [f"{f}: refusing: writable by group (chmod go-w {f})"]


def test_other_writable_file_in_dir_is_refused_others_still_checked(tmp_path):
    d = make_dir(tmp_path, fmode=0o646)
    (d / "ports.d" / "20-bad.yaml").write_text("guests:\n  web2: [0:80]\n")
    os.chmod(d / "ports.d" / "20-bad.yaml", 0o644)
    assert problems(d, tmp_path) == [
        f"{d}/ports.yaml: refusing: writable by others (chmod go-w {d}/ports.yaml)",
        f"{d}/ports.d/20-bad.yaml:2:10: host port 0 out of range (expected 1-65535)",
    ]


def test_other_writable_config_dir_is_refused(tmp_path):
    d = make_dir(tmp_path, dmode=0o757)
    assert problems(d, tmp_path) == [f"{d}: refusing: writable by others (chmod go-w {d})"]


def test_group_and_other_writable_dropin_dir_is_refused(tmp_path):
    d = make_dir(tmp_path, pdmode=0o777)
    assert problems(d, tmp_path) == [
        f"{d}/ports.d: refusing: writable by group and others (chmod go-w {d}/ports.d)"
    ]


def test_file_owned_by_another_user_is_refused(tmp_path):
    d = make_dir(tmp_path)
    f = d / "ports.d" / "10-db.yaml"
    os.chown(f, 65534, 65534)
    assert problems(d, tmp_path) == [f"{f}: refusing: owned by uid 65534, not by root (chown root {f})"]


def test_dir_owned_by_another_user_and_writable_reports_both(tmp_path):
    d = make_dir(tmp_path, dmode=0o775)
    os.chown(d, 65534, 65534)
    assert problems(d, tmp_path) == [
        f"{d}: refusing: owned by uid 65534, not by root (chown root {d})",
        f"{d}: refusing: writable by group (chmod go-w {d})",
    ]


def test_special_file_is_refused(tmp_path):
    d = make_dir(tmp_path)
    os.mkfifo(d / "ports.d" / "30-fifo.yaml", 0o644)
    assert problems(d, tmp_path) == [f"{d}/ports.d/30-fifo.yaml: not a regular file (expected a YAML file)"]


def test_symlink_to_a_good_file_is_followed(tmp_path):
    d = make_dir(tmp_path)
    target = tmp_path / "real.yaml"
    target.write_text("guests:\n  web9: [9999:99]\n")
    os.chmod(target, 0o644)
    os.symlink(target, d / "ports.d" / "40-link.yaml")
    cfg = load_config(Paths(config=str(d), libvirt_root="/", state_dir=str(tmp_path / "s")))
    assert "web9" in cfg.guests
