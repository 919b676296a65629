"""The maintainer scripts' process matching, run for real in a private PID
namespace: prerm must stop the hook-started lease watcher (it would put
forwards back after the flush) and nothing else."""

from __future__ import annotations

import os
import re
import sys

import pytest

import debpkg
from debpkg import REPO, run

PRERM = os.path.join(REPO, "packaging", "debian", "prerm")

# Runs as PID 1 of a fresh PID namespace (with its own /proc): starts look-alikes,
# runs prerm's stop_watcher, reports which survived. Constant code; paths via argv.
DRIVER = r"""
import subprocess, sys, time
funcs = sys.argv[1]
procs = {
    "watcher (hook)": [sys.executable, "-c", "import time; time.sleep(60)", "-m", "vnethook", "watch"],
    "watcher (unit)": [sys.executable, "-c", "import time; time.sleep(60)", "/usr/bin/vnethook", "watch", "--idle-exit", "30"],
    "status": [sys.executable, "-c", "import time; time.sleep(60)", "-m", "vnethook", "status"],
    "watchdog": [sys.executable, "-c", "import time; time.sleep(60)", "-m", "vnethook", "watchdog"],
    "other": [sys.executable, "-c", "import time; time.sleep(60)", "watch"],
}
running = {k: subprocess.Popen(v) for k, v in procs.items()}
time.sleep(0.3)
subprocess.run(["/bin/sh", "-c", '. "$1" && stop_watcher', "sh", funcs], check=True)
time.sleep(0.5)
for k, p in running.items():
    print(k, "alive" if p.poll() is None else "stopped")
    p.kill()
"""


def test_prerm_stops_only_the_watcher(tmp_path):
    why = debpkg.missing_tools("unshare")
    if why:
        pytest.skip(why)
    with open(PRERM) as f:
        func = re.search(r"^stop_watcher\(\) \{.*?^\}$", f.read(), re.S | re.M).group(0)
    funcs = tmp_path / "funcs.sh"
    funcs.write_text(func + "\n")
    p = run(["unshare", "--pid", "--fork", "--mount-proc", "--", sys.executable, "-c", DRIVER, str(funcs)])
    state = dict(line.rsplit(" ", 1) for line in p.stdout.splitlines())
    assert state == {
        "watcher (hook)": "stopped",
        "watcher (unit)": "stopped",
        "status": "alive",
        "watchdog": "alive",
        "other": "alive",
    }, p.stdout + p.stderr


def test_rpm_scriptlet_matches_the_deb():
    """The spec repeats the deb's process match; keep the two identical."""
    with open(PRERM) as f:
        deb = re.search(r'case "\$cmd" in\n\s*(.*?)\)', f.read()).group(1)
    with open(os.path.join(REPO, "packaging", "rpm", "vnethook.spec")) as f:
        rpm = re.search(r'case "\$cmd" in\n\s*(.*?)\)', f.read()).group(1)
    assert deb == rpm
