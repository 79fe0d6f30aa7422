"""RFC 8785 (JCS) canonical JSON, as the ledger hashes it: only the standard library.

``canonical_json`` is the reference; ``decode_line`` and ``canonical_parsed`` are the
verifier's fast path for entries read back from an export, which leaves to
``canonical_json`` only what the C encoder would order differently.
"""

from __future__ import annotations

import json
from collections.abc import Callable

__all__ = ["MAX_SAFE_INT", "canonical_json", "canonical_parsed", "decode_line"]

MAX_SAFE_INT = 2**53 - 1  # I-JSON / RFC 8785: larger integers lose precision in ECMAScript

_encode_str: Callable[[str], str] = json.encoder.encode_basestring


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _write(obj: object, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(_encode_str(obj))
    elif obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        if not -MAX_SAFE_INT <= obj <= MAX_SAFE_INT:
            raise ValueError(f"integer {obj} is outside the I-JSON safe range")
        out.append(int.__repr__(obj))
    elif isinstance(obj, float):
        raise ValueError("floats are not allowed in ledger entries")
    elif isinstance(obj, dict):
        keys = list(obj)
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(f"object key {key!r} is not a string")
        keys.sort(key=None if all(k.isascii() for k in keys) else _utf16_key)
        out.append("{")
        for i, key in enumerate(keys):
            if i:
                out.append(",")
            out.append(_encode_str(key))
            out.append(":")
            _write(obj[key], out)
        out.append("}")
    elif isinstance(obj, list | tuple):
        out.append("[")
        for i, item in enumerate(obj):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def canonical_json(obj: object) -> bytes:
    """RFC 8785 (JCS) bytes of a float-free JSON value; the ledger's hashing input.

    Keys sort by UTF-16 code units, strings escape exactly like ``JSON.stringify``.
    Floats and integers beyond +/-(2**53 - 1) raise ``ValueError`` since entries never
    hold them and their canonical form would need ECMAScript number formatting;
    lone surrogates raise ``ValueError`` because they have no UTF-8 encoding.
    """
    out: list[str] = []
    _write(obj, out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("string contains a lone surrogate") from exc


# --- fast path for parsed export lines -------------------------------------------------
# With these hooks a parsed line holds only str/int/bool/None/list/dict with unique
# keys and safe integers (other numbers become _BadNumber, which the encoder refuses),
# so the C encoder's sort_keys output is already RFC 8785 unless a key contains a
# non-BMP character (code-point vs UTF-16 order); such entries (detectable by a
# 4-byte UTF-8 sequence) take the pure-Python path.


class _BadNumber:
    """Stands in for a float or unsafe integer so the line still parses and only the
    entry holding it is reported (as non-canonicalisable) rather than the whole line."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _safe_int(text: str) -> int | _BadNumber:
    if len(text) > 15 and not -MAX_SAFE_INT <= int(text) <= MAX_SAFE_INT:
        return _BadNumber(text)
    return int(text)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate object key")
    return obj


def _no_bad_numbers(obj: object) -> object:
    if isinstance(obj, _BadNumber):
        raise ValueError(f"number {obj.text} is not an I-JSON safe integer")
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


decode_line = json.JSONDecoder(
    parse_float=_BadNumber,
    parse_int=_safe_int,
    parse_constant=_BadNumber,
    object_pairs_hook=_unique_keys,
).decode
_dump_sorted = json.JSONEncoder(
    ensure_ascii=False,
    separators=(",", ":"),
    sort_keys=True,
    check_circular=False,
    default=_no_bad_numbers,
).encode


def canonical_parsed(entry: object) -> bytes:
    """canonical_json for values produced by ``decode_line`` (C-speed common case)."""
    data = _dump_sorted(entry).encode("utf-8")  # lone surrogates raise here
    if data.isascii() or max(data) < 0xF0:
        return data
    return canonical_json(entry)
