"""The hook's fast XML reader (pyexpat) and lxml give the same answers.

The hook reads libvirt's XML with pyexpat to spare lxml's import (~17 ms)
on every guest start; lxml stays the parser of record and takes over for
anything unusual. These tests hold the two paths to the same result, on
every captured fixture and on fuzzed variants of them: the same Domain /
Network / Port, or the same LibvirtDataError message.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vnethook import libvirt as L

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "libvirt-11.3")
HOOKS = os.path.join(FIX, "hooks")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


FIXTURES = sorted(
    [os.path.join(HOOKS, n) for n in os.listdir(HOOKS) if n.endswith(".xml")]
    + [os.path.join(FIX, n) for n in os.listdir(FIX) if n.endswith(".xml")]
)
PARSERS = (L.parse_domain, L.parse_network, L.parse_port)


def outcome(parse, data: bytes, reader: str):
    old = L.READER
    L.READER = reader
    try:
        return ("ok", parse(data, source="in.xml"))
    except L.LibvirtDataError as e:
        return ("error", str(e))
    finally:
        L.READER = old


def same(data: bytes) -> None:
    for parse in PARSERS:
        fast, slow = outcome(parse, data, "auto"), outcome(parse, data, "lxml")
        assert fast == slow, (parse.__name__, data[:300])


@pytest.mark.parametrize("path", FIXTURES, ids=os.path.basename)
def test_fixtures_read_the_same_and_take_the_fast_path(path):
    data = _read(path)
    assert L._fast_root(data) is not None  # real libvirt XML never needs lxml
    same(data)
    kinds = [outcome(p, data, "auto")[0] for p in PARSERS]
    assert "ok" in kinds  # each fixture is something the readers understand


def test_fast_path_does_not_import_lxml():
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from vnethook import libvirt\n"
        "d = libvirt.parse_domain(open(%r, 'rb').read())\n"
        "n = libvirt.parse_network(open(%r, 'rb').read())\n"
        "print(d.name, n.bridge, 'lxml' in sys.modules)\n"
    ) % (
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        os.path.join(FIX, "run-qemu-web1.xml"),
        os.path.join(FIX, "run-network-vnhnet.nftables.xml"),
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["web1", "vnhbr0", "False"]


ODD = [
    b"<domain><name>a<!-- c -->b</name></domain>",
    b"<domain><name><![CDATA[web]]>1</name></domain>",
    b"<domain><name>&#119;eb&amp;</name></domain>",
    b"<domain><name>w<?pi x?>eb</name></domain>",
    b"<domain xmlns='urn:x'><name>web</name></domain>",
    b"<d:domain xmlns:d='urn:x'><d:name>web</d:name></d:domain>",
    b"<domain><q:name xmlns:q='urn:q'>web</q:name><name>w2</name></domain>",
    b"<domain><name>web</name><devices/><devices><interface type='network'><mac address='52:54:00:00:00:01'/>"
    b"<source network='n' bridge='b'/></interface></devices></domain>",
    b"<!DOCTYPE domain [<!ENTITY e 'web'>]><domain><name>&e;</name></domain>",
    b"<!DOCTYPE domain SYSTEM 'file:///etc/passwd'><domain><name>web</name></domain>",
    b"<domain><name>&undefined;</name></domain>",
    b"<?xml version='1.1'?><domain><name>web</name></domain>",
    b"<?xml version='1.0' encoding='latin-1'?><domain><name>w\xe9b</name></domain>",
    b"<?xml version='1.0' encoding='EBCDIC-US'?><domain><name>web</name></domain>",
    b"\xef\xbb\xbf<domain><name>web</name></domain>",
    "<domain><name>web</name></domain>".encode("utf-16"),
    b"<domain><name>web</name></domain><domain/>",
    b"<domain><name>web</name>",
    b"<domain><name>w\x01eb</name></domain>",
    b"<domain><name>w\xffeb</name></domain>",
    b"<domain a='1' a='2'><name>web</name></domain>",
    b"<domain><name attr='x\n\ty'>web</name></domain>",
    b"<domain><name>web</name></domain>\n<!-- trailing -->\n",
    b"<" + b"x" * 60000 + b"/>",
    b"<domain>" + b"<a>" * 300 + b"</a>" * 300 + b"<name>web</name></domain>",
    b"<domstatus><domain><name>web</name></domain></domstatus>",
    b"<hookData><network><name>n</name><bridge name='b'/><ip address='192.0.2.1' prefix='24'>"
    b"<dhcp><host mac='52:54:00:00:00:02' ip='192.0.2.9'/></dhcp></ip></network>"
    b"<networkport><owner><name>g</name></owner><mac address='52:54:00:00:00:02'/><plug bridge='b'/>"
    b"</networkport></hookData>",
    b"<network><name>n</name><ip family='ipv7' address='x'/></network>",
    b"<network><name>n</name><ip address='192.0.2.1' netmask='255.255.255.0'/></network>",
    b"   ",
    b"",
    b"not xml at all",
]


@pytest.mark.parametrize("data", ODD, ids=range(len(ODD)))
def test_odd_documents_read_the_same(data):
    same(data)


SNIPPETS = [
    "<!-- c -->", "<![CDATA[x]]>", "&amp;", "&#10;", "&#x41;", "&e;", "<x/>", "</", "<", ">", "'", '"',
    "<?pi x?>", " xmlns='urn:a'", " xmlns:q='urn:q'", "<q:a/>", "<!DOCTYPE d>", "\x00", "\u00e9", "\ufeff",
    "<devices>", "</devices>", "<interface type='network'>", "</interface>", "<mac address='52:54:00:AA:b:1'/>",
    "<source network='vnhnet' bridge='vnhbr0'/>", "<name>", "</name>", "<name>x</name>", "\r\n", "\t", " ",
    "<domain>", "</domain>", "<network>", "</network>", "<ip address='192.0.2.1' prefix='24'>", "</ip>",
    "<dhcp><host mac='52:54:00:e2:00:09' ip='192.0.2.9'/></dhcp>", "<networkport>", "</networkport>",
]
SMALL = [
    _read(os.path.join(HOOKS, n))
    for n in sorted(os.listdir(HOOKS))
    if n.endswith(".xml") and n[:2] in ("04", "06", "02", "13")
]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SMALL)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(("insert", "delete", "byte")))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from(SNIPPETS)).encode("utf-8")
        elif op == "delete":
            data[pos:pos + draw(st.integers(1, 40))] = b""
        else:
            data[pos:pos + 1] = bytes([draw(st.integers(0, 255))])
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated())
def test_fuzzed_fixtures_read_the_same(data):
    same(data)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(SNIPPETS), max_size=25).map(lambda xs: "".join(xs).encode("utf-8")))
def test_snippet_soup_reads_the_same(data):
    same(data)


WELL_FORMED = [
    "<!-- c -->", "<![CDATA[x]]>", "&amp;", "&#10;", "&#x41;", "<x/>", "<?pi x?>", "<q:a xmlns:q='urn:q'/>",
    "\u00e9", " ", "\n", "\t", "<name>x</name>", "<uuid> u </uuid>", "<devices/>",
    "<devices><interface type='network'><mac address='52:54:00:AA:b:1'/>"
    "<source network='n2' bridge='br2' portid='p'/><target dev='t'/></interface></devices>",
    "<interface type='bridge'><mac address='52-54-00-00-00-07'/><source bridge='b'/></interface>",
    "<interface type='network'><mac address='zz'/></interface>",
    "<actual type='network'><source bridge='abr'/></actual>",
    "<mac address=' 52:54:00:e2:00:0F '/>", "<source network='other'/>",
    "<ip family='ipv6' address='2001:db8:9::1' prefix='64'/>", "<ip address='198.51.100.1'/>",
    "<dhcp><host mac='52:54:00:e2:00:09' ip='192.0.2.9'/><host mac='x' ip='y'/></dhcp>",
    "<bridge name='other'/>", "<forward mode='route'/>", "<owner><name>o</name><uuid>u</uuid></owner>",
    "<plug bridge='pb'/>", "<network><name>inner</name></network>",
]


@st.composite
def well_formed(draw):
    """Fixtures with well-formed pieces inserted where an element may start."""
    data = draw(st.sampled_from(SMALL)).decode("utf-8")
    cuts = [i + 1 for i, c in enumerate(data) if c == ">"]
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.sampled_from(cuts[:-1]))
        data = data[:pos] + draw(st.sampled_from(WELL_FORMED)) + data[pos:]
        cuts = [i + 1 for i, c in enumerate(data) if c == ">"]
    return data.encode("utf-8")


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(well_formed())
def test_well_formed_variants_read_the_same(data):
    same(data)


def test_status_files_read_the_same_without_their_qemucaps():
    """parse_domain skips the inside of <qemuCaps> (most of a status file):
    the same Domain, the same line numbers, and never where a comment,
    CDATA or processing instruction could hide a tag."""
    raw = _read(os.path.join(FIX, "run-qemu-web1.xml"))
    cut = L._without_caps(raw)
    assert len(cut) < len(raw) // 2 and cut.count(b"\n") == raw.count(b"\n")
    whole = L._parsed(raw, "in.xml", L._domain_from, L._DOMAIN_TAGS)
    assert L.parse_domain(raw, "in.xml") == whole
    nameless = raw.replace(b"<name>web1</name>", b"", 1)
    old = L.READER
    try:
        for reader in ("auto", "lxml"):
            L.READER = reader
            with pytest.raises(L.LibvirtDataError) as cut_err:
                L.parse_domain(nameless, "in.xml")
            with pytest.raises(L.LibvirtDataError) as whole_err:
                L._parsed(nameless, "in.xml", L._domain_from, L._DOMAIN_TAGS)
            assert str(cut_err.value) == str(whole_err.value)
    finally:
        L.READER = old
    assert raw.startswith(b"<!--")  # libvirt's warning: before <qemuCaps>, it hides nothing
    for hide in (b"<!-- x -->", b"<![CDATA[x]]>", b"<?pi x?>"):
        odd = raw.replace(b"</domstatus>", b"<x>" + hide + b"</x></domstatus>")
        assert L._without_caps(odd) == odd
    fake = raw.replace(b"-->", b"<qemuCaps>-->", 1)  # a tag's text inside the comment
    assert L.parse_domain(fake, "in.xml") == whole
