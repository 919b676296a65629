"""A libvirt hook that records what libvirt gives hooks: argv and stdin.

Installed by capture_fixtures.py as qemu.d/ and network.d/ hooks. Each call
appends its argv to events.txt and saves stdin as NN-<kind>-<argv...>.xml,
so the fixtures are exactly what a real libvirt handed a real hook.
Usage (via the sandbox's hook wrapper): capture-hook.py KIND OUTDIR <libvirt argv>
"""

from __future__ import annotations

import fcntl
import os
import re
import sys


def main() -> int:
    kind, outdir, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    data = sys.stdin.buffer.read()
    with open(os.path.join(outdir, "events.txt"), "a+", encoding="utf-8") as ev:
        fcntl.flock(ev, fcntl.LOCK_EX)
        ev.seek(0)
        seq = sum(1 for _ in ev) + 1
        ev.write(f"{seq:02d} {kind} " + " ".join(args) + "\n")
    safe = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", a) for a in args)
    with open(os.path.join(outdir, f"{seq:02d}-{kind}-{safe}.xml"), "wb") as f:
        f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
