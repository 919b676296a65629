"""When vnethook fails, libvirt's guests must not (issue 13), with a real libvirtd.

- A broken install (the hook's package directory gone, as when a venv is
  removed or a Python upgrade moves dist-packages): a daemon restart keeps
  the running guest running (its `reconnect` hook exits 0), unconfigured
  guests start, a guest that the last valid map blocks does not; once the
  install is back, `vnethook sync` converges.
- `on_error: block` with a broken map fails only the named guest's start:
  other guests start and the network restarts.
- A removal that cannot happen (the lock is held past its timeout) stays
  pending; the next hook event, or `vnethook sync`, removes the DNAT. Until
  then the DNAT really still reaches the stopped guest's address, which is
  why it must go.

One firewall backend (libvirt's iptables on iptables-nft) is enough: what is
tested lives above the backends, and the suite's time is precious.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess

import pytest

from sandbox import PYTHON, mac_for
from vnethook_env import INSTALLED, REPO, WRAPPER, VnethookEnv

pytestmark = pytest.mark.e2e

HOST_EXT = "198.51.100.1"


@pytest.fixture(params=["host"])
def sb(make_sandbox, request):
    """libvirt's iptables backend, of the libvirt installed here; tests
    marked with LIBVIRT_BOTH also run on Debian 12's own libvirt 9.0."""
    return make_sandbox("iptables", distro=request.param)


# What a daemon restart does to a guest whose hook fails (reconnect) is
# libvirt's own code, so it is checked on both versions.
LIBVIRT_BOTH = pytest.mark.parametrize("sb", ["host", "debian12"], indirect=True)


def _reach(ext, port=8080, timeout=2):
    return ext.connect_tcp(HOST_EXT, port, "ping", timeout=timeout)


def _running(sb, name) -> bool:
    return name in sb.virsh("list", "--name").split()


def _start_fails(sb, name):
    cp = sb.run(["virsh", "-c", "qemu:///system", "start", name], check=False, timeout=120)
    assert cp.returncode != 0, f"{name} started: {cp.stdout}"
    assert not _running(sb, name)
    return cp


def _copied_package_hooks(sb, vh, tmp_path):
    """Hooks as `vnethook install` writes them for a package in a venv-like
    directory of its own (install.hook_text run from a copy of the package),
    behind the e2e log wrapper but without PYTHONPATH: when that directory
    goes, vnethook cannot be imported at all."""
    site = tmp_path / "venv-site"
    shutil.copytree(os.path.join(REPO, "vnethook"), site / "vnethook",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in vh.env.items() if k != "PYTHONPATH"}
    for kind in ("qemu", "network"):
        text = subprocess.run(
            [PYTHON, "-c", f"import sys; sys.path.insert(0, {str(site)!r}); "
                           f"from vnethook.install import hook_text; sys.stdout.write(hook_text({kind!r}))"],
            capture_output=True, text=True, check=True, cwd="/").stdout
        assert str(site) in text
        hook = tmp_path / f"generated-{kind}"
        hook.write_text(text)
        os.chmod(hook, 0o755)
        sb.install_hook(f"{kind}.d/50-vnethook",
                        WRAPPER.format(python=PYTHON, env=env, argv=[str(hook)], log=str(vh.log)))
    sb.reload_libvirtd()
    return site


@pytest.mark.skipif(INSTALLED, reason="the installed package is found system-wide: its copy cannot be made unimportable")
@LIBVIRT_BOTH
def test_broken_install_keeps_guests_running_and_sync_converges(sb, tmp_path):
    vh = VnethookEnv(sb, tmp_path)
    sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    site = _copied_package_hooks(sb, vh, tmp_path)
    vh.write_map("settings: {on_error: block}\nguests:\n  web1: [8080:80]\n")
    mac = mac_for(40)
    sb.define_domain("web1", macs=[mac])
    g = sb.add_guest_netns("web1", mac)
    g.dhcp(hostname="web1")
    g.serve_tcp(80, "web1")
    ext = sb.add_external()
    sb.start("web1")
    assert _reach(ext).ok
    assert (vh.state / "block-guests").read_text().splitlines()[1:] == ["web1"]

    os.rename(site, str(site) + ".gone")  # the venv is removed
    sb.restart_libvirtd()  # reconnect + port-created for web1, through the broken hooks
    assert _running(sb, "web1"), "libvirt killed the running guest after its reconnect hook"
    assert "vnethook cannot run (ModuleNotFoundError" in vh.log_text()
    assert _reach(ext).ok  # its forward is still in place

    sb.define_domain("plain", macs=[mac_for(41)])
    sb.start("plain")  # not in the map: starts whatever the state of vnethook
    assert _running(sb, "plain")

    sb.destroy("web1")  # stopped/release cannot run: the forward stays
    cp = _start_fails(sb, "web1")  # the last valid map blocks web1: no start without its forwards
    assert "refusing the start of web1" in cp.stderr + vh.log_text()

    os.rename(str(site) + ".gone", site)  # the install is back
    vh.run(vh.cli_argv("sync"))
    assert not _reach(ext, timeout=1).ok
    assert vh.our_rules() == [] and vh.records() == []
    sb.start("web1")
    assert _reach(ext).ok and vh.status_json()["guests"][0]["drift"] == []


