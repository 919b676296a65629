"""firewalld: put vnethook's forwards back after a reload or restart, and
say plainly when firewalld's StrictForwardPorts makes them impossible.

firewalld 1.x flushes every iptables table on start, `--reload` and
`--complete-reload` (its nftables backend too), and tells nobody through
systemd: a reload is a D-Bus call. libvirt listens on the system bus for
firewalld's `Reloaded` signal and for a new owner of its bus name, and then
rebuilds its own rules; nothing calls vnethook's hooks. The listener here
does what libvirt does, on the same two signals: it waits until libvirt has
put its chains back (our accept must land *ahead* of libvirt's jumps, and
libvirt inserts a jump at the top when it is missing), then runs the
engine's sync (base + every running guest's forwards, under the lock) and
checks the result once more, since libvirt may still be adding rules.

D-Bus comes from jeepney (pure Python; Debian and Fedora package it as
python3-jeepney). It is imported only here, never on the hook's path.
"""

from __future__ import annotations

import os
import time

FW_NAME = "org.fedoraproject.FirewallD1"
FW_PATH = "/org/fedoraproject/FirewallD1"
FW_CONFIG_PATH = "/org/fedoraproject/FirewallD1/config"
FW_CONFIG_IFACE = "org.fedoraproject.FirewallD1.config"
DEFAULT_CONF = "/etc/firewalld/firewalld.conf"
SYSTEM_BUS = "/run/dbus/system_bus_socket"

# libvirt's iptables chains (filter and nat) and the jumps to them.
LIBVIRT_JUMPS: "dict[str, dict[str, tuple]]" = {
    "filter": {"FORWARD": ("LIBVIRT_FWX", "LIBVIRT_FWI", "LIBVIRT_FWO"),
               "INPUT": ("LIBVIRT_INP",), "OUTPUT": ("LIBVIRT_OUT",)},
    "nat": {"POSTROUTING": ("LIBVIRT_PRT",)},
}
# Network modes libvirt writes per-bridge rules for (open and bridge get none).
RULED_MODES = (None, "nat", "route")


class NoDBus(Exception):
    """No D-Bus binding (python3-jeepney) or no system bus."""


def conf_path() -> str:
    return os.environ.get("VNETHOOK_FIREWALLD_CONF") or DEFAULT_CONF


def _yes(value: str) -> bool:
    return value.strip().strip("\"'").lower() in ("yes", "true", "1", "on")


def strict_in_conf(path: str | None = None) -> bool | None:
    """StrictForwardPorts from firewalld.conf: True/False, None if not set
    (or no file). The last assignment wins, as in firewalld's own parser."""
    path = path or conf_path()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    found = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, v = line.split("=", 1)
        if k.strip() == "StrictForwardPorts":
            found = _yes(v)
    return found


def _jeepney():
    try:
        import jeepney  # noqa: F401
        from jeepney.io import blocking  # noqa: F401
    except ImportError as e:
        raise NoDBus("the D-Bus binding is missing: install python3-jeepney "
                     f"(Debian/Ubuntu and Fedora package it) ({e})") from None
    return jeepney


def bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or f"unix:path={SYSTEM_BUS}"


def connect(timeout: float = 2.0):
    """A blocking jeepney connection to the system bus, or NoDBus."""
    _jeepney()
    from jeepney.bus import get_bus
    from jeepney.io.blocking import DBusConnection, prep_socket

    try:
        sock = prep_socket(get_bus(bus_address()), timeout=timeout)
    except (OSError, ValueError, RuntimeError) as e:
        raise NoDBus(f"cannot reach the system bus ({bus_address()}): {e}") from None
    return DBusConnection(sock)


def _get_property(conn, path: str, iface: str, name: str, timeout: float = 2.0):
    from jeepney import DBusAddress, Properties

    msg = Properties(DBusAddress(path, bus_name=FW_NAME, interface=iface)).get(name)
    reply = conn.send_and_get_reply(msg, timeout=timeout)
    from jeepney.low_level import HeaderFields, MessageType

    if reply.header.message_type == MessageType.error:
        raise NoDBus(f"firewalld: {reply.header.fields.get(HeaderFields.error_name, 'error')}: {reply.body}")
    return reply.body[0][1]


def strict_on_bus(timeout: float = 1.0) -> bool | None:
    """The running firewalld's StrictForwardPorts (firewalld >= 2.3), or
    None: no binding, no bus, no firewalld, or a version without it."""
    try:
        conn = connect(timeout)
    except NoDBus:
        return None
    try:
        if not _has_owner(conn, timeout):
            return None
        try:
            return _yes(str(_get_property(conn, FW_CONFIG_PATH, FW_CONFIG_IFACE, "StrictForwardPorts", timeout)))
        except Exception:
            return None  # firewalld < 2.3 has no such property
    except Exception:
        return None
    finally:
        conn.close()


