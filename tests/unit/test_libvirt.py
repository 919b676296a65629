"""vnethook.libvirt against what a real libvirt 11.3 wrote (tests/fixtures,
see its README), and against the broken input a hook can meet: truncated
or vanished files, wrong documents, odd MACs, stale or corrupt leases."""

from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vnethook import libvirt as L
from vnethook.paths import Paths

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures",
                   "libvirt-11.3")
HOOKS = os.path.join(FIX, "hooks")
MAC1, MAC2, MAC3, MAC4 = "52:54:00:e2:00:01", "52:54:00:e2:00:02", "52:54:00:e2:00:03", "52:54:00:e2:00:04"
SUBNETS = (
    L.Subnet(family=4, address="192.0.2.1", prefix=24, cidr="192.0.2.0/24"),
    L.Subnet(family=6, address="2001:db8:1::1", prefix=64, cidr="2001:db8:1::/64"),
)
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def fixture(name: str) -> bytes:
    with open(os.path.join(FIX, name), "rb") as f:
        return f.read()


def hook(seq: int) -> bytes:
    """stdin of the hook call number `seq` in hooks/events.txt."""
    (name,) = [n for n in os.listdir(HOOKS) if n.startswith(f"{seq:02d}-")]
    with open(os.path.join(HOOKS, name), "rb") as f:
        return f.read()


def events() -> list:
    with open(os.path.join(HOOKS, "events.txt"), encoding="utf-8") as f:
        return [line.split()[1:] for line in f]


def make_paths(tmp_path) -> Paths:
    p = Paths(config=str(tmp_path / "cfg"), libvirt_root=str(tmp_path), state_dir=str(tmp_path / "st"))
    for d in (p.running_domains_dir, p.running_networks_dir, p.dnsmasq_dir):
        os.makedirs(d, exist_ok=True)
    return p


# ------------------------------------------------------------ real fixtures
def test_event_sequence_is_what_the_hook_dispatch_expects():
    ev = [" ".join(e) for e in events()]
    assert ev[:7] == [
        "network vnhnet start begin -",
        "network vnhnet started begin -",
        "qemu web1 prepare begin -",
        "network vnhnet port-created begin -",
        "qemu web1 start begin -",
        "qemu web1 started begin -",
        "network vnhnet port-created begin -",  # hot-plugged NIC
    ]
    assert "qemu web1 release end shutdown" in ev
    assert "qemu web1 release end destroyed" in ev
    assert ev[-1] == "network vnhnet stopped end -"


def test_domain_at_prepare_has_no_bridge_yet():
    d = L.parse_domain(hook(3), source="prepare")
    assert d.name == "web1"
    assert UUID_RE.match(d.uuid)
    assert d.interfaces == (L.Interface(mac=MAC1, type="network", network="vnhnet", bridge=None,
                                        target=None, portid=None),)


@pytest.mark.parametrize("seq", [5, 6])
def test_domain_at_start_and_started_has_bridge_tap_and_port(seq):
    d = L.parse_domain(hook(seq))
    (i,) = d.interfaces
    assert (i.mac, i.type, i.network, i.bridge, i.target) == (MAC1, "network", "vnhnet", "vnhbr0", "vnet0")
    assert UUID_RE.match(i.portid)
    # the port uuid is the one the network hook saw at port-created
    assert i.portid.encode() in hook(5)
    port = L.parse_port(hook(4))
    assert port.owner_uuid == d.uuid


def test_domain_at_stop_and_release_both_nics_no_runtime_data():
    for seq in (12, 15):
        d = L.parse_domain(hook(seq))
        assert [(i.mac, i.network, i.bridge, i.target) for i in d.interfaces] == [
            (MAC1, "vnhnet", None, None), (MAC3, "vnhnet", None, None)]


def test_reconnect_domain_after_restart():
    d = L.parse_domain(hook(11))
    assert [(i.mac, i.bridge, i.target) for i in d.interfaces] == [
        (MAC1, "vnhbr0", "vnet0"), (MAC3, "vnhbr0", "vnet1")]


