"""The port map's accepted forms, its API, `vnethook check`, and the shipped example."""

from __future__ import annotations

import os
import textwrap

import pytest

from vnethook.config import (
    Config,
    ConfigError,
    GuestConfig,
    PortRule,
    Problem,
    Settings,
    check_main,
    config_files,
    load_config,
)
from vnethook.paths import Paths

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "config", "ports.yaml")


def write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    os.chmod(path, mode)
    return str(path)


def paths_for(config, tmp_path):
    return Paths(config=str(config), libvirt_root="/", state_dir=str(tmp_path / "state"))


SPEC_EXAMPLE = """\
settings:                 # all optional
  firewall: auto          # auto | iptables-nft | iptables-legacy | nftables
  on_error: warn          # warn | block
  lease_watch: auto       # auto | systemd | waiter | off
guests:
  web1:                               # libvirt domain name (any string; quote if needed)
    - 8080:80                         # host port 8080 -> guest port 80, tcp
    - 5353:53/udp
    - 30000-30009:40000-40009/tcp     # ranges map by offset, same length
    - 203.0.113.10:443:443            # only on that host address
    - 127.0.0.1:5432:5432             # only from the host itself
    - "[2001:db8::1]:8443:443"        # IPv6 host address
    - {host_port: 2222, guest_port: 22, protocol: tcp, source: [198.51.100.0/24]}
  db1:                                # long form: options + forward list
    address: 192.0.2.60               # fixed guest IP (or a list: one IPv4 and/or one IPv6)
    interface: 52:54:00:aa:bb:02      # which NIC: a MAC or a libvirt network name
    allow_outside_network: false
    forward:
      - 6379:6379
"""


def test_every_documented_form_parses_to_exact_rules(tmp_path):
    f = write(tmp_path / "ports.yaml", SPEC_EXAMPLE)
    cfg = load_config(paths_for(f, tmp_path))
    o = lambda line: f"{f}:{line}"  # noqa: E731
    assert cfg == Config(
        settings=Settings("auto", "warn", "auto"),
        guests={
            "web1": GuestConfig(
                name="web1",
                addresses=(),
                interface=None,
                allow_outside_network=False,
                forwards=(
                    PortRule("tcp", None, (8080, 8080), (80, 80), (), o(7)),
                    PortRule("udp", None, (5353, 5353), (53, 53), (), o(8)),
                    PortRule("tcp", None, (30000, 30009), (40000, 40009), (), o(9)),
                    PortRule("tcp", "203.0.113.10", (443, 443), (443, 443), (), o(10)),
                    PortRule("tcp", "127.0.0.1", (5432, 5432), (5432, 5432), (), o(11)),
                    PortRule("tcp", "2001:db8::1", (8443, 8443), (443, 443), (), o(12)),
                    PortRule("tcp", None, (2222, 2222), (22, 22), ("198.51.100.0/24",), o(13)),
                ),
                origin=o(6),
            ),
            "db1": GuestConfig(
                name="db1",
                addresses=("192.0.2.60",),
                interface="52:54:00:aa:bb:02",
                allow_outside_network=False,
                forwards=(PortRule("tcp", None, (6379, 6379), (6379, 6379), (), o(19)),),
                origin=o(14),
            ),
        },
        files=(f,),
    )
    assert list(cfg.guests) == ["web1", "db1"]


