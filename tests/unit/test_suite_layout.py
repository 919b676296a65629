"""The suite's own layout: pytest imports test files by basename (no
__init__.py), so two files with one name in different directories stop the
whole run at collection. Cheaper to say so here, with both paths."""

from __future__ import annotations

import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_test_module_names_are_unique():
    seen: dict = {}
    for root, _dirs, files in os.walk(TESTS):
        for f in files:
            if f.startswith("test_") and f.endswith(".py"):
                seen.setdefault(f, []).append(os.path.relpath(os.path.join(root, f), TESTS))
    dupes = {k: v for k, v in seen.items() if len(v) > 1}
    assert not dupes, dupes