def test_domstatus_file_keeps_bridge_in_actual():
    d = L.parse_domain(fixture("run-qemu-web1.xml"), source="run-qemu-web1.xml")
    assert d.name == "web1"
    (i,) = d.interfaces
    assert (i.mac, i.type, i.network, i.bridge, i.target) == (MAC1, "network", "vnhnet", "vnhbr0", "vnet0")
    d2 = L.parse_domain(fixture("run-qemu-web1-2nics.xml"))
    assert [(i.mac, i.bridge, i.target) for i in d2.interfaces] == [
        (MAC1, "vnhbr0", "vnet0"), (MAC3, "vnhbr0", "vnet1")]
    assert d2.uuid == d.uuid


@pytest.mark.parametrize("seq", [1, 2, 4, 23])
def test_network_hookdata(seq):
    n = L.parse_network(hook(seq))
    assert n.name == "vnhnet"
    assert n.bridge == "vnhbr0"
    assert n.forward_mode == "nat"
    assert n.subnets == SUBNETS
    assert n.dhcp_hosts[0] == (MAC2, "192.0.2.10")


def test_network_updated_hookdata_has_new_host():
    n = L.parse_network(hook(8))
    assert n.dhcp_hosts == ((MAC2, "192.0.2.10"), (MAC4, "192.0.2.11"))
    assert L.parse_port(hook(8)) is None


@pytest.mark.parametrize("name", ["run-network-vnhnet.nftables.xml", "run-network-vnhnet.iptables.xml"])
def test_networkstatus_files(name):
    n = L.parse_network(fixture(name), source=name)
    assert (n.name, n.bridge, n.forward_mode, n.subnets, n.dhcp_hosts) == (
        "vnhnet", "vnhbr0", "nat", SUBNETS, ((MAC2, "192.0.2.10"),))


def test_ports_created_and_deleted():
    created = L.parse_port(hook(4))
    assert (created.network, created.owner, created.mac, created.bridge) == ("vnhnet", "web1", MAC1, "vnhbr0")
    hotplug = L.parse_port(hook(7))
    assert (hotplug.owner, hotplug.mac) == ("web1", MAC3)
    deleted = [L.parse_port(hook(s)) for s in (13, 14)]
    assert [(p.owner, p.mac, p.bridge) for p in deleted] == [("web1", MAC1, "vnhbr0"), ("web1", MAC3, "vnhbr0")]
    for seq in (1, 2, 23):
        assert L.parse_port(hook(seq)) is None


def test_real_lease_file():
    path = os.path.join(FIX, "vnhbr0.status")
    raw = json.loads(fixture("vnhbr0.status"))
    expiry = raw[0]["expiry-time"]
    leases = L.read_leases(path, now=expiry - 60)
    assert leases == [L.Lease(ip="192.0.2.165", mac=MAC1, expiry=expiry, hostname="web1")]
    assert L.read_leases(path, now=expiry) == []  # expired at its expiry time
    assert L.find_lease(leases, MAC1.upper()) == leases[0]
    assert L.find_lease(leases, MAC1, family=6) is None


def test_real_hostsfiles():
    assert L.read_hostsfile(os.path.join(FIX, "vnhnet.hostsfile")) == [(MAC2, "192.0.2.10")]
    assert L.read_hostsfile(os.path.join(FIX, "vnhnet.hostsfile.updated")) == [
        (MAC2, "192.0.2.10"), (MAC4, "192.0.2.11")]


# ------------------------------------------------------- running state dirs
def test_running_domains_and_networks(tmp_path):
    p = make_paths(tmp_path)
    for name in ("web1.xml",):
        with open(p.running_domain_xml("web1"), "wb") as f:
            f.write(fixture("run-qemu-web1-2nics.xml"))
    with open(p.running_network_xml("vnhnet"), "wb") as f:
        f.write(fixture("run-network-vnhnet.nftables.xml"))
    # noise libvirt also keeps there
    for junk in ("web1.pid", "driver.pid", "autostarted"):
        open(os.path.join(p.running_domains_dir, junk), "w").close()
    with open(os.path.join(p.running_domains_dir, "broken.xml"), "wb") as f:
        f.write(b"<domstatus><domain><name>bro")
    errors = []
    doms = L.running_domains(p, errors=errors)
    assert [d.name for d in doms] == ["web1"]
    assert len(errors) == 1 and "broken.xml" in errors[0]
    assert L.running_domains(p.running_domains_dir)[0].name == "web1"
    assert L.running_domain(p, "web1") == doms[0]
    assert L.running_domain(p, "nope") is None
    assert L.running_domain(p, "../etc/passwd") is None
    with pytest.raises(L.LibvirtDataError, match="broken.xml"):
        L.running_domain(p, "broken")
    net = L.running_network(p, "vnhnet")
    assert net.bridge == "vnhbr0"
    assert L.running_network(p, "other") is None


