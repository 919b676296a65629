"""Packaging tests: the .deb and .rpm build, install and go away cleanly.

Every test here is marked `packaging`. They need root and the build tools
(tests/deps.sh installs them) and are skipped, with the reason, otherwise.

`vnethook_deb` builds the .deb once per session (or takes VNETHOOK_DEB, a
prebuilt one). Other suites can run against the installed package with
`debpkg.installed(path)` (see debpkg.py).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import debpkg  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "packaging: builds/installs the distro packages (root; slow)")


def pytest_collection_modifyitems(config, items):
    why = "packaging tests need root" if os.geteuid() != 0 else None
    for item in items:
        if str(item.fspath).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.packaging)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def vnethook_deb(tmp_path_factory):
    """Path of the vnethook .deb: $VNETHOOK_DEB, or built once from this tree."""
    given = os.environ.get("VNETHOOK_DEB")
    if given:
        assert os.path.isfile(given), f"VNETHOOK_DEB={given} does not exist"
        return os.path.abspath(given)
    why = debpkg.missing_tools("dpkg-buildpackage", "dh", "dh_python3")
    if why:
        pytest.skip(why)
    return debpkg.build_deb(str(tmp_path_factory.mktemp("deb")))


@pytest.fixture(scope="session")
def vnethook_rpm(tmp_path_factory):
    why = debpkg.missing_tools("rpmbuild", "rpm")
    if why:
        pytest.skip(why)
    return debpkg.build_rpm(str(tmp_path_factory.mktemp("rpm")))
