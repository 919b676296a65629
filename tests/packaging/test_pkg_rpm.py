"""The RPM spec builds with rpmbuild (here with the spec's fallbacks for
the Fedora macros Debian's rpm lacks) and ships what the .deb ships."""

from __future__ import annotations

import os
import re

from debpkg import REPO, run

EXPECTED = (
    "/usr/bin/vnethook",
    "/usr/libexec/vnethook/hooks/qemu",
    "/usr/libexec/vnethook/hooks/network",
    "/etc/libvirt/hooks/qemu.d/vnethook",
    "/etc/libvirt/hooks/network.d/vnethook",
    "/etc/vnethook/ports.yaml",
    "/etc/vnethook/ports.d",
    "/usr/lib/systemd/system/vnethook-sync.service",
    "/usr/lib/systemd/system/vnethook-sync.timer",
    "/usr/lib/systemd/system/vnethook-sync-periodic.service",
    "/usr/lib/systemd/system/vnethook-leases.path",
    "/usr/lib/systemd/system/vnethook-leases.service",
    "/usr/lib/systemd/system/vnethook-firewalld.service",
    "/usr/lib/systemd/system-preset/50-vnethook.preset",
    "/usr/share/bash-completion/completions/vnethook",
)


def test_rpm_files(vnethook_rpm):
    files = run(["rpm", "-qlp", vnethook_rpm]).stdout.split()
    for f in EXPECTED:
        assert f in files, f"{f} not in {files}"
    assert any(re.fullmatch(r"/usr/share/man/man8/vnethook\.8(\.gz|\.xz|\.bz2)?", f) for f in files)
    assert any(re.fullmatch(r"/usr/share/man/man5/vnethook-ports\.yaml\.5(\.gz|\.xz|\.bz2)?", f) for f in files)
    assert any(re.search(r"/(site|dist)-packages/vnethook/cli\.py$", f) for f in files)
    # the package must not record the build directory pip installed from
    assert not any(f.endswith("direct_url.json") for f in files)


def test_rpm_hooks_are_symlinks_config_is_noreplace(vnethook_rpm):
    # --dump: path size mtime digest mode owner group isconfig isdoc rdev symlink
    dump = {}
    for line in run(["rpm", "-qp", "--dump", vnethook_rpm]).stdout.splitlines():
        f = line.split()
        dump[f[0]] = f
    for kind in ("qemu", "network"):
        entry = dump[f"/etc/libvirt/hooks/{kind}.d/vnethook"]
        assert entry[4].startswith("0120"), entry  # S_IFLNK
        assert entry[-1].endswith(f"/usr/libexec/vnethook/hooks/{kind}"), entry
        assert dump[f"/usr/libexec/vnethook/hooks/{kind}"][4] == "0100755"
    assert run(["rpm", "-qpc", vnethook_rpm]).stdout.split() == ["/etc/vnethook/ports.yaml"]
    fflags = run(["rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", vnethook_rpm]).stdout
    assert re.search(r"^/etc/vnethook/ports\.yaml c.*n", fflags, re.M), fflags  # %config(noreplace)


def test_rpm_dependencies(vnethook_rpm):
    requires = run(["rpm", "-qpR", vnethook_rpm]).stdout.splitlines()
    for dep in ("python3-lxml", "python3-pyyaml", "python3-nftables", "python3-systemd", "python3-jeepney"):
        assert dep in requires, requires
    # python-iptables only serves the legacy backend: weak, not required
    assert not any("iptables" in r and r.startswith("python") for r in requires), requires
    assert "python3-iptables" in run(["rpm", "-qp", "--recommends", vnethook_rpm]).stdout.split()


def test_rpm_scriptlets(vnethook_rpm):
    s = run(["rpm", "-qp", "--scripts", vnethook_rpm]).stdout
    post = s.split("postinstall scriptlet")[1].split("uninstall scriptlet")[0]
    assert "vnethook sync || :" in post and "kill -HUP" in post
    preun = s.split("preuninstall scriptlet")[1].split("postuninstall scriptlet")[0]
    # flush only when the package goes ($1 == 0), not on upgrade
    assert re.search(r'if \[ "\$1" -eq 0 \]; then.*vnethook flush', preun, re.S), preun
    postun = s.split("postuninstall scriptlet")[1]
    assert "kill -HUP" in postun and "rm -rf /run/vnethook" in postun and "rm -rf /var/lib/vnethook" in postun
    # (the %systemd_* macros expand to nothing where rpm lacks them, as on Debian)
    with open(os.path.join(REPO, "packaging", "rpm", "vnethook.spec")) as f:
        spec = f.read()
    for macro in ("%systemd_post", "%systemd_preun", "%systemd_postun_with_restart"):
        line = re.search("^" + macro + " (.*)$", spec, re.M).group(1).split()
        assert "vnethook-sync.timer" in line and "vnethook-sync.service" in line, line
