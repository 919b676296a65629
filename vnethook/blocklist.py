"""`block-guests`: the guests whose start may fail, readable without vnethook.

`on_error: block` must hold even when vnethook itself cannot run (the
package was removed or moved by a Python upgrade, a C library crashed).
The hook scripts then cannot import anything of ours, so every successful
load of the port map writes the answer to a small file that the scripts'
guard reads with plain file operations (see install.GUARD):

    # vnethook block-guests 1: ...
    web1
    db1

one domain name per line, all the map's guests when `on_error: block`,
none otherwise. Under block the header says `+metadata`: then the start of
any guest whose domain XML carries vnethook metadata fails as well. A missing file means "never loaded": nothing may fail.

It lives in /var/lib/vnethook (it must survive a reboot, unlike the state
in /run: a guest autostarted at boot with a broken install is exactly the
case it is for), or in the state dir when that was moved ($VNETHOOK_STATE_DIR: tests and
unusual installs move everything vnethook writes with that one variable).
Only `os`: the hook's hot path imports this.
"""

from __future__ import annotations

import os

DEFAULT_FILE = "/var/lib/vnethook/block-guests"
NAME = "block-guests"
HEADER = b"# vnethook block-guests 1: guests whose start fails while vnethook cannot run (on_error: block)\n"
# With on_error: block, the start of a guest whose domain XML carries
# vnethook metadata (vnethook/metadata.py) fails too; the guard finds the
# namespace's bytes in the XML on its stdin.
HEADER_METADATA = (b"# vnethook block-guests 1 +metadata: guests whose start fails while vnethook cannot run"
                   b" (on_error: block), and every guest with vnethook metadata\n")
METADATA_MARK = b"# vnethook block-guests 1 +metadata:"
MAX_SIZE = 1 << 20


def path(state_dir: "str | None" = None) -> str:
    """Where the file is (the hook scripts' guard computes the same from the
    environment): beside the state when the state dir was moved."""
    d = os.environ.get("VNETHOOK_STATE_DIR") if state_dir is None else state_dir
    if d and os.path.normpath(d) != "/run/vnethook":
        return os.path.join(d, NAME)
    return DEFAULT_FILE


def render(cfg) -> bytes:
    block = cfg.settings.on_error == "block"
    names = sorted(getattr(cfg, "_yaml", cfg).guests) if block else []
    out = [HEADER_METADATA if block else HEADER]
    for n in names:
        if "\n" in n or "\r" in n:
            continue  # libvirt refuses such names; a line per name cannot hold one
        out.append(n.encode("utf-8", "surrogateescape") + b"\n")
    return b"".join(out)


def write(paths, cfg) -> None:
    """Record what the map (just loaded successfully) says; only on change."""
    target = path(paths.state_dir)
    data = render(cfg)
    try:
        with open(target, "rb") as f:
            if f.read(MAX_SIZE + 1) == data:
                return
    except OSError:
        pass
    try:
        from vnethook.fsutil import atomic_write

        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        atomic_write(target, data, 0o644)
    except OSError as e:
        from vnethook import log

        log.warning(f"could not write {target} (on_error: block while vnethook cannot run): {e}")


def read(state_dir: "str | None" = None) -> "set | None":
    """The names (as bytes) the file lists, or None if it is missing or untrusted.

    Trusted only if it is a regular file owned by root (or us) that nobody
    else may write: otherwise anyone could block or unblock guest starts.
    """
    try:
        fd = os.open(path(state_dir), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_mode & 0o170000) != 0o100000 or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return None
        data = os.read(fd, MAX_SIZE)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not data.startswith(b"# vnethook block-guests "):
        return None
    return set(data.split(b"\n")[1:]) - {b""}


def blocks(paths, name: "str | None", data: bytes = b"") -> bool:
    """Did the last valid map say `on_error: block` for this guest? `data`:
    its domain XML, whose vnethook metadata counts under block too."""
    if not name:
        return False
    names = read(paths.state_dir)
    if names is None:
        return False
    if name.encode("utf-8", "surrogateescape") in names:
        return True
    from vnethook.hook import METADATA_NS

    return bool(data) and METADATA_NS in data and _marked(paths.state_dir)


def _marked(state_dir) -> bool:
    try:
        with open(path(state_dir), "rb") as f:
            return f.read(len(METADATA_MARK)) == METADATA_MARK
    except OSError:
        return False
