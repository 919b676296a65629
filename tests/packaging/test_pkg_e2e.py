"""The end-to-end suite against the installed .deb: what users actually get.

The package is installed with apt into the real / (debpkg.installed purges
it afterwards, whatever happens), then tests/e2e/test_lifecycle.py runs in a
child pytest with VNETHOOK_E2E_INSTALLED=1: every hook libvirt runs is the
package's /etc/libvirt/hooks/*.d/vnethook, every CLI call is
/usr/bin/vnethook, and nothing from this checkout is on their path.
"""

from __future__ import annotations

import os
import subprocess

import pytest

import debpkg

REPO = debpkg.REPO


def test_e2e_suite_against_installed_package(vnethook_deb):
    if not os.path.exists("/usr/sbin/libvirtd"):
        pytest.skip("libvirtd not installed (tests/deps.sh installs it)")
    with debpkg.installed(vnethook_deb):
        env = debpkg.system_env(VNETHOOK_E2E_INSTALLED="1", PYTHONDONTWRITEBYTECODE="1")
        where = subprocess.run(["/usr/bin/python3", "-c", "import vnethook; print(vnethook.__file__)"],
                               capture_output=True, text=True, env=env, cwd="/", check=True).stdout
        assert where.startswith("/usr/lib/python3/dist-packages/vnethook/"), where
        for kind in ("qemu", "network"):
            hook = f"/etc/libvirt/hooks/{kind}.d/vnethook"
            assert os.access(hook, os.X_OK), hook
        cp = subprocess.run(
            ["/usr/bin/python3", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
             os.path.join(REPO, "tests", "e2e", "test_lifecycle.py")],
            capture_output=True, text=True, env=env, cwd=REPO, timeout=1800,
        )
        print(cp.stdout[-3000:])
        assert cp.returncode == 0, cp.stdout[-6000:] + cp.stderr[-2000:]
        assert " passed" in cp.stdout and "skipped" not in cp.stdout.splitlines()[-1], cp.stdout[-2000:]
