"""JSON for vnethook's own state files, through CPython's C codec only.

Why: `import json` imports `re` (and with it `enum`, `functools`...) to
compile a handful of patterns, a cost every hook event that changes
something paid only to read and write one small record. `_json`, the C
accelerator the json module uses, needs none of that. Same format, same
values; without `_json` (another interpreter) this is plain `json`.
Output is compact (no indent): the records are read by programs.
"""

from __future__ import annotations

try:
    import _json
except ImportError:  # pragma: no cover - CPython always has it
    _json = None  # type: ignore[assignment]


class _Context:
    """What the C scanner reads from a json.JSONDecoder: the defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}[name]


# The C types take duck-typed arguments that typeshed spells as the Python classes.
_scan = _json.make_scanner(_Context()) if _json is not None else None  # type: ignore[arg-type]
_encode = (_json.make_encoder(None, None, _json.encode_basestring_ascii, None,  # type: ignore[arg-type]
                              ":", ",", True, False, True)
           if _json is not None else None)


def loads(data: "bytes | str"):
    """Like json.loads (UTF-8 bytes or text); ValueError if it is not one JSON document.

    Only a document that parses goes through the C scanner alone: the
    scanner's errors are raised through json.decoder (it looks the error
    class up in sys.modules, and fails oddly when json was never imported),
    so anything else is parsed again by the json module, for its error.
    """
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    if _scan is not None:
        stripped = text.strip(" \t\n\r")
        try:
            value, end = _scan(stripped, 0)
            if end == len(stripped):
                return value
        except (StopIteration, ValueError, SystemError, RecursionError):
            pass
    import json

    try:
        return json.loads(text)  # json.JSONDecodeError (a ValueError): message, line, column
    except RecursionError:
        raise TooDeep("JSON nested too deeply") from None


class TooDeep(ValueError):
    """Nesting beyond the interpreter's recursion limit (json itself lets a
    RecursionError out)."""


def dumps(value) -> str:
    """Like json.dumps(value, sort_keys=True, separators=(",", ":"))."""
    if _encode is None:  # pragma: no cover
        import json

        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return "".join(_encode(value, 0))