def test_running_domains_missing_dir_is_empty(tmp_path):
    assert L.running_domains(str(tmp_path / "nope")) == []


def test_running_domains_skip_unreadable(tmp_path):
    p = make_paths(tmp_path)
    os.mkdir(os.path.join(p.running_domains_dir, "dir.xml"))  # EISDIR on read
    errors = []
    assert L.running_domains(p, errors=errors) == []
    assert errors and "dir.xml" in errors[0]


def test_networks_for_prefers_hook_data_and_adds_hostsfile(tmp_path):
    p = make_paths(tmp_path)
    dom = L.parse_domain(fixture("run-qemu-web1-2nics.xml"))
    assert L.networks_for(p, dom) == {}  # network not running
    with open(p.running_network_xml("vnhnet"), "wb") as f:
        f.write(fixture("run-network-vnhnet.nftables.xml"))
    nets = L.networks_for(p, dom)
    assert list(nets) == ["vnhnet"]
    assert nets["vnhnet"].dhcp_hosts == ((MAC2, "192.0.2.10"),)
    # a reservation that reached dnsmasq's hostsfile counts too
    with open(p.hosts_file("vnhnet"), "wb") as f:
        f.write(fixture("vnhnet.hostsfile.updated"))
    assert L.networks_for(p, dom)["vnhnet"].dhcp_hosts == ((MAC2, "192.0.2.10"), (MAC4, "192.0.2.11"))
    # at the network's own events, stdin wins over the (older) status file
    hooknet = L.parse_network(hook(2))
    os.unlink(p.running_network_xml("vnhnet"))
    assert L.networks_for(p, dom, hooknet)["vnhnet"].bridge == "vnhbr0"
    other = L.Network("other", "br9", "nat", (), ())
    assert L.networks_for(p, dom, other) == {}


# ------------------------------------------------------------ broken input
DOMAIN = b"""<domain type='qemu'><name>g</name><uuid>u-1</uuid><devices>%s</devices></domain>"""


def iface(mac: str, net: str = "n", extra: str = "") -> bytes:
    return (f"<interface type='network'><mac address='{mac}'/>"
            f"<source network='{net}'{extra}/></interface>").encode()


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"   \n", "empty"),
    (b"<domain><name>x</name>", r"stdin:1: not well-formed"),
    (b"<?xml version='1.0'?>\n<domain>\n<name>x</name>\n<devices>\n</domain>", r"stdin:5: not well-formed"),
    (b"<network><name>x</name></network>", "expected <domain>, <domstatus>, got <network>"),
    (b"<domstatus state='running'/>", "<domstatus> has no <domain>"),
    (b"<domain><uuid>1</uuid></domain>", "has no <name>"),
    (b"<domain><name>  </name></domain>", "has no <name>"),
    (b"\xff\xfe<\x00d\x00", "stdin"),
    (b"not xml at all", "not well-formed"),
])
def test_parse_domain_errors(data, match):
    with pytest.raises(L.LibvirtDataError, match=match):
        L.parse_domain(data)


def test_error_names_the_source():
    with pytest.raises(L.LibvirtDataError, match=r"^qemu started stdin:1: "):
        L.parse_domain(b"<domain>", source="qemu started stdin")


def test_domain_without_interfaces():
    d = L.parse_domain(b"<domain><name>solo</name></domain>")
    assert d == L.Domain(name="solo", uuid=None, interfaces=())


def test_many_interfaces_keep_order():
    macs = [f"52:54:00:00:{i >> 8:02x}:{i & 0xff:02x}" for i in range(64)]
    data = DOMAIN % b"".join(iface(m, f"net{i % 3}") for i, m in enumerate(macs))
    d = L.parse_domain(data)
    assert [i.mac for i in d.interfaces] == macs
    assert [i.network for i in d.interfaces][:4] == ["net0", "net1", "net2", "net0"]


