"""vnethook.addr answers exactly what ipaddress answers (it only skips the
import when the text is provably canonical): generated addresses, networks
and masks of both families, in canonical and other spellings, and errors."""

from __future__ import annotations

import ipaddress

from fresh import run
from hypothesis import given, settings
from hypothesis import strategies as st

from vnethook import addr

v4 = st.integers(0, 2**32 - 1).map(lambda i: ipaddress.IPv4Address(i))
v6 = st.one_of(
    st.integers(0, 2**128 - 1),
    st.integers(0, 2**32 - 1),  # ::a.b.c.d
    st.integers(0, 2**32 - 1).map(lambda i: 0xFFFF00000000 | i),  # ::ffff:a.b.c.d
    st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0xDB8]), min_size=8, max_size=8).map(
        lambda hs: int("".join(f"{h:04x}" for h in hs), 16)),  # runs of zeros
).map(lambda i: ipaddress.IPv6Address(i))
address = st.one_of(v4, v6)


def spellings(a):
    out = {a.compressed, a.exploded, str(a).upper()}
    if a.version == 6:
        out.add(f"{a.compressed}%eth0")
        if a.ipv4_mapped:
            out.add(f"::ffff:{a.ipv4_mapped}")
    else:
        out.add(".".join(f"0{o}" for o in str(a).split(".")))
    return sorted(out)


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except ValueError as e:
        return ("error", str(e))


@settings(max_examples=400, deadline=None)
@given(address)
def test_family_and_compressed(a):
    for text in spellings(a) + ["", "1.2.3", "1::2::3", "x"]:
        assert outcome(addr.family, text) == outcome(lambda t: ipaddress.ip_address(t).version, text)
        assert outcome(addr.compressed, text) == outcome(lambda t: ipaddress.ip_address(t).compressed, text)


@settings(max_examples=400, deadline=None)
@given(address, st.integers(0, 128), address)
def test_network_membership_and_interface(a, plen, other):
    bits = 32 if a.version == 4 else 128
    for p in (str(plen % (bits + 1)), str(plen), "0" + str(plen % 10), ""):
        for text in spellings(a)[:2]:
            cidr = f"{text}/{p}" if p else text
            assert outcome(addr.network, cidr) == outcome(
                lambda c: ipaddress.ip_network(c, strict=False).compressed, cidr)
            for probe in (a.compressed, other.compressed):
                assert outcome(addr.in_network, probe, cidr) == outcome(
                    lambda x, c: ipaddress.ip_address(x) in ipaddress.ip_network(c, strict=False), probe, cidr)
            if p:
                want = outcome(lambda: (lambda i: (i.version, str(i.ip), i.network.prefixlen, str(i.network)))(
                    ipaddress.ip_interface(f"{text}/{p}")))
                assert outcome(addr.interface, text, p) == want


@settings(max_examples=300, deadline=None)
@given(v4, st.integers(0, 32), st.booleans())
def test_interface_with_ipv4_masks(a, plen, host):
    m = ((1 << 32) - 1) ^ ((1 << (32 - plen)) - 1)
    for mask in (str(ipaddress.IPv4Address(m)), str(ipaddress.IPv4Address(m ^ 0xFFFFFFFF)), "255.0.255.0"):
        want = outcome(lambda: (lambda i: (i.version, str(i.ip), i.network.prefixlen, str(i.network)))(
            ipaddress.ip_interface(f"{a}/{mask}")))
        assert outcome(addr.interface, str(a), mask) == want


def test_the_common_cases_do_not_import_ipaddress():
    code = ("import sys; from vnethook import addr; "
            "r = (addr.family('192.0.2.10'), addr.compressed('2001:db8::10'), addr.network('192.0.2.1/24'), "
            "addr.in_network('192.0.2.10', '192.0.2.0/24'), addr.in_network('2001:db8::1', '192.0.2.0/24'), "
            "addr.interface('192.168.122.1', '255.255.255.0'), addr.interface('2001:db8::1', '64')); "
            "print(r, 'ipaddress' in sys.modules)")
    out = run(code, site=False).strip()
    assert out == ("(4, '2001:db8::10', '192.0.2.0/24', True, False, (4, '192.168.122.1', 24, '192.168.122.0/24'), "
                   "(6, '2001:db8::1', 64, '2001:db8::/64')) False")