def test_normalization_and_defaults(tmp_path):
    f = write(
        tmp_path / "ports.yaml",
        """\
        settings: {on_error: block, firewall: nftables, lease_watch: "off"}
        guests:
          "my guest":
            address: ["2001:DB8:0:0::60", 192.0.2.60]
            interface: 52:54:00:AA:BB:0C
            allow_outside_network: yes
            forward:
              - {host_port: 30000-30001, protocol: UDP, host_address: "[2001:0db8::0001]",
                 source: ["2001:db8:0::/48", "2001:db8::/48", "2001:db8::7"]}
              - {host_port: "9000", guest_port: "9001", source: 198.51.100.9}
          net-by-name:
            interface: default
            forward: [1:1]
        """,
    )
    cfg = load_config(paths_for(f, tmp_path))
    assert cfg.settings == Settings(firewall="nftables", on_error="block", lease_watch="off")
    g = cfg.guests["my guest"]
    assert g.addresses == ("192.0.2.60", "2001:db8::60")  # IPv4 first, compressed
    assert g.interface == "52:54:00:aa:bb:0c"
    assert g.allow_outside_network is True
    assert g.forwards[0] == PortRule(
        "udp", "2001:db8::1", (30000, 30001), (30000, 30001), ("2001:db8::/48", "2001:db8::7/128"), f"{f}:8"
    )
    assert g.forwards[1] == PortRule("tcp", None, (9000, 9000), (9001, 9001), ("198.51.100.9/32",), f"{f}:10")
    assert cfg.guests["net-by-name"].interface == "default"


def test_problem_and_error_formatting():
    assert str(Problem("f.yaml", 3, 7, "bad")) == "f.yaml:3:7: bad"
    assert str(Problem("f.yaml", 0, 0, "refusing: x")) == "f.yaml: refusing: x"
    e = ConfigError([Problem("a", 1, 2, "x"), Problem("b", 0, 0, "y")])
    assert str(e) == "a:1:2: x\nb: y"
    assert e.problems[1].file == "b"


def test_missing_default_config_is_empty(tmp_path, monkeypatch):
    import vnethook.paths

    monkeypatch.setattr(vnethook.paths, "DEFAULT_CONFIG_DIR", str(tmp_path / "absent"))
    cfg = load_config(paths_for(tmp_path / "absent", tmp_path))
    assert cfg == Config(Settings(), {}, ())


def test_missing_explicit_config_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(paths_for(tmp_path / "nope.yaml", tmp_path))
    assert str(e.value) == f"{tmp_path}/nope.yaml: no such file or directory (expected a port map file or directory)"


def test_directory_layout_and_order(tmp_path):
    d = tmp_path / "etc"
    os.makedirs(d / "ports.d")
    os.chmod(d, 0o755)
    os.chmod(d / "ports.d", 0o755)
    write(d / "ports.d" / "20-b.yaml", "guests: {b: [2:2]}\n")
    write(d / "ports.d" / "10-a.yaml", "guests: {a: [1:1]}\n")
    write(d / "ports.d" / ".#10-a.yaml", "broken: [\n")  # editor lock file
    write(d / "ports.d" / "old.yml", "broken: [\n")
    write(d / "ports.yaml", "guests: {main: [3:3]}\n")
    p = paths_for(d, tmp_path)
    expected = [str(d / "ports.yaml"), str(d / "ports.d" / "10-a.yaml"), str(d / "ports.d" / "20-b.yaml")]
    assert config_files(p) == expected
    cfg = load_config(p)
    assert list(cfg.guests) == ["main", "a", "b"]
    assert cfg.files == tuple(expected)


def test_check_main_ok_and_problems(tmp_path, capsys):
    good = write(tmp_path / "good.yaml", SPEC_EXAMPLE)
    assert check_main(good) == 0
    out, err = capsys.readouterr()
    assert out == "OK: 2 guest(s), 8 forward(s) in 1 file(s)\n"
    assert err == ""
    bad = write(tmp_path / "bad.yaml", "guests:\n  web1: [0:80, 8080:80/icmp]\n")
    assert check_main(bad) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"{bad}:2:10: host port 0 out of range (expected 1-65535)\n"
        f"{bad}:2:16: unknown protocol 'icmp' (expected one of: tcp, udp, sctp)\n"
        "2 problem(s) in the port map\n"
    )


def test_shipped_example_is_valid_and_publishes_nothing(tmp_path, capsys):
    cfg = load_config(paths_for(EXAMPLE, tmp_path))
    assert cfg.guests == {}
    assert check_main(EXAMPLE) == 0
    assert capsys.readouterr().out == "OK: 0 guest(s), 0 forward(s) in 1 file(s)\n"


