"""route_localnet on the bridges that carry a loopback (127.x) forward.

A host-originated connection to 127.0.0.1:P that we DNAT to a guest still
has source 127.0.0.1 when it is rerouted out of the bridge; the kernel drops
such packets unless route_localnet is on for the outgoing device. Turning it
on widens what the host accepts on that device, so it is set only on the
bridges that need it, only while they need it, and the value found before
is put back afterwards. Global sysctls (`all`, `default`) and the
bridge-nf-call-* switches are never touched.

The saved originals live in `<state_dir>/route_localnet.json`, so a later
process (the hook is short-lived) can restore them.
"""

from __future__ import annotations

import os

# json is imported where used: `stopped` calls ensure_localnet
# on every removal and usually has nothing to load or store.

STATE_FILE = "route_localnet.json"
_PROC = "/proc/sys/net/ipv4/conf"


def _path(bridge: str, proc: str) -> str:
    if not bridge or "/" in bridge or bridge in (".", "..", "all", "default"):
        raise ValueError(f"not a bridge name: {bridge!r}")
    return os.path.join(proc, bridge, "route_localnet")


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _write(path: str, value: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(value)
        return True
    except FileNotFoundError:
        return False  # the bridge is gone; nothing left to restore


def _load(state_dir: str) -> Dict[str, str]:
    path = os.path.join(state_dir, STATE_FILE)
    if not os.path.exists(path):
        return {}
    import json

    try:
        with open(os.path.join(state_dir, STATE_FILE)) as f:
            data = json.load(f)
        return {str(k): str(v) for k, v in data.items()}
    except (FileNotFoundError, ValueError, AttributeError):
        return {}


def _store(state_dir: str, saved: Dict[str, str]) -> None:
    target = os.path.join(state_dir, STATE_FILE)
    if not saved:
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
        return
    import json

    from vnethook.fsutil import atomic_write

    os.makedirs(state_dir, exist_ok=True)
    atomic_write(target, json.dumps(saved, sort_keys=True).encode())


def ensure_localnet(state_dir: str, bridges_needed: Iterable[str], proc: str = _PROC) -> Dict[str, str]:
    """Make route_localnet=1 exactly on `bridges_needed` (among those we manage).

    Bridges newly needed get their current value saved, then 1. Bridges no
    longer needed get their saved value back. Returns the saved originals.
    Call it with the bridges of *all* guests' loopback forwards, after the
    firewall change that adds them, or before the one that drops them
    (order does not matter for correctness, only for a brief window).
    """
    needed = set(bridges_needed)
    saved = _load(state_dir)
    changed = False
    for bridge in sorted(needed):
        path = _path(bridge, proc)
        current = _read(path)
        if current is None:
            continue  # bridge not up (yet); the next call sets it
        if bridge not in saved:
            saved[bridge] = current
            changed = True
            _store(state_dir, saved)  # save before writing: never lose the original
        if current != "1":
            _write(path, "1")
    for bridge in sorted(set(saved) - needed):
        _write(_path(bridge, proc), saved.pop(bridge))
        changed = True
    if changed:
        _store(state_dir, saved)
    return saved
