"""The status-file cache of libvirt.running_domains (libvirt._DomainCache).

sync reads one status file per running guest; the cache lets an unchanged
file go unparsed. What must hold: a cached answer is exactly what parsing
gives; any change of the file (libvirt replaces it by rename, or an edit in
place) is seen; a file written within the clock's racy window is never
cached; metadata is still read from the file when asked for; a cache that
is corrupt, foreign-owned or writable by others is ignored, never an error.
"""

from __future__ import annotations

import marshal
import os
import shutil
import time

import pytest

from vnethook import libvirt as L
from vnethook.paths import Paths

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "libvirt-11.3")
OLD = time.time() - 3600


@pytest.fixture
def tree(tmp_path):
    paths = Paths(config=str(tmp_path / "etc"), libvirt_root=str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    os.makedirs(paths.running_domains_dir)
    os.makedirs(paths.state_dir, mode=0o700)
    for i, src in enumerate(("run-qemu-web1.xml", "run-qemu-web1-2nics.xml")):
        _place(paths, f"g{i}.xml", open(os.path.join(FIX, src), "rb").read().replace(b"<name>web1</name>", f"<name>g{i}</name>".encode()))
    return paths


def _place(paths, name, data, mtime=OLD):
    path = os.path.join(paths.running_domains_dir, name)
    tmp = path + ".new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.utime(tmp, (mtime, mtime))
    os.replace(tmp, path)  # as libvirt does: a new inode
    return path


def _parses(monkeypatch):
    seen = []
    real = L.parse_domain

    def counting(data, source="stdin"):
        seen.append(os.path.basename(source))
        return real(data, source)

    monkeypatch.setattr(L, "parse_domain", counting)
    return seen


def test_unchanged_files_come_from_the_cache_and_equal_a_parse(tree, monkeypatch):
    uncached = L.running_domains(tree.running_domains_dir)  # a directory: no cache
    assert not os.path.exists(tree.domains_cache)
    first = L.running_domains(tree)
    assert first == uncached and [d.name for d in first] == ["g0", "g1"]
    assert os.stat(tree.domains_cache).st_mode & 0o777 == 0o600
    seen = _parses(monkeypatch)
    assert L.running_domains(tree) == uncached
    assert seen == []


def test_a_replaced_or_edited_file_is_read_again(tree, monkeypatch):
    L.running_domains(tree)
    seen = _parses(monkeypatch)
    path = os.path.join(tree.running_domains_dir, "g0.xml")
    data = open(path, "rb").read()
    # same size and mtime, new inode (libvirt's rename): another MAC
    _place(tree, "g0.xml", data.replace(b"52:54:00:e2:00:01", b"52:54:00:e2:00:09"))
    doms = {d.name: d for d in L.running_domains(tree)}
    assert seen == ["g0.xml"]
    assert doms["g0"].interfaces[0].mac == "52:54:00:e2:00:09"
    # edited in place, mtime put back: ctime still moves
    with open(path, "r+b") as f:
        f.write(data)  # the first MAC again, same size
    os.utime(path, (OLD, OLD))
    seen.clear()
    doms = {d.name: d for d in L.running_domains(tree)}
    assert seen == ["g0.xml"] and doms["g0"].interfaces[0].mac == "52:54:00:e2:00:01"


def test_a_fresh_file_is_not_cached_and_a_gone_one_is_dropped(tree, monkeypatch):
    _place(tree, "new.xml", open(os.path.join(FIX, "run-qemu-web1.xml"), "rb").read(), mtime=time.time())
    L.running_domains(tree)
    seen = _parses(monkeypatch)
    L.running_domains(tree)
    assert seen == ["new.xml"]
    os.unlink(os.path.join(tree.running_domains_dir, "g1.xml"))
    assert [d.name for d in L.running_domains(tree)] == ["g0", "web1"]
    _, entries = marshal.loads(open(tree.domains_cache, "rb").read())
    assert sorted(os.path.basename(p) for p in entries) == ["g0.xml"]


def test_metadata_is_read_from_the_file_when_asked(tree):
    path = os.path.join(tree.running_domains_dir, "g0.xml")
    data = open(path, "rb").read()
    meta = (b"<metadata><vnethook:ports xmlns:vnethook='http://vnethook.org/xmlns/ports/1.0'>"
            b"<vnethook:forward>8080:80</vnethook:forward></vnethook:ports></metadata>")
    _place(tree, "g0.xml", data.replace(b"</uuid>", b"</uuid>" + meta, 1))
    for _ in range(2):
        found: list = []
        L.running_domains(tree, metadata=found)
        assert [os.path.basename(p) for _, p in found] == ["g0.xml"] and b"8080:80" in found[0][0]


@pytest.mark.parametrize("spoil", ["garbage", "group-writable", "symlink", "other format", "fifo"])
def test_a_bad_cache_is_a_miss_never_an_error(tree, monkeypatch, spoil, tmp_path):
    expected = L.running_domains(tree)
    c = tree.domains_cache
    if spoil == "garbage":
        open(c, "wb").write(b"\x00not marshal")
    elif spoil == "group-writable":
        os.chmod(c, 0o620)
    elif spoil == "symlink":
        shutil.move(c, tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", c)
    elif spoil == "fifo":
        os.unlink(c)
        os.mkfifo(c, 0o600)  # must not block the reader
    else:
        open(c, "wb").write(marshal.dumps((99, {})))
    seen = _parses(monkeypatch)
    assert L.running_domains(tree) == expected
    assert sorted(seen) == ["g0.xml", "g1.xml"]
