"""A probe loop in the external client's netns, and the outage it saw.

tools/probe.py connects every INTERVAL seconds and logs one line per try;
the longest run of failed tries is the outage a user would have seen.
"""

from __future__ import annotations

import os
import subprocess
from typing import List, Optional, Tuple

from sandbox import PROBE, PYTHON, Sandbox, _readline_timeout


class Probe:
    def __init__(self, sb: Sandbox, ext, addr: str, port: int, interval: float = 0.05):
        self.log = os.path.join(sb.tmpdir, f"probe-{port}-{os.getpid()}-{id(self)}.log")
        self.proc = subprocess.Popen(ext.argv([PYTHON, PROBE, addr, str(port), str(interval), self.log]),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=sb._env(None))
        assert _readline_timeout(self.proc, 10).strip() == b"ready"

    def samples(self, since: float) -> List[Tuple[float, bool]]:
        with open(self.log, encoding="ascii") as f:
            out = [(float(t), ok == "1") for t, ok in (ln.split() for ln in f if ln.strip())]
        return [s for s in out if s[0] >= since]

    def failed(self, since: float, until: float) -> int:
        return sum(1 for t, ok in self.samples(since) if t <= until and not ok)

    def outage(self, since: float, done: float) -> Tuple[float, Optional[float]]:
        """(longest failed stretch, first answer after `done` - done), seconds."""
        s = self.samples(since)
        longest, start = 0.0, None
        for t, ok in s:
            if not ok and start is None:
                start = t
            elif ok and start is not None:
                longest, start = max(longest, t - start), None
        if start is not None and s:
            longest = max(longest, s[-1][0] - start)
        after = next((t for t, ok in s if ok and t >= done), None)
        return longest, (max(0.0, after - done) if after is not None else None)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
