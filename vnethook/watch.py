"""Picking up late and changing DHCP leases without holding libvirt up.

A freshly booted guest asks for its lease seconds after the `started` hook
returned, and libvirt's leases helper then rewrites `<bridge>.status`.
No hook fires for that. Two mechanisms notice it:

- systemd: `vnethook-leases.path` watches /var/lib/libvirt/dnsmasq and
  starts `vnethook-sync.service` (packaging/systemd).
- anything else: the hook spawns this watcher, fully detached (new session,
  stdio on /dev/null, so libvirt does not wait for it). One per host,
  guarded by a lock. It sleeps on inotify (polling only where that is not
  available), re-plans when a lease file changed, and exits when no
  configured guest is running or after a time bound.

No lost wakeup: a hook that relies on the watcher first writes a fresh
token to `watch.want`, then looks at the lock. A watcher that has decided
to exit first releases the lock, then reads the token again: if a hook
wrote one since the watcher last looked, it takes the lock back and stays.
Either the hook saw the lock free (and spawned a new watcher), or it wrote
its token before the release (and the exiting watcher sees it).
"""

from __future__ import annotations

import os
import sys
import time

from vnethook.lock import acquire

UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
UNIT = "vnethook-leases.path"


def systemd_handles_leases() -> bool:
    """Booted with systemd and the path unit enabled (not merely installed:
    an admin who disabled it must not silently lose late leases)."""
    if not os.path.isdir("/run/systemd/system"):
        return False  # not booted with systemd
    return any(os.path.exists(os.path.join(d, "paths.target.wants", UNIT)) for d in UNIT_DIRS)


def _lock_path(paths) -> str:
    return os.path.join(paths.state_dir, "watch.lock")


def _want_path(paths) -> str:
    return os.path.join(paths.state_dir, "watch.want")


def want_watcher(paths) -> None:
    """Leave a token that no exiting watcher can miss (see the module doc)."""
    os.makedirs(paths.state_dir, mode=0o700, exist_ok=True)
    fd = os.open(_want_path(paths), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, f"{os.getpid()} {time.monotonic_ns()}\n".encode())
    finally:
        os.close(fd)


def _read_want(paths) -> bytes:
    try:
        with open(_want_path(paths), "rb") as f:
            return f.read(100)
    except OSError:
        return b""


def _take_lock(paths):
    """The watcher's lock, with our pid in it (so `vnethook flush` can stop us)."""
    fd = _try_lock(paths)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def release_or_stay(paths, fd: int, want_seen: bytes):
    """Release the lock on exit; return a re-taken lock fd if a hook asked
    for a watcher meanwhile (its token differs from `want_seen`), else None."""
    os.close(fd)
    if _read_want(paths) == want_seen:
        return None
    return _take_lock(paths)  # None: a new watcher already has it


