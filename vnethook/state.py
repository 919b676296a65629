"""The record of what vnethook installed, one small file per guest.

Teardown works from this record, never from the current config or lease,
so `stopped` removes exactly what `started` added even if the YAML changed
or the lease vanished in between. The record holds *inputs*: the forwards
applied, the backend and its layout (what its rendering is called). The
backend re-renders them on use, so no backend parses its own output back,
and a record written for another layout is simply not used (rules are
found by tag). Records of releases before this one also hold "rules" (the
rendered strings): the engine uses such a record only if its forwards
still render to exactly those strings. The record is written *before* a change
(marked pending) and again after it: if vnethook is killed in between, the
next run sees `pending` and lets the backend find the guest's rules by tag
instead of trusting the record.

A corrupt, unreadable or untrusted record is treated as lost (None), never
fatal: the firewall itself is the ground truth that sync falls back to.
Records are held to what the config is held to (fsutil.distrust: owned by
root, not group- or world-writable, no symlink), and their contents are
checked field by field before anything reaches a batch: `refused()` says
why one was not used.
"""

from __future__ import annotations

import os

from vnethook.fsutil import atomic_write, distrust
from vnethook.model import Forward

# Records are JSON through vnethook.jsonlite (the C codec without `json`,
# which imports `re`); imported where a record is read or written: the
# hook's no-op paths only ask exists().


def _path(paths, key: str) -> str:
    return os.path.join(paths.guests_dir, key + ".json")


def ensure_dirs(paths) -> None:
    os.makedirs(paths.guests_dir, mode=0o700, exist_ok=True)


def read(paths, key: str) -> dict | None:
    rec, _why = _load(paths, key)
    return rec


def refused(paths, key: str) -> str | None:
    """Why the record of `key` exists but is not used (None: fine or absent)."""
    return _load(paths, key)[1]


def _load(paths, key: str) -> "tuple[dict | None, str | None]":
    from vnethook import jsonlite as json

    path = _path(paths, key)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"{path}: {e.strerror}"
    try:
        why = distrust(os.fstat(fd))
        if why:
            return None, f"{path}: {why}"
        with os.fdopen(fd, "rb") as f:
            fd = -1
            data = json.loads(f.read(1 << 24))
    except (OSError, ValueError) as e:
        return None, f"{path}: unreadable ({e})"
    finally:
        if fd >= 0:
            os.close(fd)
    why = _shape(data, key)
    if why:
        return None, f"{path}: {why}"
    return data, None


_PARSED = "\0forwards"  # a read record's forwards as Forward objects (never written)


def _plain(v: object) -> bool:
    return isinstance(v, str) and not any(ord(c) < 32 or ord(c) == 127 for c in v)


