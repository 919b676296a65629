#!/usr/bin/python3
"""Drive one firewall backend from inside a test netns.

  drive.py apply BACKEND KEY STATE_DIR [--no-previous] [--inject-bad]  (Forwards JSON on stdin)
  drive.py remove BACKEND KEY STATE_DIR [--no-previous]
  drive.py snapshot BACKEND
  drive.py flush BACKEND STATE_DIR
  drive.py ensure-base BACKEND

It plays the engine's part: keeps each guest's forwards and the backend's
layout (KEY.forwards.json, KEY.layout.json: what the engine records) and
what they rendered to (KEY.record.json) in STATE_DIR, passes the recorded
forwards as `previous` (None if the layout changed, as the engine does),
and keeps route_localnet and the loopback guard in step with all guests'
loopback forwards (vnethook.firewall.localnet, as the engine does).
Prints one JSON object: {"ok": bool, "record"|"snapshot"|"error": ..., "ms": float}
where ms is the time the backend call itself took.

--inject-bad adds a rule the kernel refuses to the new set (for the
iptables renderers), to prove that a failed change leaves the old one.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from vnethook.firewall import get_backend  # noqa: E402
from vnethook.firewall.base import FirewallError  # noqa: E402
from vnethook.firewall import localnet  # noqa: E402
from vnethook.model import Forward  # noqa: E402


def _read(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def _write(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _localnet(state_dir, verify=False):
    needed = set()
    for p in glob.glob(os.path.join(state_dir, "*.forwards.json")):
        for d in _read(p, []):
            fw = Forward.from_dict(d)
            if fw.is_loopback and fw.family == 4:
                needed.add(fw.bridge)
    for problem in localnet.ensure(state_dir, needed, verify=verify):
        print(problem, file=sys.stderr)


def _previous(state_dir, key, flags, backend):
    """The forwards applied last time (what the engine's record holds), or
    None, as the engine decides: also when they were applied in another
    layout (then the rules are found by tag)."""
    if "--no-previous" in flags or _read(os.path.join(state_dir, f"{key}.layout.json")) != backend.layout:
        return None
    data = _read(os.path.join(state_dir, f"{key}.forwards.json"))
    return None if data is None else [Forward.from_dict(d) for d in data]


def _inject_bad(target):
    """Only into the rendering of `target` (the new forwards), not of `previous`."""
    from vnethook.firewall import iptables_rules as ir

    real = ir.render

    def render(forwards, *args):
        rules = real(forwards, *args)
        if rules and forwards is target:
            r = rules[0]
            rules.append(ir.Rule(r.family, "filter", ir.CHAIN_FWD, "VNETHOOK-NO-SUCH-CHAIN",
                                 comment=r.comment))
        return rules

    ir.render = render


def main(argv):
    cmd, backend_name = argv[0], argv[1]
    flags = {a for a in argv if a.startswith("--")}
    pos = [a for a in argv if not a.startswith("--")]
    backend = get_backend(backend_name)
    if "--unmarked" in flags:
        backend.marked = False  # iptables-legacy as releases before the marked layout left it
    out = {"ok": True}
    t0 = time.perf_counter()
    try:
        if cmd == "apply":
            key, state_dir = pos[2], pos[3]
            fws = [Forward.from_dict(d) for d in json.load(sys.stdin)]
            if "--inject-bad" in flags:
                _inject_bad(fws)
            rec_path = os.path.join(state_dir, f"{key}.record.json")
            previous = _previous(state_dir, key, flags, backend)
            t0 = time.perf_counter()
            record = backend.apply(key, fws, previous)
            out["ms"] = (time.perf_counter() - t0) * 1000
            _write(rec_path, record)
            _write(os.path.join(state_dir, f"{key}.layout.json"), backend.layout)
            _write(os.path.join(state_dir, f"{key}.forwards.json"), [f.to_dict() for f in fws])
            _localnet(state_dir)
            out["record"] = record
        elif cmd == "remove":
            key, state_dir = pos[2], pos[3]
            rec_path = os.path.join(state_dir, f"{key}.record.json")
            previous = _previous(state_dir, key, flags, backend)
            t0 = time.perf_counter()
            backend.remove(key, previous)
            out["ms"] = (time.perf_counter() - t0) * 1000
            for p in (rec_path, os.path.join(state_dir, f"{key}.forwards.json"),
                      os.path.join(state_dir, f"{key}.layout.json")):
                if os.path.exists(p):
                    os.unlink(p)
            _localnet(state_dir)
        elif cmd == "snapshot":
            snap = backend.snapshot()
            out["ms"] = (time.perf_counter() - t0) * 1000
            out["snapshot"] = {"guests": {k: sorted(v) for k, v in snap.guests.items()},
                               "base_ok": snap.base_ok, "problems": snap.problems}
        elif cmd == "flush":
            state_dir = pos[2]
            backend.flush()
            out["ms"] = (time.perf_counter() - t0) * 1000
            for p in glob.glob(os.path.join(state_dir, "*.json")):
                if not p.endswith("route_localnet.json"):
                    os.unlink(p)
            _localnet(state_dir)
        elif cmd == "ensure-base":
            backend.ensure_base()
            out["ms"] = (time.perf_counter() - t0) * 1000
        else:
            raise SystemExit(f"unknown command {cmd}")
    except FirewallError as e:
        out = {"ok": False, "error": str(e), "ms": (time.perf_counter() - t0) * 1000}
    print(json.dumps(out))
    return 0 if out["ok"] else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
