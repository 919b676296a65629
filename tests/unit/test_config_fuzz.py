"""Whatever is in the file, loading gives a Config or a ConfigError, never a traceback."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vnethook.config import Config, ConfigError, load_config
from vnethook.paths import Paths

VALID = """\
settings:
  firewall: auto
  on_error: block
guests:
  web1:
    - 8080:80
    - 5353:53/udp
    - 30000-30009:40000-40009/tcp
    - 203.0.113.10:443:443
    - "[2001:db8::1]:8443:443"
    - {host_port: 2222, guest_port: 22, protocol: tcp, source: [198.51.100.0/24]}
  db1:
    address: [192.0.2.60, "2001:db8::60"]
    interface: 52:54:00:aa:bb:02
    allow_outside_network: false
    forward:
      - 6379:6379
"""
# Characters that matter to YAML and to the short form.
ALPHABET = list(":-/[]{},&*!|>'\"#%@`?\t\n \\.0123456789abcdefx~") + ["\x00", "\xe9", "\ufeff", "::", "- ", ": "]

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def load_bytes(tmp_path, data: bytes):
    f = tmp_path / "ports.yaml"
    f.write_bytes(data)
    os.chmod(f, 0o644)
    try:
        result = load_config(Paths(config=str(f), libvirt_root="/", state_dir=str(tmp_path / "s")))
    except ConfigError as e:
        assert e.problems and all(p.file == str(f) and p.message for p in e.problems)
        assert str(e)
        return e
    assert isinstance(result, Config)
    return result


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes(tmp_path, data):
    load_bytes(tmp_path, data)


@FUZZ
@given(st.text(max_size=400))
def test_random_text(tmp_path, text):
    load_bytes(tmp_path, text.encode("utf-8", "surrogatepass"))


@st.composite
def mangled(draw):
    text = VALID
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate_line"]))
        if op == "insert":
            text = text[:pos] + draw(st.sampled_from(ALPHABET)) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 8)) :]
        elif op == "replace":
            text = text[:pos] + draw(st.sampled_from(ALPHABET)) + text[pos + 1 :]
        else:
            lines = text.split("\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            text = "\n".join(lines)
    return text


@FUZZ
@given(mangled())
def test_mangled_valid_map(tmp_path, text):
    load_bytes(tmp_path, text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.lists(st.sampled_from(ALPHABET), max_size=120).map("".join))
def test_token_soup(tmp_path, text):
    load_bytes(tmp_path, text.encode("utf-8", "surrogatepass"))


def test_unmangled_map_is_valid(tmp_path):
    cfg = load_bytes(tmp_path, VALID.encode())
    assert isinstance(cfg, Config) and len(cfg.guests["web1"].forwards) == 6
