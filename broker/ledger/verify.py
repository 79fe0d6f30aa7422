"""Offline verifier for ledger exports: needs only the standard library and ``cryptography``.

Export format (JSON Lines, UTF-8, one object per line)::

    {"kind": "entry", "index": 0, "leaf_hash": "<base64>", "entry": {...}}
    {"kind": "checkpoint", "note": "<C2SP signed note>"}
    {"kind": "key-rotation", "note": "<checkpoint with a key-rotation line, signed twice>"}

Entry lines come in index order, contiguous from 0.  The leaf of an entry is
``leaf_hash(canonical_json(entry))`` (RFC 8785), so the verifier recomputes every
leaf from the entry itself; the stored ``leaf_hash`` only pinpoints which entry
was altered.

Key rotations (``broker.ledger.key_rotation``) come first: from the one pinned
verifier key they give the keys that signed before or after it, each for its span
of tree sizes; a rotation's own tree head is checked like a checkpoint.

Checkpoint ordering rule: a checkpoint line of size ``s`` must appear *before the
entry line with index* ``s`` (i.e. anywhere up to directly after the last entry it
covers).  The exporter writes each checkpoint right after the entry that brings
the tree to its size; writing all checkpoints first is equally valid.  This lets
the verifier stream stdin once in O(log n) memory: checkpoints are buffered until
the tree reaches their size, when the root is compared.  A checkpoint whose size
was already passed cannot be checked without keeping every prefix root, so it is
reported as a problem rather than silently skipped.

The leaf is recomputed from the entry bytes of every line; with ``strict`` each entry
is also parsed and re-canonicalised, so an entry the broker committed in a
non-canonical or ambiguous form (duplicate keys) is reported too. The per-line work
is independent, so large exports are fanned out in chunks to worker processes
while the main process keeps the sequential state (tree, indices, checkpoints).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import contextlib
import hashlib
import itertools
import multiprocessing
import os
import re
import sys
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

from broker.ledger.canonical import MAX_SAFE_INT, canonical_parsed, decode_line
from broker.ledger.checkpoint import Checkpoint, CheckpointError, parse_verifier_key
from broker.ledger.key_rotation import KeyRotation, TrustedKeys, open_key_rotation
from broker.ledger.merkle import EMPTY_ROOT, StreamingTree

__all__ = [
    "MAX_PROBLEMS",
    "VerifyReport",
    "main",
    "print_report",
    "read_text_arg",
    "verify_export",
]

MAX_PROBLEMS = 100  # keeps memory bounded on a thoroughly corrupted export


# One scan result per line: (kind, value, leaf, problem).  Produced by workers.
_BLANK, _ENTRY, _CHECKPOINT, _MALFORMED, _UNKNOWN, _ROTATION = range(6)
_Scan = tuple[int, object, bytes | None, str | None]
_CHUNK = 4096  # lines per worker task
_AUTO_MAX_WORKERS = 4


# The exporter splices each stored entry's exact bytes into a fixed envelope, and the
# leaf is the hash of exactly those bytes: for such a line the per-line work is one
# regex and one sha256 (~8x cheaper than parsing and re-serialising). Integrity does
# not depend on the bytes being canonical: they are what the signed tree commits to.
# ``strict`` additionally re-canonicalises every entry (RFC 8785), which catches a
# broker that committed non-canonical or ambiguous JSON (say, duplicate keys). Any
# line that does not fit the envelope, or whose bytes do not hash to its leaf_hash,
# takes the full path, which canonicalises the entry and explains the problem.
_FAST_ENTRY = re.compile(
    rb'\{"kind":"entry","index":(0|[1-9][0-9]{0,15}),"leaf_hash":"([A-Za-z0-9+/]{43}=)",'
    rb'"entry":(\{"[^\n]*\})\}\r?\n?',
)


def _fast_entry(raw: bytes, strict: bool) -> _Scan | None:
    """The common case of an untouched export line, or None to take the full path."""
    if strict:
        return None
    m = _FAST_ENTRY.fullmatch(raw)
    if m is None:
        return None
    leaf = hashlib.sha256(b"\x00" + m.group(3)).digest()
    if binascii.b2a_base64(leaf, newline=False) != m.group(2):
        return None
    index = int(m.group(1))
    return (_ENTRY, index, leaf, None) if index <= MAX_SAFE_INT else None


def _scan_line(raw: str | bytes, strict: bool = False) -> _Scan:
    """The per-line, order-independent work: parse, canonicalise, hash, compare."""
    if isinstance(raw, bytes):
        fast = _fast_entry(raw, strict)
        if fast is not None:
            return fast
    try:
        obj = decode_line(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (ValueError, RecursionError) as exc:
        if not raw.strip():
            return (_BLANK, None, None, None)
        return (_MALFORMED, f"malformed JSON: {exc}", None, None)
    kind = obj.get("kind") if type(obj) is dict else None
    if kind == "checkpoint":
        return (_CHECKPOINT, obj.get("note"), None, None)
    if kind == "key-rotation":
        return (_ROTATION, obj.get("note"), None, None)
    if kind != "entry":
        return (_UNKNOWN, None, None, None)
    index, stored = obj.get("index"), obj.get("leaf_hash")
    try:
        entry = obj["entry"]
        if type(entry) is not dict:
            raise ValueError("entry is not an object")
        leaf = hashlib.sha256(b"\x00" + canonical_parsed(entry)).digest()
    except (KeyError, ValueError, TypeError) as exc:
        try:  # keep tree positions aligned so later checkpoints stay meaningful
            fallback = base64.b64decode(stored, validate=True) if type(stored) is str else b""
        except (ValueError, binascii.Error):
            fallback = b""
        problem = f"cannot be canonicalised: {exc}"
        return (_ENTRY, index, fallback if len(fallback) == 32 else None, problem)
    if binascii.b2a_base64(leaf, newline=False).decode("ascii") != stored:
        return (_ENTRY, index, leaf, "does not match its leaf_hash")
    return (_ENTRY, index, leaf, None)


def _scan_chunk(lines: Sequence[str | bytes] | bytes, strict: bool = False) -> list[_Scan]:
    """Scan a chunk given as lines or, cheaper to ship to a worker, as one joined blob."""
    if isinstance(lines, bytes):
        lines = lines.split(b"\n")[:-1]
    return [_scan_line(raw, strict) for raw in lines]


def _pack(chunk: list[str | bytes]) -> list[str | bytes] | bytes:
    """Join newline-terminated byte lines into one blob when that splits back exactly."""
    if all(type(raw) is bytes and raw.endswith(b"\n") for raw in chunk):
        blob = b"".join(chunk)  # type: ignore[arg-type]
        if blob.count(b"\n") == len(chunk):
            return blob
    return chunk


@dataclass
class VerifyReport:
    """Outcome of verifying an export; ``ok`` only if ``problems`` is empty."""

    ok: bool
    entries: int
    checkpoints_verified: int
    first_bad_index: int | None
    problems: list[str]
    tree_size: int
    root_hash: bytes
    #: Key hand-overs followed from the pinned key, oldest first: (tree size, new key).
    key_rotations: list[tuple[int, str]] = field(default_factory=list)


class _Run:
    """The sequential half of verification: indices, tree, checkpoints, problems."""

    def __init__(self, vkey: str, origin: str | None) -> None:
        self.keys = TrustedKeys(vkey)
        self.rotation_labels: dict[KeyRotation, str] = {}
        self.followed: list[KeyRotation] = []
        #: The auditor's saved checkpoint, checked after the rotations that lead to its key.
        self.saved: str | None = None
        self.origin = origin
        self.tree = StreamingTree()
        self.problems: list[str] = []
        self.dropped = 0
        self.first_bad: int | None = None
        self.verified = 0
        self.entries = 0
        self.expected = 0
        self.lineno = 0
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

    def apply(self, results: list[_Scan]) -> None:
        """Fold one chunk of scan results, in line order, into the state."""
        tree = self.tree
        for kind, value, leaf, problem in results:
            self.lineno += 1
            if self.saved is not None and kind not in (_ROTATION, _BLANK):
                self.add_saved()
            if kind == _ENTRY:
                self.entries += 1
                if type(value) is not int or value != self.expected:
                    self.index_problem(value)
                else:
                    self.expected += 1
                if problem is not None:
                    self.problem(f"line {self.lineno}: entry {value!r} {problem}")
                    self.bad(tree.size)
                if leaf is not None:
                    tree.append(leaf)
                    if tree.size == self.next_size:
                        self.reached()
            elif kind == _CHECKPOINT:
                self.add_checkpoint(f"checkpoint at line {self.lineno}", value)
            elif kind == _ROTATION:
                self.add_rotation(f"key rotation at line {self.lineno}", value)
            elif kind == _MALFORMED:
                self.problem(f"line {self.lineno}: {value}")
                self.bad(self.tree.size)
            elif kind == _UNKNOWN:
                self.problem(f"line {self.lineno}: not an entry, checkpoint or key-rotation line")

    def index_problem(self, index: object) -> None:
        self.bad(self.tree.size)
        if type(index) is not int:
            self.problem(f"line {self.lineno}: entry without an integer index")
            return
        what = "gap before" if index > self.expected else "duplicate or out-of-order"
        self.problem(f"line {self.lineno}: {what} index {index} (expected {self.expected})")
        self.expected = index + 1

    def add_checkpoint(self, label: str, note: object, trusted: bool = False) -> None:
        if not isinstance(note, str):
            self.problem(f"{label}: note is not a string")
            return
        try:
            cp = self.keys.open(note, self.origin)
        except CheckpointError as exc:
            self.problem(f"{label}: rejected: {exc}")
            return
        self.place(label, cp, trusted)

    def add_rotation(self, label: str, note: object) -> None:
        """Learn a key hand-over; its tree head is checked once a trusted key links it."""
        if not isinstance(note, str):
            self.problem(f"{label}: note is not a string")
            return
        try:
            rotation = open_key_rotation(note, self.origin)
            self.rotation_labels.setdefault(rotation, label)
            linked = self.keys.learn(rotation)
        except CheckpointError as exc:
            self.problem(f"{label}: rejected: {exc}")
            return
        for rot in linked:
            self.followed.append(rot)
            self.place(self.rotation_labels[rot], rot.checkpoint, False)

    def place(self, label: str, cp: Checkpoint, trusted: bool) -> None:
        """Check a verified tree head now, or once the tree reaches its size."""
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

    def add_saved(self) -> None:
        note, self.saved = self.saved, None
        self.add_checkpoint("trusted checkpoint", note, trusted=True)

    def reached(self) -> None:
        """The tree just reached ``next_size``: check the checkpoints waiting for it."""
        for label, cp, trusted in self.pending.pop(self.next_size):
            self.check(label, cp, trusted)
        self.next_size = min(self.pending) if self.pending else -1

    def check(self, label: str, cp: Checkpoint, trusted: bool) -> None:
        if cp.root_hash == self.tree.root():
            self.last_good = max(self.last_good, cp.size)
            self.verified += not trusted
        elif self.last_good >= cp.size:
            self.problem(
                f"{label}: root at size {cp.size} conflicts with another signed checkpoint "
                "of the same or larger size (the log presented a fork)"
            )
        else:
            bad = self.first_bad
            if bad is None or not self.last_good <= bad < cp.size:  # else already pinpointed
                self.bad(self.last_good)
            self.problem(
                f"{label}: root at size {cp.size} does not match the entries; "
                f"the bad entry lies in [{self.last_good}, {cp.size})"
            )

    def finish(self) -> VerifyReport:
        if self.saved is not None:
            self.add_saved()
        size = self.tree.size
        for _, waiting in sorted(self.pending.items()):
            for label, cp, trusted in waiting:
                why = " (log truncated or export incomplete)" if trusted else ""
                self.problem(f"{label}: size {cp.size} exceeds the export's {size} entries{why}")
        for rot in self.keys.unconfirmed:
            self.problem(
                f"{self.rotation_labels[rot]}: the trusted checkpoint key {rot.old_vkey} was "
                f"replaced at tree size {rot.size} without its own signature (a recovery after "
                f"it was lost); it verifies nothing later. Confirm the new key {rot.new_vkey} "
                "with the operator, out of band, then verify again with it pinned"
            )
        for rot in self.keys.unlinked:
            self.problem(
                f"{self.rotation_labels[rot]}: rejected: neither of its keys is the pinned "
                "key or reached from it by another rotation"
            )
        if self.latest < 0:
            self.problem("no valid checkpoint in the export: nothing authenticates the entries")
        elif self.latest < size:
            self.problem(f"entries [{self.latest}, {size}) are not covered by any checkpoint")
        if self.dropped:
            self.problems.append(f"... and {self.dropped} more problems")
        return VerifyReport(
            ok=not self.problems,
            entries=self.entries,
            checkpoints_verified=self.verified,
            first_bad_index=self.first_bad,
            problems=self.problems,
            tree_size=size,
            root_hash=self.tree.root(),
            key_rotations=[(r.size, r.new_vkey) for r in _in_order(self.followed)],
        )


def _in_order(rotations: list[KeyRotation]) -> list[KeyRotation]:
    """Linked rotations as the chain they form, oldest key first (sizes may tie)."""
    by_old = {r.old_vkey: r for r in rotations}
    newer = {r.new_vkey for r in rotations}
    chain: list[KeyRotation] = []
    key = next((r.old_vkey for r in rotations if r.old_vkey not in newer), None)
    while key in by_old and len(chain) < len(rotations):
        chain.append(by_old[key])
        key = by_old[key].new_vkey
    return chain


def _auto_workers() -> int:
    """Fan out only where fork is the platform default and safe (no other threads)."""
    if not sys.platform.startswith("linux") or threading.active_count() != 1:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), _AUTO_MAX_WORKERS))


def _run_parallel(
    run: _Run, first: list[str | bytes], rest: Iterable[str | bytes], n: int, strict: bool
) -> None:
    """Scan chunks in ``n`` worker processes, applying results in order with bounded lookahead."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context(method))
    inflight: collections.deque[Future[list[_Scan]]] = collections.deque()
    chunks = itertools.chain([first], iter(lambda: list(itertools.islice(rest, _CHUNK)), []))
    try:
        for chunk in chunks:
            inflight.append(pool.submit(_scan_chunk, _pack(chunk), strict))
            if len(inflight) > 2 * n:
                run.apply(inflight.popleft().result())
        while inflight:
            run.apply(inflight.popleft().result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def verify_export(
    lines: Iterable[str | bytes],
    vkey: str,
    *,
    origin: str | None = None,
    trusted_checkpoint: str | None = None,
    workers: int | None = None,
    strict: bool = False,
) -> VerifyReport:
    """Verify an export in one streaming pass; never raises on malformed input.

    ``trusted_checkpoint`` is a note the auditor saved earlier: the export's
    prefix of that size must hash to its root, proving the log only grew since.
    ``workers`` > 1 scans lines in that many processes; ``None`` picks a safe
    default and only fans out once the export exceeds one chunk. ``strict``
    re-canonicalises every entry instead of hashing untouched exported bytes, so
    an entry the broker itself committed in a non-canonical form is reported too.
    """
    try:
        parse_verifier_key(vkey)
    except CheckpointError as exc:
        return VerifyReport(False, 0, 0, None, [f"verifier key: {exc}"], 0, EMPTY_ROOT)
    run = _Run(vkey, origin)
    run.saved = trusted_checkpoint
    rest = iter(lines)
    first = list(itertools.islice(rest, _CHUNK))
    n = _auto_workers() if workers is None else workers
    if n > 1 and len(first) == _CHUNK:
        _run_parallel(run, first, rest, n, strict)
    else:
        run.apply(_scan_chunk(first, strict))
        for chunk in iter(lambda: list(itertools.islice(rest, _CHUNK)), []):
            run.apply(_scan_chunk(chunk, strict))
    return run.finish()


def read_text_arg(value: str) -> str:
    """``@FILE`` or an existing file's path reads the file (stripped); else the value."""
    path = value[1:] if value.startswith("@") else value
    if value.startswith("@") or os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    return value.strip()


def print_report(report: VerifyReport) -> int:
    """One verdict line, the first bad index and every problem; the exit status."""
    status = "OK" if report.ok else "FAILED"
    root = base64.b64encode(report.root_hash).decode("ascii")
    print(
        f"{status}: {report.entries} entries, {report.checkpoints_verified} checkpoints verified, "
        f"tree size {report.tree_size}, root {root}"
    )
    if report.first_bad_index is not None:
        print(f"first bad index: {report.first_bad_index}")
    for size, vkey in report.key_rotations:
        print(f"checkpoint key handed over at tree size {size} to {vkey}")
    if report.ok and report.key_rotations:
        print("pin the newest key above for your next audit")
    for msg in report.problems:
        print(f"  - {msg}")
    return 0 if report.ok else 1


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
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: auto)")
    parser.add_argument(
        "--strict", action="store_true", help="re-canonicalise every entry (RFC 8785), slower"
    )
    args = parser.parse_args(argv)
    try:
        vkey = read_text_arg(args.vkey)
        trusted = None
        if args.checkpoint:
            with open(args.checkpoint, "rb") as fh:
                trusted = fh.read().decode("utf-8")
        stdin = contextlib.nullcontext(sys.stdin.buffer)
        with open(args.export, "rb") if args.export != "-" else stdin as fh:
            report = verify_export(
                fh,
                vkey,
                origin=args.origin,
                trusted_checkpoint=trusted,
                workers=args.jobs,
                strict=args.strict,
            )
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return print_report(report)


if __name__ == "__main__":
    raise SystemExit(main())