def test_odd_macs():
    data = DOMAIN % b"".join([
        iface("52:54:00:AB:CD:EF"),             # uppercase -> lowercase
        iface("52-54-00-0a-0b-0c"),             # dashes
        iface("52:54:0:a:b:c"),                 # unpadded octets
        b"<interface type='network'><source network='n'/></interface>",  # no MAC
        iface("not-a-mac"),
        iface("52:54:00:zz:00:01"),
        iface("52:54:00:00:01"),                # 5 octets
    ])
    d = L.parse_domain(data)
    assert [i.mac for i in d.interfaces] == ["52:54:00:ab:cd:ef", "52:54:00:0a:0b:0c", "52:54:00:0a:0b:0c"]


def test_non_network_interfaces_have_no_network():
    data = DOMAIN % (b"<interface type='bridge'><mac address='52:54:00:00:00:09'/>"
                     b"<source bridge='br0'/><target dev='vnet9'/></interface>"
                     b"<interface type='user'><mac address='52:54:00:00:00:0a'/></interface>")
    d = L.parse_domain(data)
    assert [(i.type, i.network, i.bridge, i.target) for i in d.interfaces] == [
        ("bridge", None, "br0", "vnet9"), ("user", None, None, None)]


def test_interfaces_outside_devices_are_ignored():
    data = (b"<domain><name>g</name><metadata><interface type='network'>"
            b"<mac address='52:54:00:00:00:01'/></interface></metadata></domain>")
    assert L.parse_domain(data).interfaces == ()


def test_entities_are_not_expanded_and_nothing_is_fetched():
    data = (b"<?xml version='1.0'?><!DOCTYPE domain [<!ENTITY x SYSTEM 'file:///etc/passwd'>"
            b"<!ENTITY y 'expanded'>]><domain><name>a&x;&y;</name></domain>")
    try:
        d = L.parse_domain(data)
    except L.LibvirtDataError:
        return
    assert "root:" not in d.name and "expanded" not in d.name


def test_billion_laughs_is_refused_or_harmless():
    lol = b"<!DOCTYPE d [<!ENTITY a 'aaaaaaaaaa'>" + b"".join(
        b"<!ENTITY %s '%s'>" % (bytes([98 + i]), (b"&" + bytes([97 + i]) + b";") * 10) for i in range(8)
    ) + b"]><domain><name>&i;</name></domain>"
    try:
        d = L.parse_domain(lol)
    except L.LibvirtDataError:
        return
    assert len(d.name) < 1000


def test_input_size_cap(monkeypatch):
    monkeypatch.setattr(L, "MAX_INPUT", 100)
    with pytest.raises(L.LibvirtDataError, match="over the 100 byte limit"):
        L.parse_domain(b"<domain><name>x</name>" + b" " * 200 + b"</domain>")


def test_deeply_nested_xml_is_an_error_not_a_crash():
    data = b"<domain><name>x</name>" + b"<a>" * 100000 + b"</a>" * 100000 + b"</domain>"
    with pytest.raises(L.LibvirtDataError):
        L.parse_domain(data)


def test_str_input_is_accepted():
    assert L.parse_domain("<domain><name>é</name></domain>").name == "é"


@pytest.mark.parametrize("data, match", [
    (b"<hookData/>", "<hookData> has no <network>"),
    (b"<domain><name>x</name></domain>", "expected <network>"),
    (b"<network/>", "has no <name>"),
    (b"<network><name>n</name><ip address='192.0.2.1' prefix='99'/></network>", r"stdin:1: bad <ip>"),
    (b"<network><name>n</name><ip/></network>", "has no address"),
    (b"<network><name>n</name><ip family='ipv6' address='192.0.2.1' prefix='24'/></network>", "family"),
    (b"<network><name>n</name><ip family='ipx' address='192.0.2.1'/></network>", "neither"),
])
def test_parse_network_errors(data, match):
    with pytest.raises(L.LibvirtDataError, match=match):
        L.parse_network(data)


