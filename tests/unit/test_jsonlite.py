"""vnethook.jsonlite against the json module: the same documents, the same
values, the same refusals (records written by earlier releases, indented,
must still load; anything that is not one JSON document is a ValueError)."""

from __future__ import annotations

import json
import math

import pytest
from fresh import run
from hypothesis import given, settings
from hypothesis import strategies as st

from vnethook import jsonlite

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_dumps_is_json_dumps_and_loads_inverts_it(v):
    out = jsonlite.dumps(v)
    assert out == json.dumps(v, sort_keys=True, separators=(",", ":"))
    assert jsonlite.loads(out) == v and jsonlite.loads(out.encode()) == v
    indented = json.dumps(v, indent=1, sort_keys=True)  # how earlier releases wrote records
    assert jsonlite.loads(indented + "\n") == json.loads(indented)


@pytest.mark.parametrize("bad", ["", " ", "{", "{} x", "[1,]", "nul", "{'a': 1}", '{"a" 1}', "[1] [2]",
                                 '"\\ud800', "\x00"])
def test_what_json_refuses_is_a_value_error(bad):
    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ValueError):
        jsonlite.loads(bad)


def test_deep_nesting_is_a_value_error_too():
    # (json itself lets the RecursionError out)
    with pytest.raises(ValueError):
        jsonlite.loads("[" * 100000)


def test_constants_and_bytes():
    assert math.isnan(jsonlite.loads(b'{"x": NaN}')["x"])
    assert jsonlite.loads('[Infinity, -Infinity, 1e5, -3]') == [math.inf, -math.inf, 100000.0, -3]
    with pytest.raises(ValueError):
        jsonlite.loads(b"\xff")


def test_importing_it_imports_neither_json_nor_re():
    code = "import sys; import vnethook.jsonlite; print(sorted({'json', 're'} & set(sys.modules)))"
    out = run(code, site=False).strip()
    assert out == "[]"


def test_refusals_in_a_process_that_never_imported_json():
    """The C scanner raises its errors through json.decoder, which it only
    finds in sys.modules: without the json module loaded (the hook's case),
    a malformed record must still be a ValueError, not a SystemError."""
    code = ("from vnethook import jsonlite\n"
            "out = []\n"
            "for bad in ['', '{', '[1,', '{\"a\" 1}', '\\x00', '[' * 100000, '{} x', b'\\xff']:\n"
            "    try:\n"
            "        jsonlite.loads(bad)\n"
            "        out.append('accepted')\n"
            "    except ValueError:\n"
            "        out.append('ValueError')\n"
            "    except BaseException as e:\n"
            "        out.append(type(e).__name__)\n"
            "print(out, jsonlite.loads('{\"ok\": [1]}'))\n")
    out = run(code, site=False).strip()
    assert out == str(["ValueError"] * 8) + " {'ok': [1]}"