def _has_owner(conn, timeout: float) -> bool:
    from jeepney import message_bus

    reply = conn.send_and_get_reply(message_bus.NameHasOwner(FW_NAME), timeout=timeout)
    return bool(reply.body and reply.body[0])


def strict_problem(use_bus: bool = True, bus_timeout: float = 1.0) -> str | None:
    """Why vnethook's forwards cannot work under this firewalld, or None.

    StrictForwardPorts=yes (firewalld >= 2.3) rejects every DNATed
    connection that firewalld did not create itself, so no rule of ours
    (nor libvirt's) lets a forwarded connection through.
    """
    where = None
    if use_bus and strict_on_bus(bus_timeout):
        where = "the running firewalld reports it over D-Bus"
    elif strict_in_conf():
        where = f"set in {conf_path()}"
    if where is None:
        return None
    return ("firewalld has StrictForwardPorts=yes (" + where + "): it rejects every forwarded "
            "(DNATed) connection it did not create itself, so vnethook's forwards cannot work. "
            "Set StrictForwardPorts=no in firewalld.conf and reload firewalld "
            "(vnethook does not register forward-ports with firewalld)")


# ------------------------------------------------------------ libvirt ready
def _iptables_save(flavour: str, table: str) -> str | None:
    import subprocess

    tool = {"iptables-legacy": "iptables-legacy-save"}.get(flavour, "iptables-nft-save")
    try:
        cp = subprocess.run([tool, "-t", table], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return cp.stdout if cp.returncode == 0 else None


def _bridges(paths) -> list:
    from vnethook import libvirt

    out: list = []
    for path in libvirt.xml_files(paths.running_networks_dir):
        try:
            net = libvirt._network_file(path)
        except Exception:
            continue
        if net is not None and net.bridge and net.forward_mode in RULED_MODES:
            out.append(net.bridge)
    return out


def libvirt_state(paths, backend: str) -> str | None:
    """A fingerprint of what of libvirt's rules decides our place, once it
    is there; else None.

    iptables: libvirt first creates its chains and the jumps to them
    (FORWARD -> LIBVIRT_FWX/FWI/FWO, INPUT, OUTPUT, nat POSTROUTING), then
    fills its chains network by network. Only the jumps matter to us: a jump
    libvirt inserts later lands at the top of FORWARD, ahead of our accept,
    while rules inside its own chains never do. So we may go as soon as the
    jumps are back, without waiting for every network's rules.
    nftables: libvirt's `ip libvirt_network` table (firewalld leaves it
    alone) with its forward chain.
    """
    import subprocess

    if not _bridges(paths):
        return ""  # no active network: libvirt has nothing to put back
    if backend == "nftables":
        try:
            cp = subprocess.run(["nft", "list", "chain", "ip", "libvirt_network", "forward"],
                                capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return "forward" if cp.returncode == 0 else None
    found = []
    for table, chains in LIBVIRT_JUMPS.items():
        text = _iptables_save(backend, table)
        if text is None:
            return None
        lines = set(text.splitlines())
        for chain, targets in chains.items():
            for t in targets:
                line = f"-A {chain} -j {t}"
                if line not in lines:
                    return None
                found.append(line)
    return "\n".join(found)


def wait_libvirt(paths, backend: str, timeout: float = 5.0, interval: float = 0.025) -> bool:
    """Poll until libvirt's rules are complete and unchanged between two
    polls (libvirt adds them one call at a time). False on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        cur = libvirt_state(paths, backend)
        if cur is not None and cur == last:
            return True
        last = cur
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# ------------------------------------------------------------------ resync
def resync(paths, why: str, wait: float = 5.0) -> bool:
    """Wait for libvirt, then sync; sync again while libvirt still moves or
    the base is not in place. True when the firewall ended up as planned."""
    from vnethook import log
    from vnethook.config import ConfigError, load_config_cached
    from vnethook.engine import Engine

    t0 = time.monotonic()
    try:
        config = load_config_cached(paths)
    except ConfigError as e:
        log.error(f"firewalld {why}: port map is invalid, forwards not restored:\n{e}")
        return False
    engine = Engine(paths, config)
    name = engine.selected_backend(redetect=True)[0]
    if not wait_libvirt(paths, name, timeout=wait):
        log.warning(f"firewalld {why}: libvirt's rules did not look complete within {wait:.0f}s; syncing anyway")
    ok = False
    for _attempt in range(5):
        report = engine.sync(verify=True)
        for err in report.errors:
            log.error(f"firewalld {why}: {err}")
        # Verify the order: libvirt may have re-inserted a jump meanwhile
        # (ahead of our accept) or still be adding its own.
        try:
            base_ok = engine.backend().snapshot().base_ok
        except Exception as e:
            log.error(f"firewalld {why}: cannot list the firewall: {e}")
            base_ok = False
        if base_ok and not report.errors:
            ok = True
            break
        wait_libvirt(paths, name, timeout=1.0)
    took = time.monotonic() - t0
    log.info(f"firewalld {why}: forwards re-applied in {took * 1000:.0f} ms"
             + ("" if ok else " (not verified: see the errors above and `vnethook status`)"))
    problem = strict_problem(use_bus=True)
    if problem:
        log.error(problem)
    return ok


def _wait_running(conn, timeout: float = 30.0) -> None:
    """A new firewalld owns its bus name before it flushes and builds its
    rules; its main loop (and so this call) answers only after that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if str(_get_property(conn, FW_PATH, FW_NAME, "state", timeout=deadline - time.monotonic())) == "RUNNING":
                return
        except Exception:
            pass
        time.sleep(0.05)


def listen(paths, stop=None, on_done=None, retry: float = 5.0, initial: bool = False,
           quiet: bool = False) -> int:
    """Follow firewalld on the system bus and re-apply after each reload or
    restart, until `stop` (a threading.Event) is set. Reconnects when the
    bus goes away. Raises NoDBus only when jeepney is missing.

    `initial`: also re-apply once on connecting, if firewalld runs. Under
    systemd this unit is restarted after firewalld (PartOf=, After=), so
    the restart's own signal came before we listened. `quiet`: say
    nothing while there is no system bus (the watcher, on any host)."""
    _jeepney()
    from jeepney import MatchRule, message_bus

    from vnethook import log

    said = None
    while stop is None or not stop.is_set():
        try:
            conn = connect()
        except NoDBus as e:
            if str(e) != said and not quiet:
                log.warning(f"firewalld listener: {e}; retrying every {retry:.0f}s")
                said = str(e)
            if stop is not None:
                if stop.wait(retry):
                    break
            else:
                time.sleep(retry)
            continue
        said = None
        try:
            _follow(conn, paths, stop, on_done, MatchRule, message_bus, log, initial)
            initial = False
        except (OSError, EOFError, ConnectionError) as e:
            log.warning(f"firewalld listener: lost the system bus ({e}); reconnecting")
        finally:
            conn.close()
    return 0


def _follow(conn, paths, stop, on_done, MatchRule, message_bus, log, initial=False) -> None:
    from collections import deque

    reloaded = MatchRule(type="signal", interface=FW_NAME, member="Reloaded", path=FW_PATH)
    owner = MatchRule(type="signal", sender="org.freedesktop.DBus", interface="org.freedesktop.DBus",
                      member="NameOwnerChanged", path="/org/freedesktop/DBus")
    owner.add_arg_condition(0, FW_NAME)
    queue: deque = deque()
    with conn.filter(reloaded, queue=queue), conn.filter(owner, queue=queue):
        for rule in (reloaded, owner):
            conn.send_and_get_reply(message_bus.AddMatch(rule), timeout=5)
        log.info("firewalld listener: following firewalld's Reloaded and NameOwnerChanged signals")
        if initial and _has_owner(conn, 5):
            _wait_running(conn)
            ok = resync(paths, "start")
            if on_done is not None:
                on_done("start", ok)
        while stop is None or not stop.is_set():
            try:
                # No stop event (the CLI): block; a thread polls its event.
                msg = conn.recv_until_filtered(queue, timeout=None if stop is None else 1.0)
            except TimeoutError:
                continue
            whys = [_why(msg)]
            # Everything that came meanwhile (a burst of reloads, or signals
            # sent during the last pass) is covered by one more pass.
            while True:
                try:
                    conn.recv_messages(timeout=0)
                except TimeoutError:
                    break
            while queue:
                whys.append(_why(queue.popleft()))
            whys = [w for w in whys if w]
            if not whys:
                continue
            why = "restart" if "restart" in whys else "reload"
            if why == "restart":
                _wait_running(conn)
            ok = resync(paths, why)
            if on_done is not None:
                on_done(why, ok)


def _why(msg) -> str | None:
    from jeepney.low_level import HeaderFields

    member = msg.header.fields.get(HeaderFields.member)
    if member == "Reloaded":
        return "reload"
    if member == "NameOwnerChanged":
        name, _old, new = msg.body
        if name == FW_NAME and new:
            return "restart"
    return None


def start_thread(paths):
    """The listener as a daemon thread (the hook-started watcher), or None
    when jeepney is missing (said once in the log)."""
    import threading

    from vnethook import log

    try:
        _jeepney()
    except NoDBus as e:
        if os.path.exists("/usr/sbin/firewalld") or os.path.exists("/etc/firewalld"):
            log.warning(f"firewalld listener not started: {e}; after a firewalld reload run `vnethook sync`")
        return None
    stop = threading.Event()

    def run():
        try:
            listen(paths, stop=stop, quiet=True)
        except Exception as e:  # the watcher goes on with leases
            log.error(f"firewalld listener stopped: {type(e).__name__}: {e}")

    t = threading.Thread(target=run, name="vnethook-firewalld", daemon=True)
    t.start()
    return stop