def test_network_variants():
    n = L.parse_network(
        b"<network><name>iso</name><bridge name='br1'/>"
        b"<ip address='198.51.100.1' netmask='255.255.255.128'><dhcp>"
        b"<host mac='52:54:00:AA:00:01' ip='198.51.100.5'/>"
        b"<host mac='bogus' ip='198.51.100.6'/><host mac='52:54:00:aa:00:02'/>"
        b"<host name='byname' ip='198.51.100.7'/></dhcp></ip>"
        b"<ip family='ipv6' address='2001:db8:2::1' prefix='64'><dhcp>"
        b"<host id='0:3:0:1:0:16:3e:11:22:33' ip='2001:db8:2::5'/></dhcp></ip></network>")
    assert n.forward_mode is None
    assert n.subnets == (L.Subnet(4, "198.51.100.1", 25, "198.51.100.0/25"),
                         L.Subnet(6, "2001:db8:2::1", 64, "2001:db8:2::/64"))
    assert n.dhcp_hosts == (("52:54:00:aa:00:01", "198.51.100.5"),)
    assert L.parse_network(b"<network><name>bare</name></network>") == L.Network("bare", None, None, (), ())


@pytest.mark.parametrize("data, match", [
    (b"<network><name>n</name></network>", "expected <hookData>"),
    (b"<hookData><networkport><mac address='52:54:00:00:00:01'/></networkport></hookData>",
     "no <network><name>"),
    (b"<hookData><network><name>n</name></network><networkport/></hookData>", "no valid <mac"),
])
def test_parse_port_errors(data, match):
    with pytest.raises(L.LibvirtDataError, match=match):
        L.parse_port(data)


def test_port_without_owner_or_plug():
    p = L.parse_port(b"<hookData><network><name>n</name></network><networkport>"
                     b"<mac address='52:54:00:00:00:0A'/></networkport></hookData>")
    assert p == L.Port(network="n", owner=None, owner_uuid=None, mac="52:54:00:00:00:0a", bridge=None)


# ------------------------------------------------------------------ leases
def write(tmp_path, content, name="br.status") -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def entry(ip, mac, expiry, **kw):
    d = {"ip-address": ip, "mac-address": mac, "expiry-time": expiry}
    d.update(kw)
    return d


def test_missing_lease_file_is_no_leases(tmp_path):
    assert L.read_leases(str(tmp_path / "none.status")) == []


@pytest.mark.parametrize("content", ["", "  \n", "[]"])
def test_empty_lease_file(tmp_path, content):
    assert L.read_leases(write(tmp_path, content)) == []


@pytest.mark.parametrize("content, match", [
    ('[{"ip-address": "192.0.2.5",', r"br.status:1: not valid JSON"),
    ('[\n{"ip-address": "192.0.2.5"}\n,,]', r"br.status:3: not valid JSON"),
    ('{"ip-address": "192.0.2.5"}', "expected a JSON array"),
    ('"x"', "expected a JSON array"),
    (b'["\xff"]', "not UTF-8"),
    ("[" * 100000 + "]" * 100000, "br.status"),
])
def test_corrupt_lease_file(tmp_path, content, match):
    with pytest.raises(L.LibvirtDataError, match=match):
        L.read_leases(write(tmp_path, content), now=0)


def test_unreadable_lease_file_is_an_error(tmp_path):
    with pytest.raises(L.LibvirtDataError, match="cannot read"):
        L.read_leases(str(tmp_path))  # a directory


def test_leases_skip_expired_and_malformed(tmp_path):
    now = 1_000_000
    doc = [
        entry("192.0.2.10", "52:54:00:00:00:01", now + 10, hostname="a"),
        entry("192.0.2.11", "52:54:00:00:00:02", now - 1),          # expired
        entry("192.0.2.12", "52:54:00:00:00:03", now),              # expires now
        entry("192.0.2.13", "52:54:00:00:00:04", 0),                # never expires
        entry("2001:db8::13", "52:54:00:00:00:04", now + 5, iaid="1"),
        entry("192.0.2.300", "52:54:00:00:00:05", now + 10),        # bad ip
        entry("192.0.2.14", "zz", now + 10),                        # bad mac
        entry("192.0.2.15", "52:54:00:00:00:06", "soon"),           # bad expiry
        entry("192.0.2.16", "52:54:00:00:00:07", True),
        entry("192.0.2.17", "52:54:00:00:00:08", -5),
        {"mac-address": "52:54:00:00:00:09", "expiry-time": now + 10},
        "a string", 7, None, [],
        entry("192.0.2.18", "52:54:00:00:00:0A", str(now + 10), hostname=""),
    ]
    leases = L.read_leases(write(tmp_path, json.dumps(doc)), now=now)
    assert [(x.ip, x.mac, x.expiry, x.hostname) for x in leases] == [
        ("192.0.2.10", "52:54:00:00:00:01", now + 10, "a"),
        ("192.0.2.13", "52:54:00:00:00:04", 0, None),
        ("2001:db8::13", "52:54:00:00:00:04", now + 5, None),
        ("192.0.2.18", "52:54:00:00:00:0a", now + 10, None),
    ]


