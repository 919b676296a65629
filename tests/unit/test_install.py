"""`vnethook install` / `uninstall` into a temporary root."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vnethook import install

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hooks(root):
    return os.path.join(root, "etc/libvirt/hooks")


def test_dir_mode_installs_runnable_hooks_and_uninstall_removes_them(tmp_path, capsys):
    root = str(tmp_path)
    assert install.install(root=root, mode="dir", reload=False) == 0
    for kind in ("qemu", "network"):
        path = os.path.join(_hooks(root), f"{kind}.d", "vnethook")
        assert os.access(path, os.X_OK)
        text = open(path).read()
        assert text.startswith(f"#!{sys.executable}") and install.MARKER in text
        # the hook runs as libvirt runs it: reduced env, cwd /, prepare is a no-op
        cp = subprocess.run([path, "dom", "prepare", "begin", "-"], input=b"<domain/>", capture_output=True,
                            env={"LC_ALL": "C", "PATH": "/usr/bin:/bin",
                                 "VNETHOOK_CONFIG": str(tmp_path / "none.yaml"),
                                 "VNETHOOK_STATE_DIR": str(tmp_path / "state")}, cwd="/")
        assert cp.returncode == 0 and cp.stdout == b"", cp
    assert install.uninstall(root=root, reload=False) == 0
    for kind in ("qemu", "network"):
        assert not os.path.exists(os.path.join(_hooks(root), f"{kind}.d", "vnethook"))


def test_main_mode_refuses_foreign_hook_without_force_and_restores_it(tmp_path, capsys):
    root = str(tmp_path)
    os.makedirs(_hooks(root))
    foreign = os.path.join(_hooks(root), "qemu")
    with open(foreign, "w") as f:
        f.write("#!/bin/sh\n# someone else's hook\nexit 0\n")
    os.chmod(foreign, 0o755)
    assert install.install(root=root, mode="main", reload=False) == 1
    assert "someone else's hook" in open(foreign).read()
    assert "--force" in capsys.readouterr().err
    assert install.install(root=root, mode="main", force=True, reload=False) == 0
    assert install.MARKER in open(foreign).read()
    assert "someone else's hook" in open(foreign + install.BACKUP_SUFFIX).read()
    # reinstalling over our own hook needs no --force and keeps the backup
    assert install.install(root=root, mode="main", reload=False) == 0
    assert "someone else's hook" in open(foreign + install.BACKUP_SUFFIX).read()
    assert install.uninstall(root=root, reload=False) == 0
    assert "someone else's hook" in open(foreign).read()
    assert not os.path.exists(foreign + install.BACKUP_SUFFIX)
    assert not os.path.exists(os.path.join(_hooks(root), "network"))


def test_install_sighups_a_running_libvirtd(tmp_path):
    """A process whose comm is `libvirtd` and whose pid is in root/run/libvirtd.pid."""
    fake = tmp_path / "libvirtd"
    shutil.copy("/bin/sleep", fake)
    proc = subprocess.Popen([str(fake), "30"])
    try:
        os.makedirs(tmp_path / "run")
        (tmp_path / "run" / "libvirtd.pid").write_text(f"{proc.pid}\n")
        time.sleep(0.1)
        assert install.install(root=str(tmp_path), mode="dir", reload=True) == 0
        assert proc.wait(timeout=5) == -signal.SIGHUP
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stale_pid_file_is_not_signalled(tmp_path):
    proc = subprocess.Popen(["/bin/sleep", "30"])  # comm is "sleep", not libvirtd
    try:
        os.makedirs(tmp_path / "run")
        (tmp_path / "run" / "libvirtd.pid").write_text(f"{proc.pid}\n")
        assert install.install(root=str(tmp_path), mode="dir", reload=True) == 0
        time.sleep(0.2)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