def _shape(data: object, key: str) -> str | None:
    """The record's structure and every field that goes anywhere."""
    if not isinstance(data, dict):
        return "not a record"
    rules, fwds, waiting = data.get("rules", []), data.get("forwards", []), data.get("waiting", [])
    if not isinstance(rules, list) or not all(_plain(r) for r in rules):
        return "rules: not a list of plain strings"
    if not _plain(data.get("layout", "")):
        return "layout: not a plain string"
    if data.get("key", key) != key:
        return f"key {data.get('key')!r} is not {key!r}"
    if not isinstance(data.get("domain", ""), str):
        return "domain: not a string"
    if data.get("backend") not in (None, "", "iptables-nft", "iptables-legacy", "nftables"):
        return f"backend {data.get('backend')!r}"
    if not isinstance(data.get("pending", False), bool):
        return "pending: not a boolean"
    if not isinstance(waiting, list) or not all(_plain(w) for w in waiting):
        return "waiting: not a list of plain strings"
    if not isinstance(fwds, list):
        return "forwards: not a list"
    parsed = []
    for i, d in enumerate(fwds):
        try:
            f = Forward.from_record(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            return f"forwards[{i}]: {e}"
        if f.key != key:
            return f"forwards[{i}] belongs to {f.key}"
        parsed.append(f)
    data[_PARSED] = parsed  # forwards_of() need not check them again
    return None


def exists(paths, key: str) -> bool:
    return os.path.lexists(_path(paths, key))


def distrusted_dir(paths) -> str | None:
    """Why the state directory or its guests/ may not be trusted, or None."""
    for d in (paths.state_dir, paths.guests_dir):
        try:
            why = distrust(os.lstat(d), "directory")
        except FileNotFoundError:
            continue
        except OSError as e:
            why = e.strerror
        if why:
            return f"{d}: {why}"
    return None


def write(
    paths,
    key: str,
    domain: str,
    backend: str,
    forwards: list,
    layout: str,
    pending: bool = False,
    waiting: "list | None" = None,
) -> None:
    import time

    from vnethook import jsonlite as json

    ensure_dirs(paths)
    rec = {
        "domain": domain,
        "key": key,
        "backend": backend,
        "pending": pending,
        "forwards": [f.to_dict() for f in forwards],
        "layout": layout,
        "waiting": list(waiting or ()),
        "updated": time.time(),
    }
    atomic_write(_path(paths, key), json.dumps(rec).encode())


def any_record(paths) -> bool:
    """Whether any guest has a record (one directory listing, no reads)."""
    try:
        return any(n.endswith(".json") for n in os.listdir(paths.guests_dir))
    except OSError:
        return False


def delete(paths, key: str) -> None:
    try:
        os.unlink(_path(paths, key))
    except FileNotFoundError:
        pass


def all_records(paths) -> dict:
    """Every readable record, by key. Corrupt files are reported as None."""
    out: dict = {}
    try:
        names = os.listdir(paths.guests_dir)
    except FileNotFoundError:
        return out
    for name in names:
        if not name.endswith(".json"):
            continue
        key = name[:-5]
        out[key] = read(paths, key)
    return out


def forwards_of(record: dict | None) -> list:
    if not record:
        return []
    parsed = record.get(_PARSED)
    if parsed is not None:
        return list(parsed)
    out = []
    for d in record.get("forwards") or ():
        try:
            out.append(Forward.from_record(d))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return out


# --------------------------------------------------------------------------
# Pending removals
#
# A removal (qemu stopped/release, network port-deleted) is announced here
# *before* it takes the lock, and the mark goes once the forwards are gone.
# If the removal cannot happen (the lock is held past its timeout, the
# firewall refuses), the mark stays, and the next event that takes the lock,
# `vnethook sync` and the lease watcher retry it until it succeeds: a stopped
# guest's DNAT must not stay to catch whatever dnsmasq leases its address to
# next. Marks live apart from the records (they are written without the
# lock); {"domain": NAME, "macs": null (all) or [MAC, ...], "time": T}.


def _removal_path(paths, key: str) -> str:
    return os.path.join(paths.state_dir, "removals", key + ".json")


def mark_removal(paths, key: str, domain: str, macs: "list | None" = None) -> None:
    import time

    from vnethook import jsonlite as json

    old = removal(paths, key)
    if old is not None:
        if old.get("macs") is None or macs is None:
            macs = None  # a whole-guest removal covers any NIC's
        else:
            macs = sorted(set(old["macs"]) | set(macs))
    os.makedirs(paths.state_dir, mode=0o700, exist_ok=True)  # makedirs gives only the leaf `mode`
    os.makedirs(os.path.dirname(_removal_path(paths, key)), mode=0o700, exist_ok=True)
    rec = {"domain": domain, "macs": None if macs is None else sorted(set(macs)), "time": time.time()}
    atomic_write(_removal_path(paths, key), json.dumps(rec).encode())


def removal(paths, key: str) -> "dict | None":
    from vnethook import jsonlite as json

    try:
        with open(_removal_path(paths, key), "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"domain": key, "macs": None}  # unreadable: the whole guest, to be safe
    if not isinstance(data, dict):
        return {"domain": key, "macs": None}
    macs = data.get("macs")
    if macs is not None and not (isinstance(macs, list) and all(isinstance(m, str) for m in macs)):
        macs = None
    return {"domain": data.get("domain") if isinstance(data.get("domain"), str) else key, "macs": macs}


def removals(paths) -> dict:
    """Every pending removal, by key (one listdir when there is none)."""
    try:
        names = os.listdir(os.path.join(paths.state_dir, "removals"))
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        if name.endswith(".json"):
            rec = removal(paths, name[:-5])
            if rec is not None:
                out[name[:-5]] = rec
    return out


def clear_removal(paths, key: str) -> None:
    try:
        os.unlink(_removal_path(paths, key))
    except FileNotFoundError:
        pass
