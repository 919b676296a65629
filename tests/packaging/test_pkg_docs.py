"""Man pages render cleanly and, with the bash completion, cover the CLI
as argparse defines it (so a new command or option cannot go unmentioned)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess

import pytest

import debpkg
from debpkg import REPO, run

MAN = os.path.join(REPO, "packaging", "man")
PAGES = ("vnethook.8", "vnethook-ports.yaml.5")
COMPLETION = os.path.join(REPO, "packaging", "bash-completion", "vnethook")


def _cli():
    """{command: [long options]} from the real parser."""
    from vnethook.cli import _parser

    out = {}
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in sub.choices.items():
        out[name] = sorted(o for a in sp._actions for o in a.option_strings if o.startswith("--") and o != "--help")
    return out


@pytest.mark.parametrize("page", PAGES)
def test_man_page_renders_without_warnings(page):
    why = debpkg.missing_tools("groff")
    if why:
        pytest.skip(why)
    p = run(["groff", "-man", "-Tutf8", "-ww", "-z", os.path.join(MAN, page)], check=False)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    if not debpkg.missing_tools("man"):
        r = run(["man", "-l", "--warnings", os.path.join(MAN, page)], check=False,
                env=debpkg.system_env(MANWIDTH="80"))
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert "NAME" in r.stdout and "SEE ALSO" in r.stdout


def _text(page):
    p = run(["groff", "-man", "-Tascii", "-P-c", "-P-b", "-P-u", os.path.join(MAN, page)],
            env=debpkg.system_env(MANWIDTH="200"))
    return p.stdout


def test_vnethook_8_covers_the_cli():
    if debpkg.missing_tools("groff"):
        pytest.skip("groff not installed")
    text = _text("vnethook.8")
    for section in ("SYNOPSIS", "COMMANDS", "EVENTS", "FILES", "ENVIRONMENT", "EXIT STATUS",
                    "DIAGNOSING A FORWARD THAT DOES NOT WORK"):
        assert section in text, section
    for cmd, opts in _cli().items():
        assert f"vnethook {cmd}" in text, cmd
        for o in opts:
            assert o in text, f"{cmd} {o}"
    for word in ("prepare", "start", "started", "stopped", "release", "reconnect", "migrate", "restore",
                 "port-created", "port-deleted", "updated",
                 "VNETHOOK_CONFIG", "VNETHOOK_STATE_DIR", "VNETHOOK_LIBVIRT_ROOT",
                 "/etc/vnethook/ports.yaml", "/run/vnethook", "/var/lib/libvirt/dnsmasq/*.status",
                 "/run/libvirt/qemu/*.xml", "vnethook-ports.yaml(5)"):
        assert word in text, word


def test_ports_yaml_5_covers_the_config_keys():
    if debpkg.missing_tools("groff"):
        pytest.skip("groff not installed")
    from vnethook import config

    text = _text("vnethook-ports.yaml.5")
    keys = list(config.TOP_KEYS) + list(config.GUEST_KEYS) + list(config.FORWARD_KEYS)
    keys += list(config.SETTING_CHOICES) + [c for cs in config.SETTING_CHOICES.values() for c in cs]
    keys += list(config.PROTOCOLS)
    for k in keys:
        assert k in text, k


def test_completion_covers_the_cli():
    with open(COMPLETION) as f:
        script = f.read()
    assert subprocess.run(["bash", "-n", COMPLETION]).returncode == 0
    for cmd, opts in _cli().items():
        assert cmd in script, cmd
        for o in opts:
            assert o in script, f"{cmd} {o}"


BASH_COMPLETION = "/usr/share/bash-completion/bash_completion"


@pytest.mark.skipif(not os.path.exists(BASH_COMPLETION), reason="bash-completion is not installed")
@pytest.mark.parametrize("line,expect", [
    ("vnethook ", {"check", "plan", "status", "doctor", "sync", "flush", "install", "uninstall", "watch", "hook"}),
    ("vnethook sy", {"sync"}),
    ("vnethook sync --", {"--config", "--no-verify", "--help"}),
    ("vnethook install --mode ", {"auto", "dir", "main"}),
    ("vnethook hook ", {"qemu", "network"}),
    ("vnethook hook network default ", {"start", "started", "stopped", "port-created", "port-deleted", "updated"}),
])
def test_completion_completes(line, expect, tmp_path):
    # The line is data for the constant driver script, passed as argv.
    driver = (
        'source "$1"; source "$2"; read -ra COMP_WORDS <<< "$3"; '
        '[[ $3 == *" " ]] && COMP_WORDS+=(""); '
        'COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMP_LINE=$3; COMP_POINT=${#3}; '
        '_vnethook vnethook "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"; '
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    p = subprocess.run(["bash", "-c", driver, "bash", BASH_COMPLETION, COMPLETION, line],
                       capture_output=True, text=True, cwd=tmp_path, timeout=30)
    got = set(p.stdout.split())
    assert expect <= got, (got, p.stderr)
    if line.endswith("sy"):
        assert got == expect
