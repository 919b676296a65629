"""`pip install .` works, and gives a working `vnethook` (issue: layout and install).

Two ways users take: a plain venv of whatever python3 is first on PATH
(systemd-python then builds from source: needs libsystemd-dev, pkg-config
and a compiler, which tests/deps.sh installs), and a venv of the distro's
/usr/bin/python3 with --system-site-packages, which reuses Debian's
python3-* packages (and is the only way to get the nftables binding).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import debpkg

REPO = debpkg.REPO


def _pip_install(python, venv, *venv_args):
    subprocess.run([python, "-m", "venv", *venv_args, venv], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cp = subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", REPO], capture_output=True,
                        text=True, env=env, timeout=900)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-3000:]
    cp = subprocess.run([os.path.join(venv, "bin", "vnethook"), "check", os.path.join(REPO, "config", "ports.yaml")],
                        capture_output=True, text=True, env=env, cwd="/")
    assert cp.returncode == 0 and cp.stdout.startswith("OK:"), cp
    cp = subprocess.run([os.path.join(venv, "bin", "python"), "-c", "import vnethook, lxml, yaml, iptc, systemd.journal"],
                        capture_output=True, text=True, env=env, cwd="/")
    assert cp.returncode == 0, cp.stderr


def test_pip_install_in_a_plain_venv(tmp_path):
    python = shutil.which("python3")
    if python is None or debpkg.missing_tools("pkg-config"):
        pytest.skip("needs python3 on PATH and pkg-config (tests/deps.sh)")
    _pip_install(python, str(tmp_path / "venv"))


def test_pip_install_with_distro_packages(tmp_path):
    _pip_install("/usr/bin/python3", str(tmp_path / "venv"), "--system-site-packages")
    cp = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", "import nftables"], capture_output=True)
    assert cp.returncode == 0, "the distro's nftables binding is visible in a system-site venv"
