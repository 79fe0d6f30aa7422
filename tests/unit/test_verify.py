"""Tests for RFC 8785 canonical JSON and the offline export verifier (broker.ledger.verify)."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.ledger import canonical
from broker.ledger import verify as v
from broker.ledger.checkpoint import Checkpoint, sign_checkpoint, verifier_key
from broker.ledger.merkle import StreamingTree, leaf_hash

ORIGIN = "broker.example/ledger"
KEY = Ed25519PrivateKey.from_private_bytes(b"k" * 32)
OTHER = Ed25519PrivateKey.from_private_bytes(b"o" * 32)
VKEY = verifier_key(ORIGIN, KEY.public_key())
MAX = 2**53 - 1

# --- canonical JSON --------------------------------------------------------------------------

_chars = st.characters(codec="utf-8")  # every scalar value, incl. controls and non-BMP
_keys = st.text(
    st.one_of(_chars, st.sampled_from('\x00\x1f\x7f"\\\ue000\uffff\U0001f600\U00010000a')),
    max_size=6,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-MAX, MAX) | st.text(_chars, max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_keys, inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_canonical_json_matches_rfc8785(value: Any) -> None:
    expected = rfc8785.dumps(value)
    assert canonical.canonical_json(value) == expected
    # the verifier's fast path over re-parsed text must agree too
    reparsed = canonical.decode_line(json.dumps({"entry": value}))["entry"]
    assert canonical.canonical_parsed(reparsed) == expected


def test_canonical_json_known_answers() -> None:
    assert (
        canonical.canonical_json({"b": [1, True, None], "a": "x"}) == b'{"a":"x","b":[1,true,null]}'
    )
    # UTF-16 order puts U+1F600 (D83D DE00) before U+E000, unlike code-point order
    obj = {"\ue000": 1, "\U0001f600": 2, "a": 0}
    assert canonical.canonical_json(obj) == '{"a":0,"\U0001f600":2,"\ue000":1}'.encode()
    assert canonical.canonical_parsed(obj) == canonical.canonical_json(obj)
    assert canonical.canonical_json('\x00\x08\t\n\x0c\r\x1f\x7f\u2028"\\/') == (
        b'"\\u0000\\b\\t\\n\\f\\r\\u001f\x7f\xe2\x80\xa8\\"\\\\/"'
    )
    assert canonical.canonical_json([MAX, -MAX, 0]) == b"[9007199254740991,-9007199254740991,0]"


@pytest.mark.parametrize("bad", [1.0, [0.5], {"a": float("nan")}, MAX + 1, -MAX - 1, "\ud800"])
def test_canonical_json_rejects_values(bad: object) -> None:
    with pytest.raises(ValueError):
        canonical.canonical_json(bad)


@pytest.mark.parametrize("bad", [{1: "a"}, {"a": b"bytes"}, {"a": {1, 2}}])
def test_canonical_json_rejects_types(bad: object) -> None:
    with pytest.raises(TypeError):
        canonical.canonical_json(bad)


@pytest.mark.parametrize(
    "text", ['{"a": 1.0}', '{"a": [1e3]}', '{"a": NaN}', '{"a": 9007199254740992}', '{"a": -0.0}']
)
def test_fast_path_rejects_numbers(text: str) -> None:
    with pytest.raises(ValueError, match="number"):
        canonical.canonical_parsed(canonical.decode_line(text))


def test_line_decoder_rejects_duplicate_keys() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        canonical.decode_line('{"a": {"b": 1, "b": 2}}')


# --- export builder ----------------------------------------------------------------------------


def entry(i: int) -> dict[str, object]:
    return {
        "seq": i,
        "actor": {"agency": f"agency-{i % 5}", "role": "caseworker"},
        "fields": ["name", "dob"][: i % 3],
        "purpose": "safety planning \u00e9\U0001f6e1",
        "ok": i % 2 == 0,
        "ref": None,
    }


def entry_line(i: int, e: dict[str, object] | None = None, leaf: bytes | None = None) -> str:
    e = entry(i) if e is None else e
    leaf = leaf_hash(canonical.canonical_json(e)) if leaf is None else leaf
    obj = {"kind": "entry", "index": i, "leaf_hash": base64.b64encode(leaf).decode(), "entry": e}
    return json.dumps(obj, ensure_ascii=False)


def cp_line(size: int, root: bytes, key: Ed25519PrivateKey = KEY, origin: str = ORIGIN) -> str:
    note = sign_checkpoint(Checkpoint(origin, size, root), ORIGIN, key)
    return json.dumps({"kind": "checkpoint", "note": note})


def roots(n: int, entries: dict[int, dict[str, object]] | None = None) -> dict[int, bytes]:
    tree = StreamingTree()
    out = {0: tree.root()}
    for i in range(n):
        e = (entries or {}).get(i, entry(i))
        tree.append(leaf_hash(canonical.canonical_json(e)))
        out[i + 1] = tree.root()
    return out


N = 200
CPS = (50, 100, 150, 200)
ROOTS = roots(N)


def export(n: int = N, cps: tuple[int, ...] = CPS) -> list[str]:
    """Entries 0..n-1 with each checkpoint written right after the entry it completes."""
    lines = [cp_line(0, ROOTS[0])] if 0 in cps else []
    for i in range(n):
        lines.append(entry_line(i))
        if i + 1 in cps:
            lines.append(cp_line(i + 1, ROOTS[i + 1]))
    return lines


def line_of(lines: list[str], index: int) -> int:
    return next(k for k, line in enumerate(lines) if f'"index": {index},' in line)


# --- verify_export ---------------------------------------------------------------------------


def test_clean_export_verifies() -> None:
    report = v.verify_export(export(), VKEY, origin=ORIGIN)
    assert report.ok, report.problems
    assert (report.entries, report.tree_size, report.checkpoints_verified) == (N, N, 4)
    assert report.first_bad_index is None and report.root_hash == ROOTS[N]


def test_bytes_lines_and_checkpoints_first() -> None:
    lines = export()
    cps = [line for line in lines if '"checkpoint"' in line]
    rest = [line for line in lines if '"checkpoint"' not in line]
    report = v.verify_export([(line + "\n").encode() for line in cps + rest + [""]], VKEY)
    assert report.ok, report.problems
    assert report.checkpoints_verified == 4


def test_tampered_entry_value_is_pinpointed() -> None:
    lines = export()
    k = line_of(lines, 57)
    obj = json.loads(lines[k])
    obj["entry"]["actor"]["role"] = "police"
    lines[k] = json.dumps(obj)
    report = v.verify_export(lines, VKEY)
    assert not report.ok and report.first_bad_index == 57
    assert any(f"line {k + 1}: entry 57 does not match" in p for p in report.problems)


def test_consistent_tamper_is_bounded_by_checkpoints() -> None:
    lines = export()
    e = entry(57) | {"purpose": "forged"}
    lines[line_of(lines, 57)] = entry_line(57, e)
    report = v.verify_export(lines, VKEY)
    assert not report.ok and report.first_bad_index == 50
    assert report.checkpoints_verified == 1  # only size 50 still matches
    assert any("lies in [50, 100)" in p for p in report.problems)


def test_tamper_before_first_checkpoint() -> None:
    lines = export()
    lines[line_of(lines, 3)] = entry_line(3, entry(3) | {"ref": "x"})
    report = v.verify_export(lines, VKEY)
    assert report.first_bad_index == 0
    assert any("lies in [0, 50)" in p for p in report.problems)


def test_gap_and_duplicate() -> None:
    lines = export()
    del lines[line_of(lines, 120)]
    report = v.verify_export(lines, VKEY)
    assert not report.ok and report.first_bad_index == 120
    assert any("gap before index 121 (expected 120)" in p for p in report.problems)

    lines = export()
    k = line_of(lines, 120)
    lines.insert(k, lines[k])
    report = v.verify_export(lines, VKEY)
    assert report.first_bad_index == 121
    assert any("duplicate or out-of-order index 120 (expected 121)" in p for p in report.problems)


def test_bad_checkpoint_signature() -> None:
    lines = export()
    k = next(k for k, line in enumerate(lines) if '"checkpoint"' in line)
    obj = json.loads(lines[k])
    body, sig = obj["note"].split("\n\n")
    name, b64 = sig.rstrip("\n").rsplit(" ", 1)
    blob = bytearray(base64.b64decode(b64))
    blob[-1] ^= 1
    obj["note"] = f"{body}\n\n{name} {base64.b64encode(bytes(blob)).decode()}\n"
    lines[k] = json.dumps(obj)
    report = v.verify_export(lines, VKEY)
    assert not report.ok and report.checkpoints_verified == 3
    assert report.first_bad_index is None
    assert any(f"line {k + 1}" in p and "invalid signature" in p for p in report.problems)


def test_checkpoint_from_other_key_or_origin() -> None:
    lines = export()
    lines.append(cp_line(N, ROOTS[N], key=OTHER))
    assert "not signed" in " ".join(v.verify_export(lines, VKEY).problems)
    lines = export()
    lines.insert(0, cp_line(N, ROOTS[N], origin="other.example/log"))
    report = v.verify_export(lines, VKEY)
    assert not report.ok  # first checkpoint fixes the origin; the rest then mismatch
    report = v.verify_export(export(), VKEY, origin="other.example/log")
    assert not report.ok and report.checkpoints_verified == 0


def test_trusted_checkpoint() -> None:
    saved = sign_checkpoint(Checkpoint(ORIGIN, 80, ROOTS[80]), ORIGIN, KEY)
    assert v.verify_export(export(), VKEY, trusted_checkpoint=saved).ok
    forked = roots(N, {70: entry(70) | {"seq": -1}})
    saved = sign_checkpoint(Checkpoint(ORIGIN, 80, forked[80]), ORIGIN, KEY)
    report = v.verify_export(export(), VKEY, trusted_checkpoint=saved)
    assert not report.ok and report.first_bad_index == 50
    assert any("trusted checkpoint" in p and "[50, 80)" in p for p in report.problems)
    future = sign_checkpoint(Checkpoint(ORIGIN, N + 5, ROOTS[N]), ORIGIN, KEY)
    report = v.verify_export(export(), VKEY, trusted_checkpoint=future)
    assert any("truncated" in p for p in report.problems)
    report = v.verify_export(export(), VKEY, trusted_checkpoint="garbage")
    assert any("trusted checkpoint: rejected" in p for p in report.problems)


def test_fork_at_same_size() -> None:
    lines = export()
    forked = roots(N, {10: entry(10) | {"seq": -1}})
    lines.insert(line_of(lines, 50), cp_line(50, forked[50]))  # right after the real one
    report = v.verify_export(lines, VKEY)
    assert not report.ok
    assert any("fork" in p for p in report.problems)


def test_checkpoint_placement_and_coverage() -> None:
    lines = export()
    lines.append(cp_line(120, ROOTS[120]))  # after its size was passed: cannot be checked
    assert any("must precede" in p for p in v.verify_export(lines, VKEY).problems)
    report = v.verify_export(export(cps=(50, 100)), VKEY)
    assert any("entries [100, 200) are not covered" in p for p in report.problems)
    report = v.verify_export(export(cps=()), VKEY)
    assert any("no valid checkpoint" in p for p in report.problems)
    lines = [cp_line(N, ROOTS[N]), *export(n=150, cps=(50, 100, 150))]
    report = v.verify_export(lines, VKEY)
    assert any("line 1: size 200 exceeds the export's 150" in p for p in report.problems)
    assert v.verify_export(export(n=0, cps=(0,)), VKEY).ok


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "not an entry, checkpoint or key-rotation"),
        ('{"kind": "other"}', "not an entry, checkpoint or key-rotation"),
        ('{"kind": "checkpoint", "note": 5}', "note is not a string"),
    ],
)
def test_malformed_lines(bad: str, needle: str) -> None:
    lines = export()
    lines.insert(10, bad)
    report = v.verify_export(lines, VKEY)
    assert not report.ok
    assert any("line 11:" in p and needle in p for p in report.problems)


def test_malformed_entries_pinpointed() -> None:
    lines = export()
    obj = json.loads(lines[line_of(lines, 33)])
    obj["entry"]["seq"] = 33.0
    lines[line_of(lines, 33)] = json.dumps(obj)
    report = v.verify_export(lines, VKEY)
    assert report.first_bad_index == 33
    assert any("cannot be canonicalised" in p for p in report.problems)
    assert report.checkpoints_verified == 4  # stored leaf keeps positions aligned

    lines = export()
    obj = json.loads(lines[line_of(lines, 34)])
    obj["index"] = "34"
    lines[line_of(lines, 34)] = json.dumps(obj)
    report = v.verify_export(lines, VKEY)
    assert report.first_bad_index == 34
    assert any("without an integer index" in p for p in report.problems)


def test_problem_list_is_bounded() -> None:
    lines = export() + ["nope"] * (v.MAX_PROBLEMS + 50)
    report = v.verify_export(lines, VKEY)
    assert len(report.problems) == v.MAX_PROBLEMS + 1
    assert report.problems[-1].startswith("... and ")


def test_invalid_vkey() -> None:
    report = v.verify_export(export(), "not a key")
    assert not report.ok and "verifier key" in report.problems[0]


def test_parallel_matches_sequential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v, "_CHUNK", 16)
    lines = export()
    lines[line_of(lines, 57)] = entry_line(57, entry(57) | {"ref": 1})
    lines[line_of(lines, 140)] = entry_line(140, leaf=b"\x00" * 32)
    seq = v.verify_export([x.encode() + b"\n" for x in lines], VKEY, workers=1)
    par = v.verify_export([x.encode() + b"\n" for x in lines], VKEY, workers=2)
    assert par == seq and par.first_bad_index == 50 and len(par.problems) == 4
    assert "line 143: entry 140 does not match its leaf_hash" in par.problems
    assert v.verify_export(export(), VKEY, workers=2).ok


# --- command line ----------------------------------------------------------------------------


def test_main_on_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "export.jsonl"
    path.write_text("\n".join(export()) + "\n", encoding="utf-8")
    vkey_file = tmp_path / "log.vkey"
    vkey_file.write_text(VKEY + "\n")
    saved = tmp_path / "saved.note"
    saved.write_text(sign_checkpoint(Checkpoint(ORIGIN, 100, ROOTS[100]), ORIGIN, KEY))
    argv = [str(path), "--vkey", VKEY, "--checkpoint", str(saved), "--origin", ORIGIN]
    assert v.main(argv) == 0
    assert capsys.readouterr().out.startswith("OK: 200 entries, 4 checkpoints verified")
    assert v.main([str(path), "--vkey", str(vkey_file)]) == 0
    capsys.readouterr()

    lines = export()
    lines[line_of(lines, 7)] = entry_line(7, entry(7) | {"ref": "changed"})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert v.main([str(path), "--vkey", VKEY]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED") and "first bad index: 0" in out and "[0, 50)" in out
    assert v.main([str(tmp_path / "missing.jsonl"), "--vkey", VKEY]) == 1


def test_main_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = ("\n".join(export()) + "\n").encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert v.main(["-", "--vkey", VKEY]) == 0
    assert "OK: 200 entries" in capsys.readouterr().out


# --- the exporter's byte format: the fast path and --strict -------------------------------------


def exporter_lines(bodies: list[bytes]) -> list[bytes]:
    """Lines exactly as broker.ledger.service.export_lines writes them, plus one checkpoint."""
    tree = StreamingTree()
    out = []
    for i, body in enumerate(bodies):
        leaf = leaf_hash(body)
        tree.append(leaf)
        head = f'{{"kind":"entry","index":{i},"leaf_hash":"{base64.b64encode(leaf).decode()}"'
        out.append(head.encode() + b',"entry":' + body + b"}\n")
    note = sign_checkpoint(Checkpoint(ORIGIN, len(bodies), tree.root()), ORIGIN, KEY)
    out.append(json.dumps({"kind": "checkpoint", "note": note}).encode() + b"\n")
    return out


def test_fast_path_takes_exporter_lines_and_agrees_with_strict() -> None:
    bodies = [canonical.canonical_json(entry(i)) for i in range(300)]
    lines = exporter_lines(bodies)
    assert all(v._fast_entry(line, strict=False) for line in lines[:-1])
    for strict in (False, True):
        report = v.verify_export(lines, VKEY, strict=strict, workers=1)
        assert report.ok, report.problems
        assert report.entries == 300 and report.checkpoints_verified == 1


@pytest.mark.parametrize("strict", [False, True])
def test_altered_byte_line_is_named_in_both_modes(strict: bool) -> None:
    lines = exporter_lines([canonical.canonical_json(entry(i)) for i in range(64)])
    lines[17] = lines[17].replace(b'"caseworker"', b'"supervisor"')
    report = v.verify_export(lines, VKEY, strict=strict, workers=1)
    assert not report.ok and report.first_bad_index == 17


def test_strict_catches_a_committed_non_canonical_entry() -> None:
    """A broker that signed ambiguous JSON (a duplicate key) passes the integrity check
    but not --strict, which re-canonicalises every entry."""
    bodies = [canonical.canonical_json(entry(i)) for i in range(8)]
    bodies[5] = b'{"a":1,"a":2}'
    lines = exporter_lines(bodies)
    assert v.verify_export(lines, VKEY, workers=1).ok
    strict = v.verify_export(lines, VKEY, strict=True, workers=1)
    assert not strict.ok and strict.first_bad_index == 5
    assert any("duplicate" in p for p in strict.problems)
