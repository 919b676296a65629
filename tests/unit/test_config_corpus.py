"""Every broken (and a few tricky valid) inputs in tests/corpus/config/ give exact messages.

A case is NAME.yaml (one file, `{file}` in NAME.expected) or a directory NAME/
used as the config directory (`{dir}`). An empty NAME.expected means valid.
Files are copied so their modes are set here, not by git or the umask.
"""

from __future__ import annotations

import os
import shutil

import pytest

from vnethook.config import MAX_FILE_SIZE, ConfigError, load_config
from vnethook.paths import Paths

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpus", "config")
CASES = sorted(n[: -len(".expected")] for n in os.listdir(CORPUS) if n.endswith(".expected"))


def _problems(config, tmp_path):
    try:
        load_config(Paths(config=str(config), libvirt_root="/", state_dir=str(tmp_path / "state")))
    except ConfigError as e:
        return [str(p) for p in e.problems]
    return []


def test_corpus_is_complete():
    inputs = {n[:-5] if n.endswith(".yaml") else n for n in os.listdir(CORPUS) if not n.endswith(".expected")}
    assert inputs == set(CASES)
    broken = [c for c in CASES if os.path.getsize(os.path.join(CORPUS, c + ".expected"))]
    assert len(broken) >= 70


@pytest.mark.parametrize("case", CASES)
def test_corpus_case(case, tmp_path):
    import yaml

    if not getattr(yaml, "__with_libyaml__", False):
        pytest.skip("expected messages are pinned to libyaml's wording and marks")
    src = os.path.join(CORPUS, case)
    if os.path.isdir(src):
        target = tmp_path / case
        shutil.copytree(src, target)
        for root, _, files in os.walk(target):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        placeholder = "{dir}"
    else:
        target = tmp_path / (case + ".yaml")
        shutil.copyfile(src + ".yaml", target)
        os.chmod(target, 0o644)
        placeholder = "{file}"
    with open(os.path.join(CORPUS, case + ".expected")) as f:
        expected = [line.replace(placeholder, str(target)) for line in f.read().splitlines()]
    assert _problems(target, tmp_path) == expected


def test_file_over_one_mib_is_refused_without_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    # Valid YAML (a comment), so only the size can be the reason.
    with open(big, "w") as f:
        f.write("guests: {}\n")
        f.write(("#" * 1023 + "\n") * 2048)
    os.chmod(big, 0o644)
    assert os.path.getsize(big) > 2 * MAX_FILE_SIZE - 1
    assert _problems(big, tmp_path) == [f"{big}: refusing: file is larger than 1 MiB ({os.path.getsize(big)} bytes)"]


def test_file_of_exactly_one_mib_is_read(tmp_path):
    f = tmp_path / "edge.yaml"
    head = "guests: {web1: [8080:80]}\n"
    with open(f, "w") as fh:
        fh.write(head + "#" * (MAX_FILE_SIZE - len(head) - 1) + "\n")
    os.chmod(f, 0o644)
    assert os.path.getsize(f) == MAX_FILE_SIZE
    assert _problems(f, tmp_path) == []


def test_huge_flow_nesting_is_rejected_quickly(tmp_path):
    """libyaml is quadratic in flow depth (minutes at 1 MiB) and its composer
    recurses on the C stack (segfault): both must be stopped before parsing."""
    import time

    f = tmp_path / "deep.yaml"
    n = MAX_FILE_SIZE // 2 - 8
    with open(f, "w") as fh:
        fh.write("a: " + "[" * n + "]" * n)
    os.chmod(f, 0o644)
    t = time.monotonic()
    assert _problems(f, tmp_path) == [
        f"{f}:1:1004: nesting deeper than 1000 levels (expected a port map, which needs 6)"
    ]
    assert time.monotonic() - t < 5


def test_huge_block_nesting_is_rejected(tmp_path):
    f = tmp_path / "deep.yaml"
    with open(f, "w") as fh:
        fh.write("- " * (MAX_FILE_SIZE // 2 - 8) + "x\n")
    os.chmod(f, 0o644)
    assert _problems(f, tmp_path) == [
        f"{f}:1:2001: nesting deeper than 1000 levels (expected a port map, which needs 6)"
    ]


def test_big_map_is_checked_quickly(tmp_path):
    """Conflict detection is a sweep, not all pairs: 20000 forwards stay quick."""
    import time

    lines = ["guests:"]
    for g in range(200):
        lines.append(f"  g{g}:")
        for i in range(100):
            lines.append(f"    - 203.0.{g % 250}.{i % 250 + 1}:{10000 + i}:{i + 1}")
    f = tmp_path / "big.yaml"
    f.write_text("\n".join(lines) + "\n")
    os.chmod(f, 0o644)
    t = time.monotonic()
    problems = _problems(f, tmp_path)
    assert time.monotonic() - t < 20
    # g0..g199 use 203.0.(g%250).x: all distinct addresses, so no conflicts.
    assert problems == []


def test_every_conflict_in_a_big_map_is_reported_once(tmp_path):
    lines = ["guests:"] + [f"  g{g}: [8080:80]" for g in range(5000)]
    f = tmp_path / "same.yaml"
    f.write_text("\n".join(lines) + "\n")
    os.chmod(f, 0o644)
    problems = _problems(f, tmp_path)
    assert len(problems) == 4999
    assert problems[0] == (
        f"{f}:3:8: forward of tcp port 8080 on every host address overlaps tcp port 8080 on every host"
        f" address of guest 'g0' at {f}:2:8 (expected each host address, port and protocol to be"
        " forwarded only once)"
    )
