"""The .deb: what it declares, what lintian says, and a full install ->
use -> reinstall -> remove -> purge cycle on this machine (see debpkg.py
for how the host's firewall and /run stay out of it)."""

from __future__ import annotations

import glob
import os
import re
import subprocess

import pytest
import yaml

import debpkg
from debpkg import REPO, run

HOOKS = {
    "/etc/libvirt/hooks/qemu.d/vnethook": "/usr/libexec/vnethook/hooks/qemu",
    "/etc/libvirt/hooks/network.d/vnethook": "/usr/libexec/vnethook/hooks/network",
}
UNITS = ("vnethook-sync.service", "vnethook-sync.timer", "vnethook-sync-periodic.service",
         "vnethook-leases.path", "vnethook-leases.service",
         "vnethook-firewalld.service")
UNIT_DIRS = ("/lib/systemd/system", "/usr/lib/systemd/system")
FILES = (
    "/usr/bin/vnethook",
    "/usr/lib/python3/dist-packages/vnethook/cli.py",
    "/usr/libexec/vnethook/hooks/qemu",
    "/usr/libexec/vnethook/hooks/network",
    "/etc/vnethook/ports.yaml",
    "/usr/share/man/man8/vnethook.8.gz",
    "/usr/share/man/man5/vnethook-ports.yaml.5.gz",
    "/usr/share/bash-completion/completions/vnethook",
)
GONE_AFTER_PURGE = FILES + tuple(HOOKS) + (
    "/etc/vnethook",
    "/usr/libexec/vnethook",
    "/usr/lib/python3/dist-packages/vnethook",
    "/etc/systemd/system/multi-user.target.wants/vnethook-sync.service",
    "/etc/systemd/system/paths.target.wants/vnethook-leases.path",
    "/etc/systemd/system/timers.target.wants/vnethook-sync.timer",
    "/var/lib/vnethook",
    "/etc/systemd/system/firewalld.service.wants/vnethook-firewalld.service",
)


