"""Broken libvirt XML and lease files: each gets its pinned verdict.

tests/corpus/xml/KIND-NAME.xml (KIND: domain, network, port) and
tests/corpus/leases/NAME.json, each with NAME.expected: the reader's
result or its error, as rendered by corpus.py (`{file}` = the input's path).
A lease case whose .json is absent is the "file missing" case.
Nothing here may raise anything but the readers' own LibvirtDataError.
"""

from __future__ import annotations

import os
import shutil

import pytest

from corpus import LEASE_DIR, XML_DIR, describe_leases, describe_xml

XML_CASES = sorted(n[: -len(".xml")] for n in os.listdir(XML_DIR) if n.endswith(".xml"))
LEASE_CASES = sorted(n[: -len(".expected")] for n in os.listdir(LEASE_DIR) if n.endswith(".expected"))


def _expected(path: str, target: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\n").replace("{file}", target)


def test_corpora_are_complete_and_big_enough():
    expected = {n[: -len(".expected")] for n in os.listdir(XML_DIR) if n.endswith(".expected")}
    assert expected == set(XML_CASES)
    inputs = {n[: -len(".json")] for n in os.listdir(LEASE_DIR) if n.endswith(".json")}
    assert inputs <= set(LEASE_CASES)
    errors = [c for c in XML_CASES if _expected(os.path.join(XML_DIR, c + ".expected"), "").startswith("error:")]
    assert len(XML_CASES) >= 60 and len(errors) >= 25
    assert len(LEASE_CASES) >= 25


@pytest.mark.parametrize("case", XML_CASES)
def test_xml_case(case, tmp_path):
    target = str(tmp_path / (case + ".xml"))
    shutil.copyfile(os.path.join(XML_DIR, case + ".xml"), target)
    got = describe_xml(target)
    want = _expected(os.path.join(XML_DIR, case + ".expected"), target)
    marker = "not well-formed XML: "
    if marker in want:
        # Where and what kind of error is ours; the rest is libxml2's own
        # wording, which changes between libxml2 releases (Debian 12 vs 13).
        head = want.split(marker, 1)[0] + marker
        assert got.startswith(head) and len(got) > len(head), got
    else:
        assert got == want


@pytest.mark.parametrize("case", LEASE_CASES)
def test_lease_case(case, tmp_path):
    target = str(tmp_path / "vnhbr0.status")
    src = os.path.join(LEASE_DIR, case + ".json")
    if os.path.exists(src):
        shutil.copyfile(src, target)
    assert describe_leases(target) == _expected(os.path.join(LEASE_DIR, case + ".expected"), target)
