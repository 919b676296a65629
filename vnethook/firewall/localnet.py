"""What a loopback (127.x) forward needs beyond its DNAT: route_localnet and a guard.

A host-originated connection to 127.0.0.1:P that is DNATed to a guest
still has source 127.0.0.1 when it is rerouted out of the bridge; the
kernel drops such packets unless route_localnet is on for the outgoing
device. route_localnet also lifts the kernel's martian check on *input*
from that device: every guest on the bridge could then route 127.0.0.0/8
via its gateway and reach whatever the host binds to 127.0.0.1 (libvirt's
VNC/SPICE consoles, databases, admin APIs), or send datagrams that look
like they came from 127.0.0.1 (the CVE-2020-8558 class).

So while any loopback forward exists, a guard table drops, at raw
priority (before conntrack and NAT), every packet to or from 127.0.0.0/8
that arrives on an interface other than lo. It is an nftables table of its
own (``ip vnethook_guard``) whatever backend the forwards use: created and
deleted whole, it leaves nothing behind (an iptables `raw` table would
linger in iptables-nft-save after its last rule went), and nf_tables
hooks apply next to legacy x_tables too. The replies of a loopback forward
pass: they are addressed to the bridge's own address (masqueraded) until
conntrack undoes the NAT, after the guard.

Order, so that no moment is open: the guard goes in before any bridge gets
route_localnet=1, and comes out only after every bridge got its value back.
If the guard cannot be installed, no bridge gets route_localnet=1 (the
loopback forwards then do not work, and the caller says so).

Bookkeeping fails closed: the values found before are saved in
``<state_dir>/route_localnet.json`` before a bridge is changed. If that file
is lost or corrupt, a bridge libvirt manages that is at 1 with no forward
needing it is set to 0 (libvirt never sets route_localnet; 0 is the
kernel's default). Global sysctls (`all`, `default`) and the
bridge-nf-call-* switches are never touched.
"""

from __future__ import annotations

import os

# Not `from typing import TYPE_CHECKING`: the hooks never import typing.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional

# json and the nftables binding are imported where used: `stopped` calls
# ensure() only when the state file says something may need undoing.

STATE_FILE = "route_localnet.json"
_PROC = "/proc/sys/net/ipv4/conf"
GUARD_TABLE = "vnethook_guard"
GUARD_TAG = "vnethook:guard"


class GuardError(Exception):
    """The guard table could not be installed or removed."""


# --- the guard -----------------------------------------------------------------------


def _nft():
    try:
        import nftables  # noqa: PLC0415 - lazy on purpose
    except ImportError as exc:
        raise GuardError("the nftables Python binding (Debian: python3-nftables) is missing") from exc
    ctx = nftables.Nftables()
    return ctx


def guard_commands(on: bool) -> str:
    """The one transaction that installs (or removes) the guard, idempotently."""
    lines = [f"add table ip {GUARD_TABLE}"]
    if not on:
        return "\n".join(lines + [f"delete table ip {GUARD_TABLE}"]) + "\n"
    chain = f"ip {GUARD_TABLE} prerouting"
    lines += [
        f"add chain {chain} {{ type filter hook prerouting priority raw; policy accept; }}",
        f"flush chain {chain}",
        f'add rule {chain} iifname != "lo" ip daddr 127.0.0.0/8 drop comment "{GUARD_TAG}"',
        f'add rule {chain} iifname != "lo" ip saddr 127.0.0.0/8 drop comment "{GUARD_TAG}"',
    ]
    return "\n".join(lines) + "\n"


class NftGuard:
    """The guard in this network namespace's nf_tables."""

    def set(self, on: bool) -> None:
        rc, _out, err = _nft().cmd(guard_commands(on))
        if rc != 0:
            raise GuardError(f"nft: cannot {'install' if on else 'remove'} table ip {GUARD_TABLE}: "
                             f"{(err or '').strip() or rc}")

    def present(self) -> "Optional[bool]":
        """Whether the guard is installed and whole; None if nftables cannot be asked."""
        try:
            ctx = _nft()
        except GuardError:
            return None
        rc, out, _err = ctx.cmd(f"list table ip {GUARD_TABLE}")
        if rc != 0:
            return False
        text = out or ""
        return ("hook prerouting priority raw" in text and text.count(GUARD_TAG) == 2
                and 'iifname != "lo" ip daddr 127.0.0.0/8' in text
                and 'iifname != "lo" ip saddr 127.0.0.0/8' in text)


# --- route_localnet ---------------------------------------------------------------------


def _path(bridge: str, proc: str) -> str:
    if not bridge or "/" in bridge or bridge in (".", "..", "all", "default") or len(bridge) > 15:
        raise ValueError(f"not a bridge name: {bridge!r}")
    return os.path.join(proc, bridge, "route_localnet")