def _version() -> str:
    with open(os.path.join(REPO, "vnethook", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _field(deb, name) -> str:
    return run(["dpkg-deb", "-f", deb, name]).stdout.strip()


def _unit_path(unit):
    for d in UNIT_DIRS:
        if os.path.exists(os.path.join(d, unit)):
            return os.path.join(d, unit)
    return None


def test_control_fields(vnethook_deb):
    assert _field(vnethook_deb, "Package") == "vnethook"
    assert _field(vnethook_deb, "Architecture") == "all"
    assert _field(vnethook_deb, "Version") == _version()
    depends = [d.strip() for d in _field(vnethook_deb, "Depends").split(",")]
    for dep in ("python3-lxml", "python3-yaml", "python3-iptables", "python3-nftables",
                "python3-systemd", "python3-jeepney", "iptables | nftables"):
        assert dep in depends, depends
    assert any(d.split()[0] in ("python3", "python3:any") for d in depends), depends  # ${python3:Depends}
    assert "libvirt-daemon-system" in _field(vnethook_deb, "Recommends")


def test_contents(vnethook_deb):
    listing = run(["dpkg-deb", "-c", vnethook_deb]).stdout.splitlines()
    paths = {}
    for line in listing:
        mode, _, _, _, _, rest = line.split(None, 5)
        name = rest.split(" -> ")[0]
        paths["/" + name.lstrip("./").rstrip("/")] = (mode, rest)
    for f in FILES:
        assert f in paths, f"{f} not in the package"
    for link, target in HOOKS.items():
        mode, rest = paths[link]
        # A symlink, not a file: conffiles stay after `remove`, and a hook
        # left behind without its code would fail every guest start.
        assert mode.startswith("l") and rest.endswith(" -> " + target), rest
        assert paths[target][0] == "-rwxr-xr-x"
    assert "/etc/vnethook/ports.d" in paths
    for unit in UNITS:
        assert any(os.path.join(d, unit) in paths for d in UNIT_DIRS), unit
    conffiles = subprocess.run(["dpkg-deb", "-I", vnethook_deb, "conffiles"], capture_output=True, text=True,
                               check=True).stdout.split()
    assert conffiles == ["/etc/vnethook/ports.yaml"]


def test_lintian_has_no_errors(vnethook_deb):
    missing = debpkg.missing_tools("lintian")
    if missing:
        pytest.skip(missing)
    p = run(["lintian", "--pedantic", "--fail-on", "none", vnethook_deb])
    lines = [l for l in (p.stdout + p.stderr).splitlines() if "running with root privileges" not in l]
    errors = [l for l in lines if l.startswith("E:")]
    assert not errors, "\n".join(lines)
    # Warnings are tolerated but should stay visible in the log.
    print("\n".join(lines) or "lintian: clean")


def test_install_use_remove_purge(vnethook_deb, tmp_path):
    if debpkg.is_installed():
        pytest.skip("vnethook is installed on this host already; not replacing it")
    env = debpkg.system_env(VNETHOOK_STATE_DIR=str(tmp_path / "state"))
    try:
        p = debpkg.install(vnethook_deb)
        assert debpkg.is_installed(), p.stdout + p.stderr
        # postinst ran the sync (in the private netns) and it succeeded
        assert "sync: 0 updated, 0 removed" in p.stdout, p.stdout + p.stderr

        for f in FILES:
            assert os.path.exists(f), f
        for link, target in HOOKS.items():
            assert os.path.realpath(link) == target and os.access(link, os.X_OK)
        assert os.path.isdir("/etc/vnethook/ports.d") and not os.listdir("/etc/vnethook/ports.d")
        for unit in UNITS:
            assert _unit_path(unit), unit

        # the installed command, with the system Python only
        v = run(["vnethook", "--version"], env=env, cwd="/")
        assert v.stdout.strip() == f"vnethook {_version()}"
        assert run(["dpkg", "-S", "/usr/bin/vnethook"]).stdout.startswith("vnethook:")

        # the conffile is the commented example: no forwards, and valid
        with open("/etc/vnethook/ports.yaml") as f, open(os.path.join(REPO, "config", "ports.yaml")) as g:
            text = f.read()
            assert text == g.read()
        assert not (yaml.safe_load(text) or {}).get("guests")
        assert "guests:" in text and text.count("\n#") > 5
        c = run(["vnethook", "check"], env=env, cwd="/")
        assert c.returncode == 0

        # the hooks run as libvirt runs them: empty environment, cwd /, XML on stdin
        hook_env = {"LC_ALL": "C", "VNETHOOK_STATE_DIR": env["VNETHOOK_STATE_DIR"]}
        xml = "<domain type='qemu'><name>pkgtest</name></domain>"
        for args in (["pkgtest", "prepare", "begin", "-"], ["pkgtest", "migrate", "begin", "-"]):
            h = subprocess.run(["/etc/libvirt/hooks/qemu.d/vnethook", *args], input=xml, env=hook_env,
                               cwd="/", capture_output=True, text=True, timeout=60)
            assert h.returncode == 0, h.stderr
            assert h.stdout == ""  # migrate/restore: stdout would replace the domain XML
        h = subprocess.run(["/etc/libvirt/hooks/network.d/vnethook", "default", "port-deleted", "begin", "-"],
                           input="<hookData/>", env=hook_env, cwd="/", capture_output=True, text=True, timeout=60)
        assert h.returncode == 0, h.stderr

        # the installed units verify against the installed command and man pages
        if not debpkg.missing_tools("systemd-analyze"):
            units = [_unit_path(u) for u in UNITS]
            s = run(["systemd-analyze", "verify", *units], check=False)
            ours = [l for l in s.stderr.splitlines() if "vnethook" in l]
            assert s.returncode == 0 and not ours, s.stderr

        if not debpkg.missing_tools("man"):
            assert run(["man", "-w", "8", "vnethook"]).stdout.strip() == "/usr/share/man/man8/vnethook.8.gz"
            assert run(["man", "-w", "5", "vnethook-ports.yaml"]).stdout.strip().endswith("vnethook-ports.yaml.5.gz")

        # reinstall = upgrade path: no flush (running guests keep their
        # forwards), and a broken map must not fail the installation
        with open("/etc/vnethook/ports.yaml", "a") as f:
            f.write("guests: [this is: not valid\n")
        r = debpkg.apt("install", "--reinstall", os.path.abspath(vnethook_deb))
        assert "flushed" not in r.stdout, r.stdout
        assert debpkg.is_installed()
        bad = run(["vnethook", "check"], env=env, cwd="/", check=False)
        assert bad.returncode == 1 and "ports.yaml:" in bad.stdout + bad.stderr

        # remove: code and hooks go at once (prerm flushed), the edited map stays
        r = debpkg.apt("remove", "vnethook")
        assert "flushed vnethook's rules" in r.stdout, r.stdout + r.stderr
        for link in HOOKS:
            assert not os.path.lexists(link), link
        assert not os.path.exists("/usr/bin/vnethook")
        assert not os.path.exists("/usr/lib/python3/dist-packages/vnethook")
        assert os.path.exists("/etc/vnethook/ports.yaml")
    finally:
        if run(["dpkg-query", "-W", "vnethook"], check=False).returncode == 0:
            debpkg.purge()

    assert run(["dpkg-query", "-W", "-f=${Status}", "vnethook"], check=False).stdout in ("", "unknown ok not-installed")
    left = [p for p in GONE_AFTER_PURGE if os.path.lexists(p)]
    left += glob.glob("/etc/systemd/system/*.wants/vnethook*")
    assert not left, f"left behind after purge: {left}"
