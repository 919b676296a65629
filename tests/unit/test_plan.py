"""The plan: a pure function from config + libvirt data to forwards.

Inputs are the real captured fixtures (tests/fixtures/libvirt-11.3: domain
XML from the `started` hook, the running network XML, a real lease file)
and maps loaded by the real config loader.
"""

from __future__ import annotations

import os

import pytest

from vnethook import libvirt
from vnethook.config import load_config
from vnethook.model import Forward
from vnethook.paths import Paths
from vnethook.plan import plan_guest

FIX = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "libvirt-11.3")
STARTED = os.path.join(FIX, "hooks", "06-qemu-web1-started-begin-_.xml")
NETWORK = os.path.join(FIX, "run-network-vnhnet.iptables.xml")
LEASES = os.path.join(FIX, "vnhbr0.status")
MAC1 = "52:54:00:e2:00:01"  # web1's NIC, leased 192.0.2.165 in vnhbr0.status
LEASE_TIME = 1796000572 - 3600  # an hour before that lease expires


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def _config(tmp_path, text):
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    f = d / "ports.yaml"
    f.write_text(text)
    os.chmod(f, 0o644)
    return load_config(Paths(config=str(d), libvirt_root="/nonexistent", state_dir=str(tmp_path / "st")))


@pytest.fixture
def domain():
    return libvirt.parse_domain(_read(STARTED), "started")


@pytest.fixture
def networks():
    net = libvirt.parse_network(_read(NETWORK), "net")
    return {net.name: net}


@pytest.fixture
def leases():
    return {"vnhbr0": libvirt.read_leases(LEASES, now=LEASE_TIME)}


def _plan(tmp_path, text, domain, networks, leases, now=LEASE_TIME):
    cfg = _config(tmp_path, text)
    return plan_guest(cfg.guests[domain.name], domain, networks, leases, now=now)


def test_lease_address_and_every_short_form(tmp_path, domain, networks, leases):
    p = _plan(
        tmp_path,
        "guests:\n"
        "  web1:\n"
        "    - 8080:80\n"
        "    - 5353:53/udp\n"
        "    - 30000-30009:40000-40009/tcp\n"
        "    - 203.0.113.10:443:443\n"
        "    - 127.0.0.1:5432:5432\n"
        "    - {host_port: 2222, guest_port: 22, protocol: tcp, source: [198.51.100.0/24]}\n",
        domain, networks, leases,
    )
    base = dict(domain="web1", mac=MAC1, network="vnhnet", bridge="vnhbr0", subnet="192.0.2.0/24",
                family=4, guest_address="192.0.2.165")
    assert set(p.forwards) == {
        Forward(**base, protocol="tcp", host_address=None, host_ports=(8080, 8080), guest_ports=(80, 80)),
        Forward(**base, protocol="udp", host_address=None, host_ports=(5353, 5353), guest_ports=(53, 53)),
        Forward(**base, protocol="tcp", host_address=None, host_ports=(30000, 30009), guest_ports=(40000, 40009)),
        Forward(**base, protocol="tcp", host_address="203.0.113.10", host_ports=(443, 443), guest_ports=(443, 443)),
        Forward(**base, protocol="tcp", host_address="127.0.0.1", host_ports=(5432, 5432), guest_ports=(5432, 5432)),
        Forward(**base, protocol="tcp", host_address=None, host_ports=(2222, 2222), guest_ports=(22, 22),
                sources=("198.51.100.0/24",)),
    }
    assert p.waiting == () and p.errors == ()
    assert p.addresses == ((MAC1, "192.0.2.165", "lease"),)
    assert all(f.origin.endswith(("ports.yaml:3", "ports.yaml:4", "ports.yaml:5", "ports.yaml:6",
                                  "ports.yaml:7", "ports.yaml:8")) for f in p.forwards)


def test_no_lease_yet_says_waiting(tmp_path, domain, networks):
    p = _plan(tmp_path, "guests:\n  web1: [8080:80]\n", domain, networks, {"vnhbr0": []})
    assert p.forwards == ()
    assert p.waiting and "no IPv4 address yet" in p.waiting[0] and MAC1 in p.waiting[0]


def test_expired_lease_is_not_used(tmp_path, domain, networks):
    expired = {"vnhbr0": libvirt.read_leases(LEASES, now=0)}
    p = _plan(tmp_path, "guests:\n  web1: [8080:80]\n", domain, networks, expired, now=1796000572 + 1)
    assert p.forwards == () and p.waiting


def test_fixed_address_wins_over_lease(tmp_path, domain, networks, leases):
    p = _plan(tmp_path, "guests:\n  web1:\n    address: 192.0.2.60\n    forward: [8080:80]\n",
              domain, networks, leases)
    assert [f.guest_address for f in p.forwards] == ["192.0.2.60"]
    assert p.addresses == ((MAC1, "192.0.2.60", "map"),)