@LIBVIRT_BOTH
def test_block_with_a_broken_map_is_scoped_to_its_guest(sb, tmp_path):
    vh = VnethookEnv(sb, tmp_path)
    vh.install()
    sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    vh.write_map("settings: {on_error: block}\nguests:\n  web1: [8080:80]\n")
    vh.run(vh.cli_argv("sync"))  # a valid load: block-guests lists web1
    vh.write_map("settings: {on_error: block}\nguests:\n  web1: [8080:80\n")  # broken
    sb.define_domain("web1", macs=[mac_for(42)])
    sb.define_domain("web10", macs=[mac_for(43)])  # a name that contains the blocked one
    _start_fails(sb, "web1")
    sb.start("web10")
    assert _running(sb, "web10")
    sb.net_destroy("vnhnet")  # network stopped/start/started with the broken map and block
    sb.net_start("vnhnet")
    assert "vnhnet" in sb.virsh("net-list", "--name").split()
    refusals = [l for l in vh.log_text().splitlines() if "refusing" in l]
    assert refusals and all("of web1 (" in l for l in refusals), refusals


def test_failed_removal_is_retried_by_the_next_event_and_by_sync(sb, tmp_path):
    vh = VnethookEnv(sb, tmp_path)
    vh.env["VNETHOOK_LOCK_TIMEOUT"] = "2"  # how long a hook waits for the lock before giving up
    vh.install()
    sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    vh.write_map("guests:\n  web1: [8080:80]\n  web2: [8081:80]\n")
    ext = sb.add_external()
    guests = {}
    for i, name in enumerate(("web1", "web2")):
        mac = mac_for(44 + i)
        sb.define_domain(name, macs=[mac])
        guests[name] = sb.add_guest_netns(name, mac)
        guests[name].dhcp(hostname=name)
        guests[name].serve_tcp(80, name)
    sb.start("web1")
    assert _reach(ext, 8080).data == "web1"

    def destroy_while_locked(name):
        fd = os.open(vh.state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            sb.destroy(name)  # stopped, port-deleted, release: each gives up after 2 s
        finally:
            os.close(fd)

    destroy_while_locked("web1")
    assert not _running(sb, "web1")
    assert _reach(ext, 8080).data == "web1", "the DNAT was expected to survive the locked removal"
    st = vh.status_json()
    (g1,) = [g for g in st["guests"] if g["domain"] == "web1"]
    assert any("pending" in d for d in g1["drift"]), g1
    cp = vh.run(vh.cli_argv("status"), check=False)
    assert cp.returncode == 1 and "pending" in cp.stdout

    sb.start("web2")  # the next event retries web1's removal
    assert _reach(ext, 8081).data == "web2"
    assert not _reach(ext, 8080, timeout=1).ok
    assert vh.records_of("web1") == {}
    assert not any(guests["web1"].ip in r for r in vh.our_rules())
    assert "retried the pending removal of web1" in vh.log_text()

    destroy_while_locked("web2")
    assert _reach(ext, 8081).data == "web2"
    vh.run(vh.cli_argv("sync"))  # what vnethook-sync.timer runs
    assert not _reach(ext, 8081, timeout=1).ok
    assert vh.our_rules() == [] and vh.records() == []
    assert not list((vh.state / "removals").glob("*.json"))


def test_a_dnat_never_stays_on_an_address_leased_to_another_mac(sb, tmp_path):
    """A fixed address that dnsmasq hands to another MAC: until the next sync
    the DNAT reaches that other machine; plan reports it, sync removes it."""
    vh = VnethookEnv(sb, tmp_path)
    vh.install()
    sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    vh.write_map("guests:\n  fixed1:\n    address: 192.0.2.150\n    forward: [8080:80]\n")
    sb.define_domain("fixed1", macs=[mac_for(48)])
    sb.start("fixed1")  # its OS never configures the address
    ext = sb.add_external()
    other = sb.add_guest_netns("intruder", mac_for(49))  # any machine on the bridge, no domain
    script = os.path.join(os.path.dirname(__file__), "tools", "udhcpc-script")
    other.run(["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t", "8", "-T", "1", "-A", "1",
               "-r", "192.0.2.150", "-s", script], env={"VNH_LEASE_FILE": str(tmp_path / "intruder.lease")})
    sb.wait_for(lambda: any(e["ip-address"] == "192.0.2.150" and e["mac-address"] == mac_for(49)
                            for e in sb.leases()), timeout=10, what="the other MAC's lease on 192.0.2.150")
    other.serve_tcp(80, "intruder")
    assert _reach(ext).data == "intruder"  # what the stale DNAT does

    cp = vh.run(vh.cli_argv("plan", "fixed1"), check=False)
    assert cp.returncode == 1 and f"192.0.2.150 is leased by dnsmasq to {mac_for(49)}" in cp.stdout, cp
    assert "installed:" in cp.stdout
    cp = vh.run(vh.cli_argv("sync"))  # what vnethook-sync.timer runs
    assert "not forwarded" in cp.stderr
    assert not _reach(ext, timeout=1).ok
    assert not any("192.0.2.150" in r for r in vh.our_rules())
