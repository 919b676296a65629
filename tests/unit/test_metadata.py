"""Ports declared in a domain's <metadata>: reading, validation (the YAML's
own checks and words), the merge with the YAML map, conflicts, and the hook's
and `vnethook check`'s use of it. Pure logic plus the hook run in-process
(prepare/start only validate) and as libvirt runs it (the no-op fast path)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap

import pytest

from vnethook import blocklist, hook, metadata
from vnethook.config import (
    Config,
    ConfigError,
    GuestConfig,
    PortRule,
    Settings,
    check_main,
    load_config,
)
from vnethook.paths import Paths

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NS = "http://vnethook.org/xmlns/ports/1.0"


def dom(body: str, name: str = "web", dom_id: "int | None" = 3, ports_attrs: str = "", wrap=True) -> bytes:
    """A domain XML whose metadata holds `body` inside <vnethook:ports>."""
    idattr = f" id='{dom_id}'" if dom_id is not None else ""
    inner = textwrap.indent(textwrap.dedent(body).strip("\n"), "      ")
    ports = (f'    <vnethook:ports xmlns:vnethook="{NS}"{ports_attrs}>\n{inner}\n    </vnethook:ports>\n'
             if wrap else textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n")
    return (f"<domain type='qemu'{idattr}>\n  <name>{name}</name>\n  <metadata>\n{ports}  </metadata>\n"
            "  <devices>\n    <interface type='network'><mac address='52:54:00:aa:bb:01'/>"
            "<source network='default'/></interface>\n  </devices>\n</domain>\n").encode()


def rule(hp, gp=None, proto="tcp", host=None, sources=(), origin="/etc/vnethook/ports.yaml:3"):
    hp = hp if isinstance(hp, tuple) else (hp, hp)
    gp = hp if gp is None else (gp if isinstance(gp, tuple) else (gp, gp))
    return PortRule(proto, host, hp, gp, tuple(sources), origin)


def yaml_cfg(**guests) -> Config:
    out = {}
    for name, spec in guests.items():
        addrs, rules = spec if isinstance(spec, tuple) else ((), spec)
        out[name] = GuestConfig(name, addrs, None, False, tuple(rules), "/etc/vnethook/ports.yaml:2")
    return Config(Settings(), out, ("/etc/vnethook/ports.yaml",))


def bare(rules):
    return [(r.protocol, r.host_address, r.host_ports, r.guest_ports, r.sources) for r in rules]


# ------------------------------------------------------------------ reading

def test_the_documented_example_reads_as_written():
    x = dom("""
        <vnethook:forward>8080:80</vnethook:forward>
        <vnethook:forward>[2001:db8::1]:8443:443</vnethook:forward>
        <vnethook:forward host_port="2222" guest_port="22" protocol="tcp" host_address="203.0.113.10">
          <vnethook:source>198.51.100.0/24</vnethook:source>
        </vnethook:forward>
    """, ports_attrs=' address="192.0.2.60 2001:db8::60" interface="52:54:00:AA:bb:02"')
    md = metadata.read(x)
    assert md.problems == ()
    assert (md.domain, md.domain_id, md.line) == ("web", 3, 4)
    assert md.addresses == ("192.0.2.60", "2001:db8::60")
    assert md.interface == "52:54:00:aa:bb:02"
    assert bare(r for r, _ in md.forwards) == [
        ("tcp", None, (8080, 8080), (80, 80), ()),
        ("tcp", "2001:db8::1", (8443, 8443), (443, 443), ()),
        ("tcp", "203.0.113.10", (2222, 2222), (22, 22), ("198.51.100.0/24",)),
    ]
    assert [r.origin for r, _ in md.forwards] == [f"domain web metadata line {n}" for n in (5, 6, 7)]


def test_every_yaml_short_and_long_form_means_the_same():
    shorts = ["8080:80", "5353:53/udp", "30000-30009:40000-40009/tcp", "203.0.113.10:443:443",
              "127.0.0.1:5432:5432", "[2001:db8::1]:8443:443", "9000:9000/SCTP", " 81:80 "]
    y = "guests:\n  web:\n" + "".join(f"    - \"{s}\"\n" for s in shorts)
    y += "    - {host_port: 2222, guest_port: 22, protocol: udp, host_address: '[2001:db8::2]', source: [2001:db8:1::/48]}\n"
    y += "    - {host_port: 7000-7001}\n"
    body = "".join(f"<vnethook:forward>{s}</vnethook:forward>\n" for s in shorts)
    body += ('<vnethook:forward host_port="2222" guest_port="22" protocol="udp" host_address="[2001:db8::2]">'
             "<vnethook:source>2001:db8:1::/48</vnethook:source></vnethook:forward>\n")
    body += '<vnethook:forward host_port="7000-7001"/>\n'
    md = metadata.read(dom(body))
    assert md.problems == ()
    assert bare(r for r, _ in md.forwards) == bare(_yaml_guest(y).forwards)


def _yaml_guest(text, tmp=None):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        p = os.path.join(d, "ports.yaml")
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, 0o644)
        return load_config(Paths(config=p, libvirt_root="/", state_dir=os.path.join(d, "s"))).guests["web"]


def _yaml_messages(value: str) -> list:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        p = os.path.join(d, "ports.yaml")
        with open(p, "w") as f:
            f.write(f"guests:\n  web:\n    - {value}\n")
        os.chmod(p, 0o644)
        with pytest.raises(ConfigError) as e:
            load_config(Paths(config=p, libvirt_root="/", state_dir=os.path.join(d, "s")))
        return [pr.message for pr in e.value.problems]


BAD_SHORT = ["99999:80", "0:80", "8080", "8080:80/icmp", "1.2.3.4.5:80:80", "2001:db8::1:80:80",
             "[2001:db8::1:80:80", "10-1:10-1", "100-109:80", "80:100-109", "100-109:200-201", "abc:80",
             "[::1]:80:80", "224.0.0.1:80:80", "0.0.0.0:80:80", "192.0.2.0/24:80:80", "[::ffff:192.0.2.1]:80:80",
             "[fe80::1%eth0]:80:80", "255.255.255.255:80:80", "1:2:3:4", "8080:-1"]


@pytest.mark.parametrize("value", BAD_SHORT)
def test_bad_short_forms_are_refused_with_the_yamls_words(value):
    md = metadata.read(dom(f"<vnethook:forward>{value}</vnethook:forward>"))
    assert md.forwards == ()
    prefix = "domain web: metadata line 5: <vnethook:forward>: "
    assert all(p.startswith(prefix) for p in md.problems), md.problems
    assert [p[len(prefix):] for p in md.problems] == _yaml_messages(f'"{value}"')


@pytest.mark.parametrize("attrs,yaml_value", [
    ('host_port="70000"', "{host_port: 70000}"),
    ('host_port="80" protocol="tcpp"', "{host_port: 80, protocol: tcpp}"),
    ('host_port="80" host_address="203.0.113.0/24"', "{host_port: 80, host_address: 203.0.113.0/24}"),
    ('host_port="80" guest_port="1-2"', "{host_port: 80, guest_port: 1-2}"),
    ('host_port="8-9" guest_port="1-3"', "{host_port: 8-9, guest_port: 1-3}"),
])
def test_bad_long_forms_are_refused_with_the_yamls_words(attrs, yaml_value):
    md = metadata.read(dom(f"<vnethook:forward {attrs}/>"))
    prefix = "domain web: metadata line 5: <vnethook:forward>: "
    assert md.forwards == () and md.problems
    assert [p[len(prefix):] for p in md.problems] == _yaml_messages(yaml_value)


def test_sources_are_checked_each_on_its_own_line():
    md = metadata.read(dom("""
        <vnethook:forward host_port="22" host_address="203.0.113.10">
          <vnethook:source>198.51.100.1/24</vnethook:source>
          <vnethook:source>2001:db8::/32</vnethook:source>
          <vnethook:source>nonsense</vnethook:source>
          <vnethook:source> </vnethook:source>
          <vnethook:source>198.51.100.0/24</vnethook:source>
        </vnethook:forward>
        <vnethook:forward host_port="23"><vnethook:source>198.51.100.7</vnethook:source></vnethook:forward>
    """))
    assert md.problems == (
        "domain web: metadata line 6: <vnethook:source>: source '198.51.100.1/24' has host bits set (did you mean 198.51.100.0/24?)",
        "domain web: metadata line 7: <vnethook:source>: source 2001:db8::/32 is IPv6 but the host address 203.0.113.10 is IPv4 (expected sources of the same family as the host address)",
        "domain web: metadata line 8: <vnethook:source>: invalid source 'nonsense' (expected an address or a network like 198.51.100.0/24)",
        "domain web: metadata line 9: <vnethook:source>: empty source (expected an address or a network like 198.51.100.0/24)",
    )
    assert bare(r for r, _ in md.forwards) == [("tcp", None, (23, 23), (23, 23), ("198.51.100.7/32",))]


def test_guest_options_are_checked():
    bad = metadata.read(dom("<vnethook:forward>80:80</vnethook:forward>",
                            ports_attrs=' address="192.0.2.5/24 192.0.2.6 192.0.2.7" interface="52:54:00:aa:bb"'
                                        ' allow_outside_network="maybe" adress="x"'))
    p = "domain web: metadata line 4: <vnethook:ports>: "
    assert set(bad.problems) == {
        p + "guest address '192.0.2.5/24' has a prefix length (expected a plain address like 192.0.2.5)",
        p + "second IPv4 address 192.0.2.7 (expected at most one IPv4 and one IPv6 address)",
        p + "invalid MAC address '52:54:00:aa:bb' (expected six hex pairs like 52:54:00:aa:bb:02)",
        p + "'allow_outside_network' is 'maybe' (expected true or false)",
        p + "unknown attribute 'adress' (did you mean 'address'?)",
    }
    assert bad.addresses == ("192.0.2.6",) and len(bad.forwards) == 1
    ok = metadata.read(dom("", ports_attrs=' interface="default" allow_outside_network="yes"'))
    assert ok.interface == "default" and ok.allow_outside_network and ok.problems == ()


@pytest.mark.parametrize("body,message", [
    ("<vnethook:forward/>", "line 5: <vnethook:forward>: empty forward"),
    ('<vnethook:forward host_port="80">81:80</vnethook:forward>', "line 5: <vnethook:forward>: both a short form '81:80'"),
    ('<vnethook:forward guest_port="80"/>', "line 5: <vnethook:forward>: forward is missing 'host_port'"),
    ('<vnethook:forward hostport="80"/>', "unknown attribute 'hostport' (did you mean 'host_port'?)"),
    ('<vnethook:forward host_port="80" colour="red"/>', "unknown attribute 'colour' (expected one of: host_port, guest_port, protocol, host_address)"),
    ('<vnethook:forward host_port="80" source="198.51.100.0/24"/>', "'source' is an element here"),
    ('<vnethook:forward host_port="80" vnethook:protocol="udp"/>', "unknown attribute 'protocol' in namespace"),
    ('<vnethook:forward host_port="80" protocol=""/>', "'protocol' is empty"),
    ('<vnethook:forward host_port="80" host_address=" "/>', "'host_address' is empty"),
    ("<forward>80:80</forward>", "line 5: <vnethook:ports>: element <forward> has no namespace (expected <vnethook:forward>"),
    ("<vnethook:forwrd>80:80</vnethook:forwrd>", "unknown element <vnethook:forwrd> (expected <vnethook:forward>)"),
    ('<x:forward xmlns:x="urn:other">80:80</x:forward>', "element <forward> is in namespace 'urn:other'"),
    ("stray text<vnethook:forward>80:80</vnethook:forward>", "text 'stray text' directly in <vnethook:ports>"),
    ('<vnethook:forward host_port="80"><vnethook:src>1.2.3.4</vnethook:src></vnethook:forward>', "unknown element <vnethook:src> (expected <vnethook:source>)"),
    ('<vnethook:forward host_port="80"><vnethook:source a="1">192.0.2.1</vnethook:source></vnethook:forward>', "<vnethook:source>: unknown attribute 'a' (expected none)"),
])
def test_hostile_and_mistaken_shapes_are_located_errors(body, message):
    md = metadata.read(dom(body))
    assert any(message in p for p in md.problems), md.problems
    assert all(p.startswith("domain web: metadata") for p in md.problems)


def test_the_namespace_decides_not_the_prefix():
    x = dom(f'<p:ports xmlns:p="{NS}"><p:forward>8080:80</p:forward></p:ports>', wrap=False)
    md = metadata.read(x)
    assert md.problems == () and len(md.forwards) == 1
    default_ns = dom(f'<ports xmlns="{NS}"><forward>8081:80</forward></ports>', wrap=False)
    assert len(metadata.read(default_ns).forwards) == 1


def test_other_namespaces_and_other_places_are_not_ours():
    assert metadata.read(b"<domain><name>a</name></domain>") is None
    # other applications' metadata is left alone
    other = dom('<app:data xmlns:app="urn:example:app"><app:forward>80:80</app:forward></app:data>', wrap=False)
    assert metadata.read(other.replace(b"</metadata>", f"<!-- {NS} -->".encode() + b"</metadata>")) is None
    # our namespace outside <metadata> (in a description, under <devices>) is not metadata
    elsewhere = (f"<domain><name>a</name><description>{NS}</description><devices>"
                 f'<vnethook:ports xmlns:vnethook="{NS}"><vnethook:forward>80:80</vnethook:forward></vnethook:ports>'
                 "</devices></domain>").encode()
    assert metadata.read(elsewhere) is None
    # a future version of the namespace, or another element of ours, is said plainly
    v2 = dom('<v:ports xmlns:v="http://vnethook.org/xmlns/ports/2.0"/>', wrap=False)
    assert metadata.read(v2.replace(b"</domain>", f"<!-- {NS} -->".encode() + b"</domain>")).problems == (
        "domain web: metadata line 4: namespace 'http://vnethook.org/xmlns/ports/2.0' is not supported"
        f" (expected {NS})",)
    stray = dom(f'<v:port xmlns:v="{NS}"/>', wrap=False)
    assert metadata.read(stray).problems == (
        "domain web: metadata line 4: <vnethook:port>: unknown element (expected <vnethook:ports>)",)


def test_a_second_ports_element_is_refused_the_first_counts():
    two = dom(f'<v:ports xmlns:v="{NS}"><v:forward>80:80</v:forward></v:ports>\n'
              f'<v:ports xmlns:v="{NS}"><v:forward>81:81</v:forward></v:ports>', wrap=False)
    md = metadata.read(two)
    assert len(md.forwards) == 1
    assert md.problems == ("domain web: metadata line 5: <vnethook:ports>: a second <vnethook:ports>"
                           " (expected one; the first is at line 4)",)


@pytest.mark.parametrize("doc", [
    # billion laughs: refused at the declaration, nothing is expanded
    b'<?xml version="1.0"?><!DOCTYPE domain [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
    b"<domain><name>web</name><metadata><v:ports xmlns:v='" + NS.encode() + b"'><v:forward>&b;</v:forward>"
    b"</v:ports></metadata></domain>",
    # an external entity: never fetched
    b'<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/shadow">]><domain><name>web</name><metadata>'
    b"<v:ports xmlns:v='" + NS.encode() + b"'><v:forward>&x;</v:forward></v:ports></metadata></domain>",
    b"<!DOCTYPE domain><domain><name>web</name><!-- " + NS.encode() + b" --></domain>",
])
def test_entities_and_doctypes_are_refused(doc):
    md = metadata.read(doc, "web")
    assert md.forwards == ()
    assert md.problems == ("domain web: metadata: the domain XML has a DOCTYPE or entity declaration"
                           " (refused: libvirt never writes one)",)


def test_broken_xml_and_deep_nesting_are_located_errors_not_tracebacks():
    broken = dom("<vnethook:forward>80:80</vnethook:forwardd>")
    md = metadata.read(broken, "web")
    assert md.forwards == () and len(md.problems) == 1
    assert md.problems[0].startswith("domain web: metadata line 5: not well-formed XML (")
    deep = b"<domain><name>x</name><metadata>" + b"<a>" * 200 + NS.encode() + b"</a>" * 200 + b"</metadata></domain>"
    md = metadata.read(deep, "x")
    assert md.problems == ("domain x: metadata: nesting deeper than 100 levels (expected libvirt's domain XML)",)
    for junk in (NS.encode(), b"\xff\xfe" + NS.encode(), NS.encode() + b"<", b"<a>" + NS.encode()):
        md = metadata.read(junk, "x")
        assert md is not None and md.forwards == () and md.problems


def test_character_references_are_fine():
    md = metadata.read(dom("<vnethook:forward>&#56;080:80&#x2f;udp</vnethook:forward>"))
    assert bare(r for r, _ in md.forwards) == [("udp", None, (8080, 8080), (80, 80), ())]


def test_status_file_form_and_name_and_id():
    x = dom("<vnethook:forward>8080:80</vnethook:forward>", name="db", dom_id=12)
    status = b"<domstatus state='running' pid='42'>\n<qemuCaps><flag name='x'/></qemuCaps>\n" + x + b"</domstatus>\n"
    md = metadata.read(status, source="/run/libvirt/qemu/db.xml")
    assert (md.domain, md.domain_id, md.line, md.source) == ("db", 12, 6, "/run/libvirt/qemu/db.xml")
    assert md.forwards[0][0].origin == "domain db metadata line 7"
    assert metadata.read(dom("", dom_id=None)).domain_id is None


# -------------------------------------------------------------------- merge

def meta(name, body, dom_id=1, attrs=""):
    return metadata.read(dom(body, name=name, dom_id=dom_id, ports_attrs=attrs))


def test_merge_is_the_union_and_the_yaml_options_win():
    cfg = yaml_cfg(web=(("192.0.2.10",), [rule(8080, 80)]))
    md = meta("web", "<vnethook:forward>8443:443</vnethook:forward>", attrs=' address="192.0.2.99" interface="isolated"')
    merged, problems = metadata.merge(cfg, [md])
    g = merged.guests["web"]
    assert problems == {}
    assert g.addresses == ("192.0.2.10",)  # the YAML's
    assert g.interface == "isolated"  # the YAML sets none
    assert [r.host_ports for r in g.forwards] == [(8080, 8080), (8443, 8443)]
    assert g.origin == "/etc/vnethook/ports.yaml:2"
    md_only = meta("db", "<vnethook:forward>6379:6379</vnethook:forward>", attrs=' address="192.0.2.60"')
    merged, _ = metadata.merge(cfg, [md_only])
    assert merged.guests["db"].addresses == ("192.0.2.60",)
    assert merged.guests["db"].origin == "domain db metadata line 4"
    assert merged.guests["web"] == cfg.guests["web"]
    # merging again starts from the YAML: nothing doubles, nothing conflicts with itself
    again, problems = metadata.merge(merged, [md_only])
    assert again == merged and problems == {}
    assert metadata.merge(cfg, []) == (cfg, {})


def test_allow_outside_network_from_either_place():
    cfg = yaml_cfg(web=[rule(8080, 80)])
    md = meta("web", "", attrs=' allow_outside_network="true"')
    assert metadata.merge(cfg, [md])[0].guests["web"].allow_outside_network


@pytest.mark.parametrize("yaml_rule,forward,conflict", [
    (rule(8080, 80), "8080:81", True),
    (rule(8080, 80), "8080:80/udp", False),
    (rule((8000, 8009), (9000, 9009)), "8009:1", True),  # inside a range
    (rule((8000, 8009), (9000, 9009)), "8010:1", False),
    (rule(8080, 80), "203.0.113.10:8080:80", True),  # wildcard vs specific
    (rule(8080, 80, host="203.0.113.10"), "8080:80", True),
    (rule(8080, 80, host="203.0.113.10"), "203.0.113.11:8080:80", False),
    (rule(8080, 80, host="127.0.0.1"), "8080:80", False),  # loopback only meets its own address
    (rule(8080, 80, host="127.0.0.1"), "127.0.0.1:8080:80", True),
    (rule(8080, 80, host="2001:db8::1"), "203.0.113.10:8080:80", False),  # other family
    (rule(8080, 80), "[2001:db8::1]:8080:80", True),  # a wildcard covers both families
])
def test_a_metadata_forward_that_overlaps_the_yaml_is_refused(yaml_rule, forward, conflict):
    cfg = yaml_cfg(web1=[yaml_rule])
    md = meta("web", f"<vnethook:forward>{forward}</vnethook:forward>")
    merged, problems = metadata.merge(cfg, [md])
    if conflict:
        assert merged.guests["web"].forwards == ()
        (msg,) = problems["web"]
        assert msg.startswith("domain web: metadata line 5: <vnethook:forward>: forward of ")
        assert "of guest 'web1' at /etc/vnethook/ports.yaml:3 (expected each host address, port and protocol" in msg
    else:
        assert len(merged.guests["web"].forwards) == 1 and problems == {}


def test_wildcards_follow_the_guests_fixed_address_family():
    cfg = yaml_cfg(web1=(("2001:db8::5",), [rule(8080, 80)]))  # IPv6 only: the wildcard is IPv6 only
    md = meta("web", "<vnethook:forward>203.0.113.1:8080:80</vnethook:forward>")
    assert metadata.merge(cfg, [md])[1] == {}


def test_between_two_guests_the_one_running_first_wins_and_names_both_places():
    a = meta("a", "<vnethook:forward>8080:80</vnethook:forward>", dom_id=7)
    b = meta("b", "<vnethook:forward>8080:80</vnethook:forward>\n<vnethook:forward>9090:90</vnethook:forward>", dom_id=3)
    merged, problems = metadata.merge(yaml_cfg(), [a, b])
    assert [r.host_ports for r in merged.guests["b"].forwards] == [(8080, 8080), (9090, 9090)]
    assert merged.guests["a"].forwards == ()
    assert problems == {"a": [
        "domain a: metadata line 5: <vnethook:forward>: forward of tcp port 8080 on every host address overlaps"
        " tcp port 8080 on every host address of guest 'b' at domain b metadata line 5 (expected each host"
        " address, port and protocol to be forwarded only once)"]}
    # the guest being started is the newcomer whatever its id
    merged, problems = metadata.merge(yaml_cfg(), [a, b], current="b")
    assert list(problems) == ["b"] and len(merged.guests["a"].forwards) == 1
    # running (an id) before defined (none)
    c = meta("c", "<vnethook:forward>8080:80</vnethook:forward>", dom_id=None)
    assert list(metadata.merge(yaml_cfg(), [c, a])[1]) == ["c"]


def test_a_refused_forward_blocks_nobody_else():
    y = yaml_cfg(web1=[rule(8080, 80)])
    a = meta("a", "<vnethook:forward>8080-8081:80-81</vnethook:forward>", dom_id=1)  # refused (8080)
    b = meta("b", "<vnethook:forward>8081:81</vnethook:forward>", dom_id=2)  # free, since a's is refused
    merged, problems = metadata.merge(y, [a, b])
    assert list(problems) == ["a"] and len(merged.guests["b"].forwards) == 1


def test_one_guests_own_forwards_may_not_overlap_either():
    md = meta("a", "<vnethook:forward>8080:80</vnethook:forward>\n<vnethook:forward>8080:81</vnethook:forward>")
    merged, problems = metadata.merge(yaml_cfg(), [md])
    assert len(merged.guests["a"].forwards) == 1
    assert problems["a"][0].startswith("domain a: metadata line 6: <vnethook:forward>: forward of tcp port 8080")
    assert "of guest 'a' at domain a metadata line 5" in problems["a"][0]


def test_family_fit_against_the_effective_address():
    cfg = yaml_cfg(web=(("192.0.2.10",), []))
    md = meta("web", "<vnethook:forward>[2001:db8::1]:8443:443</vnethook:forward>", attrs=' address="2001:db8::10"')
    merged, problems = metadata.merge(cfg, [md])
    assert merged.guests["web"].forwards == ()
    assert "host address 2001:db8::1 is IPv6 but guest 'web' has only an IPv4 address" in problems["web"][0]


def test_many_guests_merge_fast():
    import time

    cfg = yaml_cfg(**{f"y{i}": [rule(10000 + i, 80)] for i in range(2000)})
    metas = [meta(f"m{i}", f"<vnethook:forward>{20000 + i}:80</vnethook:forward><vnethook:forward>10005:1</vnethook:forward>",
                  dom_id=i) for i in range(500)]
    t = time.perf_counter()
    merged, problems = metadata.merge(cfg, metas)
    assert time.perf_counter() - t < 2.0
    assert len(problems) == 500 and len(merged.guests) == 2500


# ---------------------------------------------------------- hook and check

@pytest.fixture
def env(hook_env):
    return hook_env


def _map(paths, text):
    p = os.path.join(paths.config, "ports.yaml")
    with open(p, "w") as f:
        f.write(text)
    os.chmod(p, 0o644)


def _qemu(name, op, data):
    return hook.main("qemu", ["hook", name, op, "begin", "-"], stdin=io.BytesIO(data))


def test_prepare_validates_metadata_and_blocks_only_under_block(env, capfd):
    bad = dom("<vnethook:forward>99999:80</vnethook:forward>", name="web")
    good = dom("<vnethook:forward>8080:80</vnethook:forward>", name="web")
    _map(env, "settings: {lease_watch: off}\nguests:\n  other: [9090:90]\n")
    for op in ("prepare", "start"):
        assert _qemu("web", op, bad) == 0  # warn: the guest starts
    _map(env, "settings: {on_error: block, lease_watch: off}\nguests:\n  other: [9090:90]\n")
    for op in ("prepare", "start"):
        assert _qemu("web", op, bad) == 1
        assert _qemu("web", op, good) == 0
        assert _qemu("other2", op, b"<domain><name>other2</name></domain>") == 0
    err = capfd.readouterr().err
    assert "refusing prepare of web (on_error: block)" in err
    assert "domain web: metadata line 5: <vnethook:forward>: host port 99999 out of range" in err
    # a conflict with the YAML blocks too; with the map's own guest nothing changes
    assert _qemu("web", "prepare", dom("<vnethook:forward>9090:90</vnethook:forward>")) == 1
    assert "overlaps tcp port 9090 on every host address of guest 'other' at" in capfd.readouterr().err
    # conflicts with a running guest's metadata (its status file)
    status = env.running_domain_xml("db")
    with open(status, "wb") as f:
        f.write(b"<domstatus state='running'>" + dom("<vnethook:forward>7070:70</vnethook:forward>", name="db") + b"</domstatus>")
    assert _qemu("web", "prepare", dom("<vnethook:forward>7070:70</vnethook:forward>")) == 1
    assert "of guest 'db' at domain db metadata line 5" in capfd.readouterr().err
    for op in ("reconnect", "migrate", "restore", "stopped", "release"):
        assert _qemu("web", op, bad) == 0


def test_block_guests_marks_metadata_under_block(env):
    _map(env, "settings: {on_error: block}\nguests:\n  other: [9090:90]\n")
    from vnethook.config import load_config_cached

    load_config_cached(env)
    with open(blocklist.path(env.state_dir), "rb") as f:
        data = f.read()
    assert data.startswith(blocklist.METADATA_MARK) and data.endswith(b"\nother\n")
    assert blocklist.read(env.state_dir) == {b"other"}
    assert blocklist.blocks(env, "web", dom("<vnethook:forward>1:1</vnethook:forward>"))
    assert not blocklist.blocks(env, "web", b"<domain><name>web</name></domain>")
    _map(env, "guests:\n  other: [9090:90]\n")
    load_config_cached(env)
    assert not blocklist.blocks(env, "web", dom("<vnethook:forward>1:1</vnethook:forward>"))


def test_broken_map_under_block_blocks_guests_with_metadata(env):
    _map(env, "settings: {on_error: block}\nguests:\n  other: [9090:90\n")
    assert _qemu("web", "prepare", dom("<vnethook:forward>8080:80</vnethook:forward>")) == 1
    assert _qemu("plain", "prepare", b"<domain><name>plain</name></domain>") == 0


def test_guard_blocks_a_metadata_guest_when_vnethook_cannot_run(tmp_path):
    import shutil

    d = tmp_path / "hooks"
    d.mkdir()
    shutil.copy(os.path.join(REPO, "hooks", "qemu"), d / "qemu")
    probe = subprocess.run(["/usr/bin/python3", "-S", "-c", "import sys; sys.path += ['/usr/lib/python3/dist-packages']; import vnethook"],
                           capture_output=True, cwd="/")
    if probe.returncode == 0:
        pytest.skip("a vnethook package is installed system-wide: the copy would import it")
    state = tmp_path / "state"
    state.mkdir()
    (state / "block-guests").write_bytes(blocklist.HEADER_METADATA + b"other\n")
    os.chmod(state / "block-guests", 0o644)
    env = {"LC_ALL": "C", "PATH": "/usr/bin:/bin", "VNETHOOK_STATE_DIR": str(state)}

    def run(op, data):
        return subprocess.run([str(d / "qemu"), "web", op, "begin", "-"], input=data, capture_output=True,
                              env=env, cwd="/", timeout=60)

    with_md = dom("<vnethook:forward>8080:80</vnethook:forward>")
    assert run("start", with_md).returncode == 1
    assert run("start", b"<domain><name>web</name></domain>").returncode == 0
    cp = run("reconnect", with_md)
    assert cp.returncode == 0 and cp.stdout == b""
    (state / "block-guests").write_bytes(blocklist.HEADER)
    assert run("start", with_md).returncode == 0


def test_no_op_events_import_no_parser(env, tmp_path):
    """A guest without an entry and without metadata costs what it did:
    no lxml, no yaml, no pyexpat, no fork."""
    _map(env, "guests:\n  other: [9090:90]\n")
    from vnethook.config import load_config_cached

    load_config_cached(env)  # warm cache
    os.makedirs(env.guests_dir)  # as on a host where vnethook has run once
    code = ("import io, sys\n"
            f"sys.path.insert(0, {REPO!r})\n"
            "from vnethook import hook\n"
            "for op in ('prepare', 'start', 'started', 'stopped', 'release', 'migrate', 'restore'):\n"
            "    assert hook.main('qemu', ['h', 'web', op, 'begin', '-'], stdin=io.BytesIO(sys.stdin.buffer.read() if op == 'prepare' else DATA)) == 0\n"
            "print(sorted(m for m in ('lxml', 'yaml', 'pyexpat', 'vnethook.hookwork', 'vnethook.metadata', 'ipaddress') if m in sys.modules))\n")
    data = b"<domain type='qemu' id='1'><name>web</name><devices/></domain>"
    code = code.replace("DATA", repr(data))
    cp = subprocess.run([sys.executable, "-S", "-c", code], input=data, capture_output=True, text=False,
                        env=dict(os.environ), cwd="/", timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.decode().strip() == "[]"


def test_check_reports_metadata_problems_and_conflicts_naming_both_places(env, capsys):
    _map(env, "guests:\n  web1: [8080:80]\n")
    etc = os.path.join(env.libvirt_etc, "qemu")
    with open(os.path.join(etc, "a.xml"), "wb") as f:
        f.write(dom("<vnethook:forward>8080:80</vnethook:forward>\n<vnethook:forward>7000:70</vnethook:forward>", name="a", dom_id=None))
    with open(os.path.join(etc, "b.xml"), "wb") as f:
        f.write(dom("<vnethook:forward>7000:71</vnethook:forward>", name="b", dom_id=None))
    with open(env.running_domain_xml("b"), "wb") as f:
        f.write(b"<domstatus>\n" + dom("<vnethook:forward>7000:71</vnethook:forward>\n<vnethook:forward>x</vnethook:forward>", name="b", dom_id=4) + b"</domstatus>\n")
    assert check_main(None) == 1
    err = capsys.readouterr().err.splitlines()
    run_b = env.running_domain_xml("b")
    assert err == [
        f"domain a: metadata line 5: <vnethook:forward>: forward of tcp port 8080 on every host address overlaps tcp port 8080 on every host address of guest 'web1' at {env.config}/ports.yaml:2 (expected each host address, port and protocol to be forwarded only once) (in {etc}/a.xml)",
        f"domain a: metadata line 6: <vnethook:forward>: forward of tcp port 7000 on every host address overlaps tcp port 7000 on every host address of guest 'b' at domain b metadata line 6 (expected each host address, port and protocol to be forwarded only once) (in {etc}/a.xml)",
        f"domain b: metadata line 7: <vnethook:forward>: forward 'x' has no guest port (expected [HOSTADDR:]HOSTPORT:GUESTPORT[/PROTOCOL], e.g. 8080:80) (in {run_b})",
        "3 problem(s) in domain metadata",
    ]
    os.unlink(os.path.join(etc, "a.xml"))
    with open(run_b, "wb") as f:
        f.write(dom("<vnethook:forward>7000:71</vnethook:forward>", name="b", dom_id=4))
    assert check_main(None) == 0
    out = capsys.readouterr().out
    assert re.match(r"OK: 1 guest\(s\), 1 forward\(s\) in 1 file\(s\); 1 forward\(s\) in the metadata of 1 domain\(s\)", out), out


def test_every_copy_of_the_namespace_is_the_same():
    from vnethook import install, libvirt

    assert metadata.NS == NS and hook.METADATA_NS == NS.encode() == libvirt._METADATA_NS
    assert NS.encode() in install.GUARD.encode()
    for kind in ("qemu", "network"):
        with open(os.path.join(REPO, "hooks", kind), "rb") as f:
            assert NS.encode() in f.read()


# ------------------------------------------------------- publish (no virsh)

def test_publish_spec_round_trip_and_map_dropin(env, capsys):
    from vnethook import publish

    for spec in ("8080:80", "5353:53/udp", "30000-30009:40000-40009", "203.0.113.10:443:443", "[2001:db8::1]:8443:443/sctp"):
        msgs: list = []
        from vnethook.config import parse_short

        p = parse_short(spec, msgs.append)
        r = rule(p[2], p[3], p[0], p[1])
        assert parse_short(publish.spec_of(r), msgs.append)[:4] == p[:4] and msgs == []
    _map(env, "guests:\n  web1: [7070:80]\n")
    assert publish.publish(env, "db", ["6379:6379", "5353:53/udp"], to_map=True) == 0
    dropin = os.path.join(env.config, "ports.d", "db.yaml")
    assert bare(load_config(env).guests["db"].forwards) == [
        ("tcp", None, (6379, 6379), (6379, 6379), ()), ("udp", None, (5353, 5353), (53, 53), ())]
    out = capsys.readouterr().out
    assert f"published 6379:6379/tcp in {dropin}" in out and "db is not running" in out
    # a conflict with the map is refused and leaves the drop-in as it was
    with open(dropin) as f:
        text = f.read()
    assert publish.publish(env, "db", ["7070:71"], to_map=True) == 1
    assert "overlaps tcp port 7070" in capsys.readouterr().err
    with open(dropin) as f:
        assert f.read() == text
    assert publish.publish(env, "db", ["99999:1"], to_map=True) == 1
    assert "'99999:1': host port 99999 out of range" in capsys.readouterr().err
    # unpublish: a forward of the main file is named, not touched
    assert publish.publish(env, "web1", ["7070:80"], to_map=True, remove=True) == 1
    assert "it is at " in capsys.readouterr().err
    assert publish.publish(env, "db", ["6379:6379", "5353:53/udp"], to_map=True, remove=True) == 0
    assert not os.path.exists(dropin)
    assert publish.publish(env, "../x", ["1:1"], to_map=True) == 1


def _clash(a, b, fams_a, fams_b) -> bool:
    """The documented conflict rule, pair by pair (the slow, obvious way)."""
    if a.protocol != b.protocol or a.host_ports[1] < b.host_ports[0] or b.host_ports[1] < a.host_ports[0]:
        return False
    if a.host_address and b.host_address:
        return a.host_address == b.host_address
    if not a.host_address and not b.host_address:
        return bool(fams_a & fams_b)
    spec, wild_fams = (a, fams_b) if a.host_address else (b, fams_a)
    if spec.host_address.startswith("127."):
        return False
    return (6 if ":" in spec.host_address else 4) in wild_fams


def test_merge_keeps_exactly_what_the_pairwise_rule_keeps():
    import random

    rnd = random.Random(14)
    hosts = [None, None, "203.0.113.10", "203.0.113.11", "127.0.0.1", "2001:db8::1"]
    for _ in range(60):
        metas = []
        for gi in range(rnd.randint(1, 5)):
            body = []
            for _ in range(rnd.randint(1, 6)):
                lo = rnd.randint(1, 30)
                hi = lo + rnd.choice([0, 0, 0, 3])
                h = rnd.choice(hosts)
                host = "" if h is None else (f"[{h}]:" if ":" in h else f"{h}:")
                body.append(f"<vnethook:forward>{host}{lo}-{hi}:{lo}-{hi}/{rnd.choice(['tcp', 'udp'])}</vnethook:forward>")
            attrs = rnd.choice(["", "", ' address="192.0.2.9"', ' address="2001:db8::9"'])
            metas.append(meta(f"g{gi}", "\n".join(body), dom_id=gi, attrs=attrs))
        cfg = yaml_cfg(y=[rule((10, 12), (10, 12)), rule(20, 20, host="203.0.113.10")])
        merged, _ = metadata.merge(cfg, metas)
        kept = [(r, frozenset((4, 6))) for r in cfg.guests["y"].forwards]
        for md in metas:  # ids ascending = precedence
            fams = frozenset(6 if ":" in a else 4 for a in md.addresses) or frozenset((4, 6))
            want = []
            for r, _line in md.forwards:
                if r.host_address and md.addresses and (6 if ":" in r.host_address else 4) not in fams:
                    continue
                if not any(_clash(r, k, fams, kf) for k, kf in kept):
                    kept.append((r, fams))
                    want.append(r)
            assert list(merged.guests[md.domain].forwards) == want


def test_thousands_of_identical_metadata_forwards_merge_fast():
    import time

    body = "\n".join("<vnethook:forward>8080:80</vnethook:forward>" for _ in range(5000))
    md = meta("a", body)
    t = time.perf_counter()
    merged, problems = metadata.merge(yaml_cfg(web1=[rule(9090, 90)]), [md])
    assert time.perf_counter() - t < 2.0
    assert len(merged.guests["a"].forwards) == 1 and len(problems["a"]) == 4999
