"""Run a snippet in a new /usr/bin/python3, optionally in a private
network namespace: for what only a fresh process (which modules an import
pulls in) or a real kernel (netlink answers, rules) can show.

The snippet finds the repository and tests/unit (forward_factory) on
sys.path. `netns`: under `unshare --net`, a namespace that lives and dies
with the process, so nothing is left behind. `site`: False runs `-S`, as
the hooks do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap

UNIT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(UNIT))
RULESETS = os.path.join(REPO, "tests", "acceptance", "rulesets")


def why_no_netns(*tools: str) -> "str | None":
    """Why the kernel tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root (a private network namespace)"
    for tool in ("unshare", *tools):
        if not shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin"):
            return f"needs {tool}"
    return None


def run(code: str, netns: bool = False, site: bool = True) -> str:
    """The snippet's stdout; its stderr in the failure if it exits non-zero."""
    prelude = f"import sys\nsys.path[:0] = [{REPO!r}, {UNIT!r}]\n"
    argv = ["/usr/bin/python3", *([] if site else ["-S"]), "-c", prelude + textwrap.dedent(code)]
    if netns:
        argv = ["unshare", "--net", *argv]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def in_netns(code: str):
    """The JSON the snippet prints last, run in a private network namespace."""
    return json.loads(run(code, netns=True).strip().splitlines()[-1])