def _read(path: str) -> "Optional[str]":
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


class Saved:
    """What route_localnet.json holds: the values found before, and the guard."""

    def __init__(self, values: "Dict[str, str]", guard: bool, trusted: bool):
        self.values = values
        self.guard = guard
        self.trusted = trusted  # False: the file was there but unreadable or wrong


def load(state_dir: str) -> Saved:
    path = os.path.join(state_dir, STATE_FILE)
    if not os.path.exists(path):
        return Saved({}, False, True)
    import json

    try:
        from vnethook.fsutil import distrust

        if distrust(os.lstat(path)):
            return Saved({}, True, False)
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and "saved" in data:
            values, guard = data["saved"], bool(data.get("guard"))
        else:  # the format before the guard: {bridge: value}
            values, guard = data, False
        if not isinstance(values, dict):
            raise ValueError("not a mapping")
        out = {}
        for k, v in values.items():
            _path(str(k), _PROC)  # ValueError on a name that is not a bridge
            if v not in ("0", "1"):
                raise ValueError(f"value {v!r}")
            out[str(k)] = v
        return Saved(out, guard, True)
    except (OSError, ValueError, AttributeError, TypeError):
        # Unknown what we changed, or whether the guard is ours: assume both
        # (fail closed: the bridges go back to 0, the guard goes last).
        return Saved({}, True, False)


def _store(state_dir: str, saved: Saved) -> None:
    target = os.path.join(state_dir, STATE_FILE)
    if not saved.values and not saved.guard:
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
        return
    import json

    from vnethook.fsutil import atomic_write

    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    atomic_write(target, json.dumps({"saved": saved.values, "guard": saved.guard}, sort_keys=True).encode())


def in_use(state_dir: str) -> bool:
    """Cheap: whether anything may need undoing (the state file exists)."""
    return os.path.lexists(os.path.join(state_dir, STATE_FILE))


def ensure(state_dir: str, needed: "Iterable[str]", managed: "Iterable[str]" = (),
           verify: bool = False, proc: str = _PROC, guard: "Optional[NftGuard]" = None) -> "List[str]":
    """route_localnet=1 on exactly the bridges in `needed`, guarded; the rest put back.

    `managed`: bridges libvirt manages (its running networks). When the
    saved values are lost or corrupt, or `verify` (sync), any of them at 1
    that no forward needs and that vnethook has no saved value for is set
    to 0. `verify` also checks that the guard is really there (a flushed
    ruleset) instead of trusting the state file. `guard`: where the guard
    lives (this namespace's nf_tables; tests of the bookkeeping alone pass
    a stand-in). Returns problems, in words, for the caller to log; raises
    only ValueError, for a name in `needed` that is not a bridge's.
    """
    need = set(needed)
    guard = guard or NftGuard()
    saved = load(state_dir)
    problems: List[str] = []
    if not saved.trusted:
        problems.append(f"{os.path.join(state_dir, STATE_FILE)} was unreadable: bridges of libvirt "
                        "at route_localnet=1 that no forward needs are set to 0")
    if need:
        if not saved.guard or verify or not saved.trusted:
            try:
                if verify and saved.guard and saved.trusted and guard.present():
                    pass
                else:
                    saved.guard = True
                    _store(state_dir, saved)  # recorded first: a killed run still removes it
                    guard.set(True)
            except GuardError as e:
                problems.append(f"loopback forwards on {', '.join(sorted(need))} are off: {e}")
                need = set()
    managed = set(managed)
    for bridge in sorted(need):
        path = _path(bridge, proc)
        current = _read(path)
        if current is None:
            continue  # bridge not up (yet); the next call sets it
        if bridge not in saved.values:
            # With the originals lost, a 1 found may be our own: libvirt's
            # bridges go back to the default.
            saved.values[bridge] = "0" if not saved.trusted and bridge in managed else current
            _store(state_dir, saved)  # save before writing: never lose the original
        if current != "1":
            _write(path, "1")
    for bridge in sorted(set(saved.values) - need):
        _write(_path(bridge, proc), saved.values.pop(bridge))
    if not saved.trusted or verify:
        for bridge in sorted(managed - need - set(saved.values)):
            try:
                path = _path(bridge, proc)
            except ValueError:
                continue
            if _read(path) == "1":
                _write(path, "0")
                problems.append(f"route_localnet was 1 on {bridge} with no loopback forward there: set to 0")
    if not need and saved.guard:
        try:
            guard.set(False)
            saved.guard = False
        except GuardError as e:
            problems.append(str(e))
    saved.trusted = True
    _store(state_dir, saved)
    return problems