def test_shipped_example_documents_valid_syntax(tmp_path):
    """Uncommenting the example's blocks must give a valid map with every option."""
    out, on = [], False
    for line in open(EXAMPLE).read().splitlines():
        if line.startswith(("# settings:", "# guests:")):
            on = True
        if on and (not line.strip() or line.startswith("# A host address")):
            on = False
        if on:
            out.append(line[2:] if line.startswith("# ") else "")
    f = write(tmp_path / "uncommented.yaml", "\n".join(out) + "\n")
    cfg = load_config(paths_for(f, tmp_path))
    assert set(cfg.guests) == {"web1", "db1"}
    assert sum(len(g.forwards) for g in cfg.guests.values()) == 8
    assert cfg.guests["db1"].interface == "52:54:00:aa:bb:02"


TWENTY_MISTAKES = """\
settings:
  firewal: auto
  on_error: explode
  lease_watch: [auto]
guest: {}
guests:
  web1:
    - 0:80
    - 8080:65536
    - abc:80
    - 30009-30000:40000-40009/tcp
    - 30000-30009:40000-40004
    - 8080:80/icmp
    - 203.0.113.300:80:80
    - "[::1]:8080:80"
    - 224.0.0.1:81:81
    - {host_port: 2222, guest_port: 22, source: 198.51.100.7/24}
    - {host_port: 2223, sources: [198.51.100.0/24]}
  db1:
    adress: 192.0.2.60
    interface: 52:54:00:aa:bb
    allow_outside_network: maybe
    forward:
      - 6379:6379
      - 6379:6380
  web1: [9090:90]
"""


def test_twenty_mistakes_are_twenty_exact_problems(tmp_path):
    f = write(tmp_path / "ports.yaml", TWENTY_MISTAKES)
    with pytest.raises(ConfigError) as e:
        load_config(paths_for(f, tmp_path))
    got = [str(p) for p in e.value.problems]
    assert got == [
        f"{f}:2:3: unknown key 'firewal' in settings (did you mean 'firewall'?)",
        f"{f}:3:13: invalid on_error 'explode' (expected one of: warn, block)",
        f"{f}:4:16: 'lease_watch' is a list (expected one of: auto, systemd, waiter, off)",
        f"{f}:5:1: unknown key 'guest' at the top level (did you mean 'guests'?)",
        f"{f}:8:7: host port 0 out of range (expected 1-65535)",
        f"{f}:9:7: guest port 65536 out of range (expected 1-65535)",
        f"{f}:10:7: invalid host port 'abc' (expected a number 1-65535 or a range like 30000-30009)",
        f"{f}:11:7: reversed host port range 30009-30000 (expected low-high, e.g. 30000-30009)",
        f"{f}:12:7: host port range 30000-30009 has 10 ports but guest port range 40000-40004 has 5"
        " (expected ranges of the same length)",
        f"{f}:13:7: unknown protocol 'icmp' (expected one of: tcp, udp, sctp)",
        f"{f}:14:7: invalid host address '203.0.113.300' (expected an IPv4 or IPv6 address)",
        f"{f}:15:7: host address ::1 is not supported: the kernel cannot DNAT IPv6 loopback traffic to"
        " another host (expected 127.0.0.1 or a non-loopback address)",
        f"{f}:16:7: host address 224.0.0.1 is a multicast address (expected a unicast address)",
        f"{f}:17:49: source '198.51.100.7/24' has host bits set (did you mean 198.51.100.0/24?)",
        f"{f}:18:25: unknown key 'sources' in forward (did you mean 'source'?)",
        f"{f}:20:5: unknown key 'adress' in guest 'db1' (did you mean 'address'?)",
        f"{f}:21:16: invalid MAC address '52:54:00:aa:bb' (expected six hex pairs like 52:54:00:aa:bb:02)",
        f"{f}:22:28: 'allow_outside_network' is the string 'maybe' (expected true or false)",
        f"{f}:25:9: forward of tcp port 6379 on every host address overlaps tcp port 6379 on every host"
        f" address of guest 'db1' at {f}:24:9 (expected each host address, port and protocol to be"
        " forwarded only once)",
        f"{f}:26:3: duplicate key 'web1' (first at line 7, column 3; expected each key once)",
    ]
    assert len(got) == 20
