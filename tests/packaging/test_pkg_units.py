"""The systemd units pass `systemd-analyze verify` (no systemd needs to run).

They are verified in a scratch root holding the system's unit directory,
an executable /usr/bin/vnethook and, through MANPATH, this tree's man
pages, so ExecStart= and Documentation= are checked too without
installing anything.
"""

from __future__ import annotations

import configparser
import os
import shutil

import pytest

import debpkg
from debpkg import REPO, run

UNIT_SRC = os.path.join(REPO, "packaging", "systemd")
UNITS = ("vnethook-sync.service", "vnethook-sync.timer", "vnethook-sync-periodic.service",
         "vnethook-leases.path", "vnethook-leases.service",
         "vnethook-firewalld.service")


@pytest.fixture
def scratch_root(tmp_path):
    why = debpkg.missing_tools("systemd-analyze")
    if why:
        pytest.skip(why)
    root = tmp_path / "root"
    system = next(d for d in ("/usr/lib/systemd/system", "/lib/systemd/system") if os.path.isdir(d))
    shutil.copytree(system, root / system.lstrip("/"), symlinks=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / "usr/bin/vnethook").write_text("#!/bin/sh\n")
    (root / "usr/bin/vnethook").chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    for u in UNITS:
        shutil.copy(os.path.join(UNIT_SRC, u), root / "etc/systemd/system" / u)
    man = tmp_path / "man"
    for page, sec in (("vnethook.8", "8"), ("vnethook-ports.yaml.5", "5")):
        (man / f"man{sec}").mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(REPO, "packaging", "man", page), man / f"man{sec}" / page)
    return root, man


def _verify(root, man, units, check_man=True):
    return run(["systemd-analyze", "verify", f"--root={root}", f"--man={'yes' if check_man else 'no'}",
                *[f"/etc/systemd/system/{u}" for u in units]],
               check=False, env=debpkg.system_env(MANPATH=str(man)))


def test_units_verify(scratch_root):
    root, man = scratch_root
    check_man = shutil.which("man", path=debpkg.SYSTEM_PATH) is not None
    p = _verify(root, man, UNITS, check_man)
    # Foreign units may warn (libvirtd.service uses Type=notify-reload,
    # unknown to systemd 252); nothing may be about ours.
    ours = [l for l in (p.stdout + p.stderr).splitlines() if "vnethook" in l]
    assert p.returncode == 0 and not ours, p.stdout + p.stderr


def test_verify_catches_a_broken_unit(scratch_root):
    """The check above is only worth something if verify fails on errors."""
    root, man = scratch_root
    bad = root / "etc/systemd/system/vnethook-sync.service"
    bad.write_text(bad.read_text().replace("ExecStart=/usr/bin/vnethook", "ExecStart=/usr/bin/vnethook-missing"))
    p = _verify(root, man, ["vnethook-sync.service"], check_man=False)
    assert p.returncode != 0 and "vnethook-missing" in p.stderr


def _unit(name):
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(os.path.join(UNIT_SRC, name))
    return cp


def test_unit_wiring():
    """The relations the design depends on (see the comments in the units)."""
    path = _unit("vnethook-leases.path")
    assert path["Path"]["PathChanged"] == "/var/lib/libvirt/dnsmasq"
    assert path["Path"]["Unit"] == "vnethook-leases.service"
    assert int(path["Path"]["TriggerLimitBurst"]) > 0  # 0 would disable the guard
    # vnethook/watch.py trusts systemd only if a unit of this name exists
    from vnethook import watch

    assert watch.UNIT == "vnethook-leases.path"

    leases = _unit("vnethook-leases.service")
    assert leases["Service"]["ExecStart"].split()[:2] == ["/usr/bin/vnethook", "watch"]
    assert leases["Unit"]["PartOf"] == "vnethook-leases.path"
    assert "Install" not in leases  # static: only the path unit starts it

    sync = _unit("vnethook-sync.service")
    assert sync["Service"]["Type"] == "oneshot"
    # PartOf/ReloadPropagatedFrom only reach active units: it must stay active
    assert sync["Service"]["RemainAfterExit"] == "yes"
    assert "1" in sync["Service"]["SuccessExitStatus"].split()  # a failed unit is not active either
    assert "firewalld.service" in sync["Unit"]["PartOf"].split()
    assert "firewalld.service" in sync["Unit"]["ReloadPropagatedFrom"].split()
    for after in ("libvirtd.service", "virtnetworkd.service", "firewalld.service"):
        assert after in sync["Unit"]["After"].split()
    assert {"multi-user.target", "firewalld.service"} <= set(sync["Install"]["WantedBy"].split())

    # the periodic sync: its own plain oneshot, since a timer cannot start
    # the RemainAfterExit= vnethook-sync.service again
    timer = _unit("vnethook-sync.timer")
    assert timer["Timer"]["Unit"] == "vnethook-sync-periodic.service"
    assert timer["Install"]["WantedBy"] == "timers.target"
    every = timer["Timer"]["OnUnitActiveSec"]
    assert every.endswith("min") and 1 <= int(every[:-3]) <= 10, every
    periodic = _unit("vnethook-sync-periodic.service")
    assert periodic["Service"]["Type"] == "oneshot"
    assert "RemainAfterExit" not in periodic["Service"]
    assert periodic["Service"]["ExecStart"].split() == ["/usr/bin/vnethook", "sync"]
    assert "Install" not in periodic  # static: only the timer starts it

    # firewall-cmd --reload never reaches systemd: this one follows D-Bus,
    # and is restarted with firewalld (then re-applies once on start).
    fw = _unit("vnethook-firewalld.service")
    assert fw["Service"]["ExecStart"] == "/usr/bin/vnethook firewalld-listen"
    assert fw["Service"]["Type"] == "simple"
    assert fw["Unit"]["PartOf"] == "firewalld.service"
    assert "firewalld.service" in fw["Unit"]["After"].split()
    assert fw["Install"]["WantedBy"] == "firewalld.service"