def _try_lock(paths):
    os.makedirs(paths.state_dir, mode=0o700, exist_ok=True)
    fd = os.open(_lock_path(paths), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if acquire(fd, 0):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def watcher_running(paths) -> bool:
    fd = _try_lock(paths)
    if fd is None:
        return True
    os.close(fd)
    return False


def ensure_watcher(paths, mode: str = "auto") -> bool:
    """Start the detached watcher unless one runs or systemd does the job."""
    if mode in ("off", "systemd"):
        return False
    if mode == "auto" and systemd_handles_leases():
        return False
    want_watcher(paths)
    if watcher_running(paths):
        return False
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", "vnethook", "watch"],
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0),
                (os.POSIX_SPAWN_DUP2, devnull, 1),
                (os.POSIX_SPAWN_DUP2, devnull, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(devnull)
    return True


def _stamps(paths) -> dict:
    out: dict = {}
    try:
        names = os.listdir(paths.dnsmasq_dir)
    except OSError:
        return out
    for n in names:
        if n.endswith(".status"):
            try:
                st = os.stat(os.path.join(paths.dnsmasq_dir, n))
            except OSError:
                continue
            out[n] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return out


def _any_running(paths) -> bool:
    try:
        return any(n.endswith(".xml") for n in os.listdir(paths.running_domains_dir))
    except OSError:
        return False


def _configured_running(paths, config) -> bool:
    try:
        names = os.listdir(paths.running_domains_dir)
    except OSError:
        return False
    from vnethook import state
    from vnethook.keys import guest_key

    # A guest whose ports are in its own metadata has a record once its start applied them.
    return any(n.endswith(".xml") and (n[:-4] in config.guests or state.exists(paths, guest_key(n[:-4])))
               for n in names)


# How often the watcher looks whether someone wiped our rules (an
# `nft flush ruleset`, a `systemctl restart nftables` with no systemd unit
# of ours to follow it): one listing of the firewall.
REPAIR_EVERY = 2.0


def _repair_if_wiped(engine, log) -> None:
    try:
        why = engine.needs_repair()
        if why:
            log.warning(f"lease watcher: {why}: re-applying (vnethook sync)")
            for err in engine.sync(verify=True).errors:
                log.error(f"lease watcher: {err}")
    except Exception as e:  # keep watching; the next round retries
        log.error(f"lease watcher: checking the firewall: {type(e).__name__}: {e}")


def run(paths, interval: float = 0.25, idle_exit: float = 30.0, max_seconds: float = 86400.0,
        firewalld_listen: bool | None = None, repair_every: float = REPAIR_EVERY) -> int:
    """The watcher loop. Returns when idle, at the time bound, or if another runs.

    `interval` is the polling period where inotify cannot watch the lease
    directory (it does not exist yet, or inotify is unavailable)."""
    fd = _take_lock(paths)
    if fd is None:
        return 0
    from vnethook import log
    from vnethook.config import ConfigError, load_config_cached
    from vnethook.engine import Engine
    from vnethook.inotify import DirWatch

    start = time.monotonic()
    last = None
    idle_since = None
    want_seen = _read_want(paths)
    next_check = start + repair_every
    map_error = None  # said once, not at every round while the map stays broken
    dirs = DirWatch([paths.dnsmasq_dir])
    # firewalld flushes every iptables table on reload and restart; while
    # guests run, this watcher also follows firewalld on the system bus
    # (what vnethook-firewalld.service does on systemd hosts).
    # With systemd, vnethook-firewalld.service does it (one listener, not two).
    listener = None
    if firewalld_listen is None:
        firewalld_listen = not os.path.isdir("/run/systemd/system")
    if firewalld_listen:
        from vnethook.firewalld import start_thread

        listener = start_thread(paths)
    try:
        while True:
            if time.monotonic() - start >= max_seconds:
                fd = release_or_stay(paths, fd, want_seen)
                if fd is None:
                    break
                start, want_seen = time.monotonic(), _read_want(paths)
            dirs.rearm()
            want = _read_want(paths)
            if want != want_seen:
                want_seen, idle_since = want, None
            stamps = _stamps(paths)
            try:
                config = load_config_cached(paths)
            except ConfigError as e:
                if str(e) != map_error:
                    log.error(f"lease watcher: port map is invalid, nothing changed:\n{e}")
                    map_error = str(e)
                config = None
            else:
                map_error = None
            # The round's clock moves whatever the map's state: a broken map
            # must not leave the wait below at zero (a busy loop).
            repair_due = time.monotonic() >= next_check
            if repair_due:
                next_check = time.monotonic() + repair_every
            if config is None:
                # Which guests the map names is unknown: stay while any guest
                # runs (it may wait for the fixed map), look again each round.
                running = _any_running(paths)
            else:
                if stamps != last:
                    last = stamps
                    try:
                        report = Engine(paths, config).sync(verify=False)
                        for err in report.errors:
                            log.error(f"lease watcher: {err}")
                    except Exception as e:  # keep watching; the next change retries
                        log.error(f"lease watcher: {type(e).__name__}: {e}")
                        last = None
                if repair_due:
                    _repair_if_wiped(Engine(paths, config), log)
                running = _configured_running(paths, config)
            if running:
                idle_since = None
            else:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > idle_exit:
                    fd = release_or_stay(paths, fd, want_seen)
                    if fd is None:
                        break
                    want_seen, idle_since = _read_want(paths), None
                    continue
            wait = next_check - time.monotonic()
            if config is not None and (not dirs.complete or last is None):
                wait = min(wait, interval)
            dirs.wait(wait)
    finally:
        dirs.close()
        if listener is not None:
            listener.set()
        if fd is not None:
            os.close(fd)
    return 0


def stop_watcher(paths) -> bool:
    """Stop the hook-started watcher (package removal, `vnethook flush`)."""
    if not watcher_running(paths):
        return False
    try:
        with open(_lock_path(paths)) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return False
    if b"vnethook" not in b" ".join(argv) or b"watch" not in argv:
        return False  # a stale pid now used by something else
    import signal

    os.kill(pid, signal.SIGTERM)
    return True
