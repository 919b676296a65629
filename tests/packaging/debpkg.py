"""Building, installing and purging the vnethook .deb for tests.

The package goes into the real / (that is what is being tested), but every
dpkg/apt run happens in a private network namespace and a private mount
namespace with a fresh tmpfs on /run. So the maintainer scripts' `vnethook
sync` and `vnethook flush` meet an empty firewall that vanishes afterwards
(the root namespace's firewall is never touched), the host's
/run/vnethook is neither used nor deleted, and no libvirt daemon of the
host gets a SIGHUP (its pid file is not visible). A private PID namespace
keeps prerm's search for a lease watcher from finding the host's.

Also meant for other suites (e2e against the installed package): import
`build_deb` and `installed`, or use the conftest fixtures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "vnethook"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Run argv with a private netns, mount namespace and /run. The script is a
# constant; argv is passed as its positional parameters, never spliced in.
_PRIVATE = ["unshare", "--net", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc", "--",
            "/bin/sh", "-c", 'mount -t tmpfs -o mode=0755 vnethook-test-run /run && exec "$@"', "sh"]


def system_env(**extra) -> dict:
    """The environment of an admin's root shell: no pyenv, no venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=SYSTEM_PATH, LC_ALL="C.UTF-8", DEBIAN_FRONTEND="noninteractive")
    env.update(extra)
    return env


def run(argv, check=True, private=False, timeout=600, **kw) -> subprocess.CompletedProcess:
    argv = (_PRIVATE + list(argv)) if private else list(argv)
    kw.setdefault("env", system_env())
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def missing_tools(*tools) -> str | None:
    gone = [t for t in tools if shutil.which(t, path=SYSTEM_PATH) is None]
    return f"not installed: {', '.join(gone)} (tests/deps.sh installs them)" if gone else None


def build_deb(outdir: str) -> str:
    """packaging/build-deb OUTDIR; returns the .deb's path."""
    p = run([os.path.join(REPO, "packaging", "build-deb"), outdir])
    path = p.stdout.strip().splitlines()[-1]
    assert path.endswith("_all.deb") and os.path.isfile(path), p.stdout + p.stderr
    return path


def build_rpm(outdir: str) -> str:
    p = run([os.path.join(REPO, "packaging", "build-rpm"), outdir])
    path = p.stdout.strip().splitlines()[-1]
    assert path.endswith(".noarch.rpm") and os.path.isfile(path), p.stdout + p.stderr
    return path


def is_installed(package: str = PACKAGE) -> bool:
    p = run(["dpkg-query", "-W", "-f=${Status}", package], check=False)
    return p.returncode == 0 and "installed" in p.stdout.split()[-1:]


def apt(*args, check=True) -> subprocess.CompletedProcess:
    return run(["apt-get", "-y", "-q", "--no-install-recommends",
                "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold", *args],
               check=check, private=True)


def install(deb: str) -> subprocess.CompletedProcess:
    # apt resolves the dependencies from what is installed; the private
    # netns has no network, so a missing one fails instead of downloading.
    return apt("install", os.path.abspath(deb))


def purge() -> subprocess.CompletedProcess:
    return apt("purge", PACKAGE)


@contextlib.contextmanager
def installed(deb: str):
    """Install the .deb for the duration; purge it whatever happens."""
    if is_installed():
        raise RuntimeError("vnethook is already installed on this host; not touching it")
    try:
        yield install(deb)
    finally:
        if is_installed() or run(["dpkg-query", "-W", PACKAGE], check=False).returncode == 0:
            purge()
