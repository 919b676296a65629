"""The schema tables in vnethook/config.py are the file format: the manual
and the shipped example document exactly the keys and choices they hold."""

from __future__ import annotations

import os
import re

import pytest

from vnethook import config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAN = os.path.join(ROOT, "packaging", "man", "vnethook-ports.yaml.5")
EXAMPLE = os.path.join(ROOT, "config", "ports.yaml")

SETTINGS = config.TOP.fields["settings"].fields


def _man_entries() -> dict[str, str]:
    """Each `.BR key: " what"` entry of the manual (a .TP tag): key -> what."""
    with open(MAN) as f:
        text = f.read()
    return {m.group(1): m.group(2) for m in re.finditer(r'(?m)^\.BR ([a-z_]+): "([^"\n]*)"', text)}


def test_the_manual_documents_exactly_the_schema_keys():
    keys = set(SETTINGS) | set(config.GUEST_KEYS) | set(config.FORWARD_KEYS)
    assert set(_man_entries()) == keys


@pytest.mark.parametrize("key", sorted(config.SETTING_CHOICES))
def test_the_manual_lists_each_settings_choices(key):
    documented = [w.strip().replace("\\-", "-") for w in _man_entries()[key].split("|")]
    assert tuple(documented) == config.SETTING_CHOICES[key]
    assert SETTINGS[key].expect == f"expected one of: {', '.join(documented)}"


def test_the_example_mentions_every_key():
    with open(EXAMPLE) as f:
        text = f.read()
    for key in config.TOP_KEYS + tuple(SETTINGS) + config.GUEST_KEYS + config.FORWARD_KEYS:
        assert re.search(rf"[\s{{,]{key}:", text), key


def test_spec_refuses_an_unknown_kind():
    with pytest.raises(TypeError, match="unknown Spec argument"):
        config.Spec("'x'", "expected y", scaler=str)