def test_leases_digits_int_refuses_are_skipped_not_raised(tmp_path):
    """str.isdigit() accepts what int() refuses ("²", over 4300 digits): such
    an entry is malformed like any other, never a ValueError out of the reader."""
    doc = [
        entry("192.0.2.10", "52:54:00:00:00:01", "\u00b2"),
        entry("192.0.2.11", "52:54:00:00:00:02", "9" * 5000),
        entry("1" * 5000 + ".0.0.0", "52:54:00:00:00:03", 0),
        entry("192.0.2.12", "52:54:00:00:00:04", "\u0663"),  # ARABIC-INDIC THREE: int() reads it
    ]
    leases = L.read_leases(write(tmp_path, json.dumps(doc)), now=0)
    assert [(x.ip, x.expiry) for x in leases] == [("192.0.2.12", 3)]


def test_network_host_with_huge_octet_is_skipped():
    xml = ('<network><name>n</name><ip address="192.0.2.1" prefix="24"><dhcp>'
           f'<host mac="52:54:00:00:00:01" ip="{"1" * 5000}.0.0.0"/>'
           '<host mac="52:54:00:00:00:02" ip="192.0.2.9"/></dhcp></ip></network>')
    assert L.parse_network(xml.encode()).dhcp_hosts == (("52:54:00:00:00:02", "192.0.2.9"),)


def test_stale_and_duplicate_mac_leases_newest_wins(tmp_path):
    now = 5000
    doc = [
        entry("192.0.2.20", "52:54:00:00:00:01", now + 100),   # previous boot, still valid
        entry("192.0.2.21", "52:54:00:00:00:01", now + 3600),  # current
        entry("192.0.2.22", "52:54:00:00:00:01", now - 100),   # stale
        entry("2001:db8::21", "52:54:00:00:00:01", now + 50),
    ]
    leases = L.read_leases(write(tmp_path, json.dumps(doc)), now=now)
    assert L.find_lease(leases, "52:54:00:00:00:01").ip == "192.0.2.21"
    assert L.find_lease(leases, "52:54:00:00:00:01", family=6).ip == "2001:db8::21"
    assert L.find_lease(leases, "52:54:00:00:00:02") is None
    assert L.find_lease(leases, "garbage") is None
    forever = L.Lease("192.0.2.30", "52:54:00:00:00:01", 0, None)
    assert L.find_lease(leases + [forever], "52:54:00:00:00:01") == forever


def test_leases_default_now_is_the_clock(tmp_path):
    doc = [entry("192.0.2.10", "52:54:00:00:00:01", 1), entry("192.0.2.11", "52:54:00:00:00:02", 2**40)]
    assert [x.ip for x in L.read_leases(write(tmp_path, json.dumps(doc)))] == ["192.0.2.11"]


def test_hostsfile_odd_lines(tmp_path):
    content = ("52:54:00:AA:00:01,192.0.2.5,web\n"
               "\n"
               "garbage\n"
               "id:00:03:00:01:52:54:00:00:00:01,[2001:db8::5],v6host\n"
               "name6,[2001:db8::6]\n"
               "52:54:00:aa:00:02,[2001:db8::7]\n"
               "52:54:00:aa:00:03,notanip\n"
               "52:54:00:aa:00:01,192.0.2.5,web\n")
    assert L.read_hostsfile(write(tmp_path, content, "n.hostsfile")) == [
        ("52:54:00:aa:00:01", "192.0.2.5"), ("52:54:00:aa:00:02", "2001:db8::7")]
    assert L.read_hostsfile(str(tmp_path / "none")) == []


