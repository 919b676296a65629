"""Logging to the journal with structured fields, or to stderr.

Nothing ever goes to stdout: for libvirt's migrate/restore hooks stdout
*replaces the domain XML*. Without a journal, stderr ends up in libvirt's
own log, which is where an admin looks when a start fails.

systemd-python is imported only when a journal socket exists, and only its
C module, which keeps the hook fast on every event.
"""

from __future__ import annotations

import os
import sys

JOURNAL_SOCKET = "/run/systemd/journal/socket"
FIELDS = ("DOMAIN", "GUEST_ADDRESS", "HOST_PORT", "GUEST_PORT", "PROTOCOL", "ACTION", "BACKEND")

_sendv = None
_checked = False

PRIORITY = {"error": 3, "warning": 4, "info": 6, "debug": 7}


def _journal():
    global _sendv, _checked
    if not _checked:
        _checked = True
        if os.environ.get("VNETHOOK_LOG") != "stderr" and os.path.exists(JOURNAL_SOCKET):
            try:
                from systemd._journal import sendv

                _sendv = sendv
            except ImportError:
                _sendv = None
    return _sendv


def emit(level: str, message: str, **fields) -> None:
    send = _journal()
    if send is not None:
        args = [f"MESSAGE={message}", f"PRIORITY={PRIORITY.get(level, 6)}", "SYSLOG_IDENTIFIER=vnethook"]
        for k, v in fields.items():
            if v is not None:
                args.append(f"{k.upper()}={v}")
        try:
            send(*args)
            if level in ("error", "warning") and sys.stderr.isatty():
                sys.stderr.write(f"vnethook: {level}: {message}\n")
            return
        except OSError:
            pass
    extra = " ".join(f"{k.upper()}={v}" for k, v in fields.items() if v is not None)
    try:
        sys.stderr.write(f"vnethook: {level}: {message}{' [' + extra + ']' if extra else ''}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def info(message: str, **fields) -> None:
    emit("info", message, **fields)


def warning(message: str, **fields) -> None:
    emit("warning", message, **fields)


def error(message: str, **fields) -> None:
    emit("error", message, **fields)


def forward_fields(f, action: str, backend: str) -> dict:
    """The journal fields for one forward, so admins can filter by port."""
    hp = f.host_ports[0] if f.host_ports[0] == f.host_ports[1] else f"{f.host_ports[0]}-{f.host_ports[1]}"
    gp = f.guest_ports[0] if f.guest_ports[0] == f.guest_ports[1] else f"{f.guest_ports[0]}-{f.guest_ports[1]}"
    return {
        "DOMAIN": f.domain,
        "GUEST_ADDRESS": f.guest_address,
        "HOST_PORT": hp,
        "GUEST_PORT": gp,
        "PROTOCOL": f.protocol,
        "ACTION": action,
        "BACKEND": backend,
    }
