"""firewalld: StrictForwardPorts detection, the listener's signal handling
and its readiness check of libvirt's rules (fake iptables-nft-save)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from vnethook import firewalld
from vnethook.paths import get_paths

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(REPO, "tests", "fixtures", "libvirt-11.3")


@pytest.mark.parametrize("text, want", [
    ("", None),
    ("# StrictForwardPorts=yes\n", None),
    ("StrictForwardPorts=no\n", False),
    ("StrictForwardPorts=yes\n", True),
    ("StrictForwardPorts = Yes\n", True),
    ("StrictForwardPorts=yes\nStrictForwardPorts=no\n", False),  # the last one wins
    ("FirewallBackend=nftables\nStrictForwardPorts=true\n", True),
])
def test_strict_in_conf(tmp_path, text, want):
    p = tmp_path / "firewalld.conf"
    p.write_text(text)
    assert firewalld.strict_in_conf(str(p)) is want


def test_strict_problem_names_the_file(tmp_path, monkeypatch):
    p = tmp_path / "firewalld.conf"
    p.write_text("StrictForwardPorts=yes\n")
    monkeypatch.setenv("VNETHOOK_FIREWALLD_CONF", str(p))
    msg = firewalld.strict_problem(use_bus=False)
    assert "StrictForwardPorts=yes" in msg and str(p) in msg
    p.write_text("StrictForwardPorts=no\n")
    assert firewalld.strict_problem(use_bus=False) is None
    monkeypatch.setenv("VNETHOOK_FIREWALLD_CONF", str(tmp_path / "absent.conf"))
    assert firewalld.strict_problem(use_bus=False) is None


def _env(tmp_path, **extra):
    env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": REPO,
           "VNETHOOK_STATE_DIR": str(tmp_path / "state"), "VNETHOOK_LIBVIRT_ROOT": str(tmp_path / "root"),
           "VNETHOOK_LOG": "stderr", "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}
    env.update(extra)
    return env


def test_check_and_status_refuse_strict_forward_ports(tmp_path):
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    (d / "ports.yaml").write_text("guests:\n  web1: [8080:80]\n")
    os.chmod(d / "ports.yaml", 0o644)
    conf = tmp_path / "firewalld.conf"
    conf.write_text("StrictForwardPorts=yes\n")
    env = _env(tmp_path, VNETHOOK_FIREWALLD_CONF=str(conf), VNETHOOK_CONFIG=str(d))
    cp = subprocess.run(["/usr/bin/python3", "-m", "vnethook", "check"], capture_output=True, text=True,
                        env=env, cwd="/")
    assert cp.returncode == 1 and "StrictForwardPorts=yes" in cp.stderr and "OK" not in cp.stdout
    cp = subprocess.run(["/usr/bin/python3", "-m", "vnethook", "status", "--json"], capture_output=True,
                        text=True, env=env, cwd="/")
    assert cp.returncode == 1
    import json

    assert any("StrictForwardPorts" in p for p in json.loads(cp.stdout)["problems"])
    conf.write_text("StrictForwardPorts=no\n")
    cp = subprocess.run(["/usr/bin/python3", "-m", "vnethook", "check"], capture_output=True, text=True,
                        env=env, cwd="/")
    assert cp.returncode == 0, cp.stderr


def test_hook_path_does_not_import_jeepney(tmp_path):
    code = ("import sys, vnethook.hook, vnethook.firewalld as f; f.strict_in_conf(); "
            "print('jeepney' in sys.modules, 'subprocess' in sys.modules)")
    cp = subprocess.run(["/usr/bin/python3", "-S", "-c", code], capture_output=True, text=True,
                        env=_env(tmp_path), cwd="/")
    assert cp.stdout.split()[0] == "False", cp.stdout + cp.stderr


def test_signals_are_told_apart():
    jeepney = pytest.importorskip("jeepney")
    from jeepney import DBusAddress, new_signal

    fw = DBusAddress(firewalld.FW_PATH, interface=firewalld.FW_NAME)
    bus = DBusAddress("/org/freedesktop/DBus", interface="org.freedesktop.DBus")
    assert jeepney and firewalld._why(new_signal(fw, "Reloaded")) == "reload"
    appeared = new_signal(bus, "NameOwnerChanged", "sss", (firewalld.FW_NAME, "", ":1.7"))
    gone = new_signal(bus, "NameOwnerChanged", "sss", (firewalld.FW_NAME, ":1.7", ""))
    other = new_signal(bus, "NameOwnerChanged", "sss", ("org.example", "", ":1.8"))
    assert firewalld._why(appeared) == "restart"
    assert firewalld._why(gone) is None  # firewalld stopping: wait for the new one
    assert firewalld._why(other) is None


def test_no_bus_is_said(tmp_path, monkeypatch):
    pytest.importorskip("jeepney")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/none")
    with pytest.raises(firewalld.NoDBus, match="cannot reach the system bus"):
        firewalld.connect(0.5)
    assert firewalld.strict_on_bus(0.5) is None


SAVE = {
    "filter": ["*filter", ":FORWARD ACCEPT [0:0]", "-A INPUT -j LIBVIRT_INP", "-A OUTPUT -j LIBVIRT_OUT",
               "-A FORWARD -j LIBVIRT_FWX", "-A FORWARD -j LIBVIRT_FWI", "-A FORWARD -j LIBVIRT_FWO",
               "-A LIBVIRT_FWI -d 192.0.2.0/24 -o vnhbr0 -j REJECT", "COMMIT"],
    "nat": ["*nat", "-A POSTROUTING -j LIBVIRT_PRT", "COMMIT"],
}


def _fake_save(tmp_path, drop=None):
    b = tmp_path / "bin"
    b.mkdir(exist_ok=True)
    for table, lines in SAVE.items():
        (tmp_path / f"{table}.txt").write_text("\n".join(ln for ln in lines if ln != drop) + "\n")
    tool = b / "iptables-nft-save"
    tool.write_text(f'#!/bin/sh\nexec cat "{tmp_path}/$2.txt"\n')
    tool.chmod(0o755)
    return str(b)


def test_libvirt_ready_needs_every_jump(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "run/libvirt/network").mkdir(parents=True)
    monkeypatch.setenv("VNETHOOK_LIBVIRT_ROOT", str(root))
    paths = get_paths()
    # No active network: nothing for libvirt to put back.
    assert firewalld.libvirt_state(paths, "iptables-nft") == ""
    shutil.copy(os.path.join(FIX, "run-network-vnhnet.iptables.xml"), root / "run/libvirt/network/vnhnet.xml")
    monkeypatch.setenv("PATH", _fake_save(tmp_path) + ":" + os.environ["PATH"])
    state = firewalld.libvirt_state(paths, "iptables-nft")
    assert state and "LIBVIRT_PRT" in state
    assert firewalld.wait_libvirt(paths, "iptables-nft", timeout=1)
    for missing in ("-A FORWARD -j LIBVIRT_FWI", "-A POSTROUTING -j LIBVIRT_PRT"):
        _fake_save(tmp_path, drop=missing)
        assert firewalld.libvirt_state(paths, "iptables-nft") is None
        assert not firewalld.wait_libvirt(paths, "iptables-nft", timeout=0.1)


@pytest.fixture
def private_bus(tmp_path, monkeypatch):
    """A dbus-daemon of our own on a socket in tmp_path (no namespace
    needed: nothing else knows the address)."""
    pytest.importorskip("jeepney")
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed")
    sock = tmp_path / "bus"
    conf = tmp_path / "bus.conf"
    conf.write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={sock}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/>
<allow receive_sender="*"/></policy></busconfig>
""")
    proc = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork", "--nopidfile"])
    import time

    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "dbus-daemon did not start"
        time.sleep(0.02)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={sock}")
    yield f"unix:path={sock}"
    proc.terminate()
    proc.wait(timeout=10)