def test_vanished_file_mid_listing(tmp_path, monkeypatch):
    """libvirt removes a status file between our listdir and open."""
    p = make_paths(tmp_path)
    with open(p.running_domain_xml("web1"), "wb") as f:
        f.write(fixture("run-qemu-web1.xml"))
    real_listdir = os.listdir
    monkeypatch.setattr(L.os, "listdir", lambda d: real_listdir(d) + ["gone.xml"])
    errors = []
    assert [d.name for d in L.running_domains(p, errors=errors)] == ["web1"]
    assert errors == []


def test_normalize_mac():
    assert L.normalize_mac(" 52:54:00:AB:CD:EF ") == "52:54:00:ab:cd:ef"
    for bad in (None, 5, "", "52:54:00:ab:cd", "52:54:00:ab:cd:ef:00", "52:54:00:abc:d:e", "52:54:00:ab:cd:e g"):
        assert L.normalize_mac(bad) is None


# -------------------------------------------------------------- properties
def _all_parsers(data: bytes):
    for fn in (L.parse_domain, L.parse_network, L.parse_port):
        try:
            fn(data, source="fuzz")
        except L.LibvirtDataError as e:
            assert str(e).startswith("fuzz")


xml_like = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([hook(4), hook(6), fixture("run-qemu-web1.xml")[:4000]]).flatmap(
        lambda base: st.tuples(st.integers(0, len(base)), st.binary(max_size=20)).map(
            lambda t: base[: t[0]] + t[1] + base[t[0]:]
        )
    ),
    st.sampled_from([hook(2), hook(5), hook(13)]).flatmap(
        lambda base: st.integers(0, len(base)).map(lambda n: base[:n])
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(xml_like)
def test_any_bytes_parse_or_libvirt_error(data):
    _all_parsers(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=300),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                  st.text(max_size=20),
                  st.sampled_from(["192.0.2.5", "52:54:00:00:00:01", "2001:db8::1"])),
        lambda children: st.one_of(
            st.lists(children, max_size=5),
            st.dictionaries(st.sampled_from(["ip-address", "mac-address", "expiry-time", "hostname", "x"]),
                            children, max_size=5)),
        max_leaves=20,
    ).map(lambda v: json.dumps(v).encode()),
))
def test_any_lease_file_reads_or_libvirt_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("leases") / "x.status"
    path.write_bytes(data)
    try:
        leases = L.read_leases(str(path), now=0)
    except L.LibvirtDataError as e:
        assert str(path) in str(e)
        return
    for lease in leases:
        assert L.normalize_mac(lease.mac) == lease.mac
        L.find_lease(leases, lease.mac, family=4)


_LEASE_FIELDS = {
    "ip-address": st.sampled_from(["192.0.2.10", "198.51.100.255", "192.000.002.010", "192.0.2.1 ",
                                   "2001:db8::10", "2001:DB8::10", "::ffff:192.0.2.1", "not-an-ip", 7, None]),
    "mac-address": st.sampled_from(["52:54:00:ab:cd:ef", "52:54:00:AB:cd:ef", "52-54-00-ab-cd-ef",
                                    "52:54:0:ab:cd:ef", "52:54:00:ab:cd:e", "5254.00ab.cdef", "", 1, None]),
    "expiry-time": st.sampled_from([0, 1796659286, -1, True, False, "1796659286", " 42 ", "x", 1.5, "²", None]),
    "hostname": st.sampled_from(["web1", "", None, 3, ["x"]]),
}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.fixed_dictionaries({}, optional=_LEASE_FIELDS),
    st.sampled_from([[], "lease", 3, None]))))
def test_the_fast_lane_of_lease_parsing_reads_as_the_careful_one(doc):
    """The lease reader's fast lane (what libvirt writes) gives exactly the
    leases, equal and with equal hashes, that _lease() gives entry by entry."""
    careful = [lease for lease in map(L._lease, doc) if lease is not None]
    fast = list(L._leases(doc))
    assert fast == careful
    assert [hash(x) for x in fast] == [hash(x) for x in careful]
    assert [repr(x) for x in fast] == [repr(x) for x in careful]
