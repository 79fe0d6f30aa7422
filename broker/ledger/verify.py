"""Offline verifier for ledger exports: needs only the standard library and ``cryptography``.

Export format (JSON Lines, UTF-8, one object per line)::

    {"kind": "entry", "index": 0, "leaf_hash": "<base64>", "entry": {...}}
    {"kind": "checkpoint", "note": "<C2SP signed note>"}

Entry lines come in index order, contiguous from 0.  The leaf of an entry is
``leaf_hash(canonical_json(entry))`` (RFC 8785), so the verifier recomputes every
leaf from the entry itself; the stored ``leaf_hash`` only pinpoints which entry
was altered.

Checkpoint ordering rule: a checkpoint line of size ``s`` must appear *before the
entry line with index* ``s`` (i.e. anywhere up to directly after the last entry it
covers).  The exporter writes each checkpoint right after the entry that brings
the tree to its size; writing all checkpoints first is equally valid.  This lets
the verifier stream stdin once in O(log n) memory: checkpoints are buffered until
the tree reaches their size, when the root is compared.  A checkpoint whose size
was already passed cannot be checked without keeping every prefix root, so it is
reported as a problem rather than silently skipped.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from broker.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    open_checkpoint,
    parse_verifier_key,
)
from broker.ledger.merkle import StreamingTree

__all__ = ["MAX_PROBLEMS", "VerifyReport", "canonical_json", "main", "verify_export"]

MAX_SAFE_INT = 2**53 - 1  # I-JSON / RFC 8785: larger integers lose precision in ECMAScript
MAX_PROBLEMS = 100  # keeps memory bounded on a thoroughly corrupted export

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
# json.loads with these hooks can only yield str/int/bool/None/list/dict with safe
# integers and unique keys, so the C encoder's sort_keys output is already RFC 8785
# unless a key contains a non-BMP character (code-point vs UTF-16 order); such
# entries (detectable by a 4-byte UTF-8 sequence) take the pure-Python path.


def _reject_float(text: str) -> object:
    raise ValueError(f"non-integer number {text}")


def _safe_int(text: str) -> int:
    value = int(text)
    if len(text) > 15 and not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        raise ValueError(f"integer {text} is outside the I-JSON safe range")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate object key")
    return obj


_decode_line = json.JSONDecoder(
    parse_float=_reject_float,
    parse_int=_safe_int,
    parse_constant=_reject_float,
    object_pairs_hook=_unique_keys,
).decode
_dump_sorted = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, check_circular=False
).encode


def _canonical_parsed(entry: object) -> bytes:
    """canonical_json for values produced by ``_decode_line`` (C-speed common case)."""
    data = _dump_sorted(entry).encode("utf-8")  # lone surrogates raise here
    if data.isascii() or max(data) < 0xF0:
        return data
    return canonical_json(entry)


@dataclass
class VerifyReport:
    """Outcome of verifying an export; ``ok`` only if ``problems`` is empty."""

    ok: bool
    entries: int
    checkpoints_verified: int
    first_bad_index: int | None
    problems: list[str] = field(default_factory=list)
    tree_size: int = 0
    root_hash: bytes = b""


class _Run:
    """Mutable verification state; split out so the per-line loop stays flat."""

    def __init__(self, vkey: str, origin: str | None) -> None:
        self.vkey = vkey
        self.origin = origin
        self.tree = StreamingTree()
        self.problems: list[str] = []
        self.dropped = 0
        self.first_bad: int | None = None
        self.verified = 0
        self.last_good = 0  # size of the last checkpoint whose root matched
        self.latest = -1  # largest size among validly signed export checkpoints
        self.pending: dict[int, list[tuple[str, Checkpoint, bool]]] = {}
        self.next_size = -1

    def problem(self, msg: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(msg)
        else:
            self.dropped += 1

    def bad(self, index: int) -> None:
        if self.first_bad is None or index < self.first_bad:
            self.first_bad = index

    def add_checkpoint(self, label: str, note: object, trusted: bool = False) -> None:
        if not isinstance(note, str):
            self.problem(f"{label}: note is not a string")
            return
        try:
            cp = open_checkpoint(note, self.vkey, self.origin)
        except CheckpointError as exc:
            self.problem(f"{label}: rejected: {exc}")
            return
        if self.origin is None:
            self.origin = cp.origin  # all checkpoints must then be for the same log
        if not trusted:
            self.latest = max(self.latest, cp.size)
        size = self.tree.size
        if cp.size == size:
            self.check(label, cp, trusted)
        elif cp.size > size:
            self.pending.setdefault(cp.size, []).append((label, cp, trusted))
            self.next_size = min(self.pending)
        else:
            self.problem(
                f"{label}: checkpoint of size {cp.size} appears after entry {cp.size}; "
                "checkpoint lines must precede the entry whose index equals their size"
            )

    def reached(self) -> None:
        """The tree just reached ``next_size``: check the checkpoints waiting for it."""
        for label, cp, trusted in self.pending.pop(self.next_size):
            self.check(label, cp, trusted)
        self.next_size = min(self.pending) if self.pending else -1

    def check(self, label: str, cp: Checkpoint, trusted: bool) -> None:
        if cp.root_hash == self.tree.root():
            self.last_good = max(self.last_good, cp.size)
            if not trusted:
                self.verified += 1
            return
        if self.last_good >= cp.size:
            self.problem(
                f"{label}: root at size {cp.size} differs from another signed checkpoint "
                "of the same or larger size (the log presented a fork)"
            )
            return
        self.bad(self.last_good)
        self.problem(
            f"{label}: root at size {cp.size} does not match the entries; "
            f"the bad entry lies in [{self.last_good}, {cp.size})"
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def verify_export(
    lines: Iterable[str | bytes],
    vkey: str,
    *,
    origin: str | None = None,
    trusted_checkpoint: str | None = None,
) -> VerifyReport:
    """Verify an export in one streaming pass; never raises on malformed input.

    ``trusted_checkpoint`` is a note the auditor saved earlier: the export's
    prefix of that size must hash to its root, proving the log only grew since.
    """
    try:
        parse_verifier_key(vkey)
    except CheckpointError as exc:
        return VerifyReport(False, 0, 0, None, [f"verifier key: {exc}"], 0, b"")
    run = _Run(vkey, origin)
    if trusted_checkpoint is not None:
        run.add_checkpoint("trusted checkpoint", trusted_checkpoint, trusted=True)
    tree = run.tree
    append = tree.append
    sha256 = hashlib.sha256
    b2a = binascii.b2a_base64
    entries = 0
    expected = 0
    for lineno, raw in enumerate(lines, 1):
        try:
            obj = _decode_line(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (ValueError, RecursionError) as exc:
            if not raw.strip():
                continue  # blank lines carry nothing
            run.problem(f"line {lineno}: malformed JSON: {exc}")
            run.bad(tree.size)
            continue
        kind = obj.get("kind") if type(obj) is dict else None
        if kind == "entry":
            entries += 1
            index = obj.get("index")
            stored = obj.get("leaf_hash")
            if type(index) is not int:
                run.problem(f"line {lineno}: entry without an integer index")
                run.bad(tree.size)
            elif index != expected:
                what = "gap before" if index > expected else "duplicate or out-of-order"
                run.problem(f"line {lineno}: {what} index {index} (expected {expected})")
                run.bad(tree.size)
                expected = index + 1
            else:
                expected += 1
            try:
                entry = obj["entry"]
                if type(entry) is not dict:
                    raise ValueError("entry is not an object")
                leaf = sha256(b"\x00" + _canonical_parsed(entry)).digest()
            except (KeyError, ValueError, TypeError) as exc:
                run.problem(f"line {lineno}: entry {index!r} cannot be canonicalised: {exc}")
                run.bad(tree.size)
                try:  # keep tree positions aligned so later checkpoints stay meaningful
                    leaf = base64.b64decode(stored, validate=True) if type(stored) is str else b""
                except (ValueError, binascii.Error):
                    leaf = b""
                if len(leaf) != 32:
                    continue
            else:
                if b2a(leaf, newline=False).decode("ascii") != stored:
                    run.problem(f"line {lineno}: entry {index!r} does not match its leaf_hash")
                    run.bad(tree.size)
            append(leaf)
            if tree.size == run.next_size:
                run.reached()
        elif kind == "checkpoint":
            run.add_checkpoint(f"checkpoint at line {lineno}", obj.get("note"))
        else:
            run.problem(f"line {lineno}: not an entry or checkpoint line")
    size = tree.size
    for pending in sorted(run.pending):
        for label, cp, trusted in run.pending[pending]:
            if trusted:
                run.problem(
                    f"{label}: size {cp.size} exceeds the export's {size} entries "
                    "(log truncated or export incomplete)"
                )
            else:
                run.problem(f"{label}: size {cp.size} exceeds the export's {size} entries")
    if run.latest < 0:
        run.problem("no valid checkpoint in the export: nothing authenticates the entries")
    elif run.latest < size:
        run.problem(f"entries [{run.latest}, {size}) are not covered by any checkpoint")
    if run.dropped:
        run.problems.append(f"... and {run.dropped} more problems")
    return VerifyReport(
        ok=not run.problems,
        entries=entries,
        checkpoints_verified=run.verified,
        first_bad_index=run.first_bad,
        problems=run.problems,
        tree_size=size,
        root_hash=tree.root(),
    )


def _read_text_arg(value: str) -> str:
    """A literal value, or the stripped contents if ``value`` names an existing file."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as fh:
            return fh.read().strip()
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m broker.ledger.verify EXPORT --vkey VKEY``: print a report, return 0/1."""
    parser = argparse.ArgumentParser(
        prog="python -m broker.ledger.verify",
        description="Verify a ledger export offline against the log's verifier key.",
    )
    parser.add_argument("export", help="JSONL export file, or - for stdin")
    parser.add_argument("--vkey", required=True, help="verifier key, or a file holding it")
    parser.add_argument("--checkpoint", help="a signed checkpoint saved by the auditor earlier")
    parser.add_argument("--origin", help="expected log origin line")
    args = parser.parse_args(argv)
    try:
        vkey = _read_text_arg(args.vkey)
        trusted = None
        if args.checkpoint:
            with open(args.checkpoint, "rb") as fh:
                trusted = fh.read().decode("utf-8")
        if args.export == "-":
            report = verify_export(
                sys.stdin.buffer, vkey, origin=args.origin, trusted_checkpoint=trusted
            )
        else:
            with open(args.export, "rb") as fh:
                report = verify_export(fh, vkey, origin=args.origin, trusted_checkpoint=trusted)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    status = "OK" if report.ok else "FAILED"
    print(
        f"{status}: {report.entries} entries, {report.checkpoints_verified} checkpoints verified, "
        f"tree size {report.tree_size}, root {_b64(report.root_hash)}"
    )
    if report.first_bad_index is not None:
        print(f"first bad index: {report.first_bad_index}")
    for msg in report.problems:
        print(f"  - {msg}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