def test_static_dhcp_host_wins_over_lease(tmp_path, domain, networks, leases):
    net = networks["vnhnet"]
    net2 = libvirt.Network(name=net.name, bridge=net.bridge, forward_mode=net.forward_mode,
                           subnets=net.subnets, dhcp_hosts=net.dhcp_hosts + ((MAC1, "192.0.2.44"),))
    p = _plan(tmp_path, "guests:\n  web1: [8080:80]\n", domain, {"vnhnet": net2}, leases)
    assert [f.guest_address for f in p.forwards] == ["192.0.2.44"]
    assert p.addresses[0][2] == "static DHCP host"


def test_address_outside_the_network_is_refused(tmp_path, domain, networks, leases):
    p = _plan(tmp_path, "guests:\n  web1:\n    address: 203.0.113.5\n    forward: [8080:80]\n",
              domain, networks, leases)
    # the lease still gives an address on the network; the outside one is refused
    assert [f.guest_address for f in p.forwards] == ["192.0.2.165"]
    assert p.errors and "outside network 'vnhnet'" in p.errors[0] and "allow_outside_network" in p.errors[0]


def test_address_outside_allowed_explicitly(tmp_path, domain, networks, leases):
    p = _plan(tmp_path, "guests:\n  web1:\n    address: 203.0.113.5\n    allow_outside_network: true\n"
              "    forward: [8080:80]\n", domain, networks, leases)
    assert [f.guest_address for f in p.forwards] == ["203.0.113.5"]
    assert p.errors == ()


def test_interface_by_mac_missing_nic_waits(tmp_path, domain, networks, leases):
    p = _plan(tmp_path, 'guests:\n  web1:\n    interface: "52:54:00:aa:bb:cc"\n    forward: [8080:80]\n',
              domain, networks, leases)
    assert p.forwards == () and "no interface with MAC 52:54:00:aa:bb:cc" in p.waiting[0]


def test_interface_by_network_name(tmp_path, domain, networks, leases):
    p = _plan(tmp_path, "guests:\n  web1:\n    interface: vnhnet\n    forward: [8080:80]\n",
              domain, networks, leases)
    assert [f.mac for f in p.forwards] == [MAC1]
    p = _plan(tmp_path / "b", "guests:\n  web1:\n    interface: othernet\n    forward: [8080:80]\n",
              domain, networks, leases) if (tmp_path / "b").mkdir() is None else None
    assert p.forwards == () and "no interface on network 'othernet'" in p.waiting[0]


def test_network_not_running_waits(tmp_path, domain, leases):
    p = _plan(tmp_path, "guests:\n  web1: [8080:80]\n", domain, {}, leases)
    assert p.forwards == () and "network 'vnhnet' is not running" in p.waiting[0]


def test_ipv6_forward_needs_an_ipv6_address(tmp_path, domain, networks, leases):
    p = _plan(tmp_path, 'guests:\n  web1: ["[2001:db8::1]:8443:443"]\n', domain, networks, leases)
    assert p.forwards == () and "no IPv6 address yet" in p.waiting[0]
    p = _plan(tmp_path / "b", 'guests:\n  web1:\n    address: [192.0.2.60, "2001:db8:1::60"]\n'
              '    forward: ["[2001:db8::1]:8443:443", 8080:80]\n', domain, networks, leases) \
        if (tmp_path / "b").mkdir() is None else None
    got = sorted((f.family, f.guest_address, f.host_address or "*", f.subnet) for f in p.forwards)
    assert got == [
        (4, "192.0.2.60", "*", "192.0.2.0/24"),
        (6, "2001:db8:1::60", "*", "2001:db8:1::/64"),
        (6, "2001:db8:1::60", "2001:db8::1", "2001:db8:1::/64"),
    ]


def test_sources_of_the_other_family_do_not_open_this_one(tmp_path, domain, networks, leases):
    p = _plan(tmp_path, 'guests:\n  web1:\n    address: [192.0.2.60, "2001:db8:1::60"]\n'
              "    forward: [{host_port: 22, source: [198.51.100.0/24]}]\n", domain, networks, leases)
    assert [(f.family, f.sources) for f in p.forwards] == [(4, ("198.51.100.0/24",))]


def test_plan_is_deterministic_and_pure(tmp_path, domain, networks, leases):
    text = "guests:\n  web1: [8080:80, 5353:53/udp, 30000-30001:40000-40001]\n"
    a = _plan(tmp_path, text, domain, networks, leases)
    b = _plan(tmp_path / "x", text, domain, networks, leases) if (tmp_path / "x").mkdir() is None else None
    assert a.forwards == b.forwards
    assert networks["vnhnet"].bridge == "vnhbr0"  # inputs untouched