def _fake_firewalld(address, strict):
    """Own org.fedoraproject.FirewallD1 and answer Properties.Get like
    firewalld >= 2.3 (StrictForwardPorts on the config object), or like 1.x
    (no such property: an error). Returns a stop function."""
    import threading

    from jeepney import message_bus, new_error, new_method_return
    from jeepney.bus import get_bus
    from jeepney.io.blocking import DBusConnection, prep_socket
    from jeepney.low_level import HeaderFields, MessageType

    conn = DBusConnection(prep_socket(get_bus(address)))
    assert conn.send_and_get_reply(message_bus.RequestName(firewalld.FW_NAME)).body[0] == 1
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                msg = conn.receive(timeout=0.1)
            except TimeoutError:
                continue
            except OSError:
                return
            f = msg.header.fields
            if msg.header.message_type != MessageType.method_call:
                continue
            if (f.get(HeaderFields.member) == "Get" and f.get(HeaderFields.path) == firewalld.FW_CONFIG_PATH
                    and msg.body == (firewalld.FW_CONFIG_IFACE, "StrictForwardPorts") and strict is not None):
                conn.send(new_method_return(msg, "v", (("s", strict),)))
            elif f.get(HeaderFields.member) == "Get" and msg.body == (firewalld.FW_NAME, "state"):
                conn.send(new_method_return(msg, "v", (("s", "RUNNING"),)))
            else:
                conn.send(new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", "s", ("no such property",)))

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    def done():
        stop.set()
        t.join(timeout=5)
        conn.close()

    def reloaded():
        from jeepney import DBusAddress, new_signal

        conn.send(new_signal(DBusAddress(firewalld.FW_PATH, interface=firewalld.FW_NAME), "Reloaded"))

    done.reloaded = reloaded
    return done


@pytest.mark.parametrize("strict, want", [("yes", True), ("no", False), (None, None)])
def test_strict_from_the_running_firewalld(private_bus, tmp_path, monkeypatch, strict, want):
    monkeypatch.setenv("VNETHOOK_FIREWALLD_CONF", str(tmp_path / "absent.conf"))
    assert firewalld.strict_on_bus() is None  # nobody owns the name yet
    done = _fake_firewalld(private_bus, strict)
    try:
        # Generous timeouts: other tests may load the machine.
        assert firewalld.strict_on_bus(5.0) is want
        problem = firewalld.strict_problem(use_bus=True, bus_timeout=5.0)
        if want:
            assert "reports it over D-Bus" in problem
        else:
            assert problem is None
    finally:
        done()


def test_listener_follows_reload_and_restart(private_bus, tmp_path, monkeypatch):
    """Reloaded and a new owner of the name each lead to one resync; the
    signals of a burst that arrive during a resync are covered by one more."""
    import threading
    import time

    calls = []
    gate = threading.Event()

    def fake_resync(paths, why, wait=5.0):
        calls.append(why)
        gate.wait(5)
        return True

    monkeypatch.setattr(firewalld, "resync", fake_resync)
    monkeypatch.setenv("VNETHOOK_LOG", "stderr")
    stop = threading.Event()
    t = threading.Thread(target=firewalld.listen, args=(get_paths(),), kwargs={"stop": stop}, daemon=True)
    t.start()

    def wait_calls(n):
        deadline = time.monotonic() + 10
        while len(calls) < n:
            assert time.monotonic() < deadline, calls
            time.sleep(0.02)

    try:
        time.sleep(0.5)  # subscribed (no initial resync without `initial`)
        assert calls == []
        first = _fake_firewalld(private_bus, None)  # a firewalld appears: a "restart"
        wait_calls(1)
        assert calls == ["restart"]
        for _ in range(5):  # a burst while the resync still runs
            first.reloaded()
        time.sleep(0.3)
        gate.set()
        wait_calls(2)
        time.sleep(0.5)
        assert calls == ["restart", "reload"], calls
        first()  # firewalld goes away: nothing to do until a new one owns the name
        time.sleep(0.3)
        assert len(calls) == 2
    finally:
        stop.set()
        gate.set()
        t.join(timeout=5)


def test_hook_check_stays_cheap(tmp_path):
    """The hook reads firewalld.conf at started/reconnect: no typing, no
    subprocess, no D-Bus on that path."""
    code = ("import sys, vnethook.firewalld as f; f.strict_in_conf(); "
            "print(sorted(m for m in ('typing', 'subprocess', 'jeepney') if m in sys.modules))")
    cp = subprocess.run(["/usr/bin/python3", "-S", "-c", code], capture_output=True, text=True,
                        env=_env(tmp_path), cwd="/")
    assert cp.stdout.strip() == "[]", cp.stdout + cp.stderr
