"""Checkpoint key hand-overs: the note's format, whom it links, and the verifier following it."""

from __future__ import annotations

import json
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.ledger import verify as v
from broker.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    format_body,
    key_id,
    open_checkpoint,
    sign_checkpoint,
    sign_note,
    signer_ids,
    verifier_key,
)
from broker.ledger.key_rotation import (
    ROTATION_TAG,
    TrustedKeys,
    open_key_rotation,
    sign_key_recovery,
    sign_key_rotation,
)
from tests.unit.test_verify import ROOTS, cp_line, entry_line

ORIGIN = "broker.example/ledger"
KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([65 + i]) * 32) for i in range(6)]
VKEYS = [verifier_key(ORIGIN, k.public_key()) for k in KEYS]
ROOT = b"\x07" * 32


def head(size: int, root: bytes = ROOT) -> Checkpoint:
    return Checkpoint(ORIGIN, size, root)


def signed(size: int, key: int, root: bytes = ROOT) -> str:
    return sign_checkpoint(head(size, root), ORIGIN, KEYS[key])


# --- the note ----------------------------------------------------------------------------------


def test_a_rotation_opens_and_reads_as_an_ordinary_checkpoint() -> None:
    note = sign_key_rotation(head(40), KEYS[0], KEYS[1])
    rot = open_key_rotation(note, ORIGIN)
    assert (rot.size, rot.old_vkey, rot.new_vkey) == (40, VKEYS[0], VKEYS[1])
    assert rot.checkpoint == head(40)
    # Tools that know no rotations see the tree head, under either key.
    assert open_checkpoint(note, VKEYS[0], ORIGIN) == head(40)
    assert open_checkpoint(note, VKEYS[1], ORIGIN) == head(40)


def _rotation_text(size: int = 40) -> str:
    return f"{format_body(head(size))}{ROTATION_TAG} {VKEYS[0]} {VKEYS[1]}\n"


@pytest.mark.parametrize(
    ("signers", "needle"),
    [
        ((0,), "not signed by"),  # the new key did not show it holds its half
        ((1,), "not signed by"),  # the old key did not vouch for its successor
        ((0, 2), "not signed by"),  # a third key is no substitute
    ],
)
def test_both_named_keys_must_sign(signers: tuple[int, ...], needle: str) -> None:
    note = sign_note(_rotation_text(), ORIGIN, *(KEYS[i] for i in signers))
    with pytest.raises(CheckpointError, match=needle):
        open_key_rotation(note)


def test_an_altered_rotation_is_refused() -> None:
    note = sign_key_rotation(head(40), KEYS[0], KEYS[1])
    with pytest.raises(CheckpointError, match="invalid signature"):
        open_key_rotation(note.replace("\n40\n", "\n41\n", 1))
    with pytest.raises(CheckpointError, match="origin"):
        open_key_rotation(note, "another.example/log")


@pytest.mark.parametrize(
    "line",
    [
        f"{ROTATION_TAG} {VKEYS[0]}",
        f"{ROTATION_TAG} {VKEYS[0]} {VKEYS[1]} extra",
        f"rotate {VKEYS[0]} {VKEYS[1]}",
        f"{ROTATION_TAG} {VKEYS[0]} {VKEYS[0]}",
        f"{ROTATION_TAG} {VKEYS[0]} not-a-key",
    ],
)
def test_malformed_rotation_lines(line: str) -> None:
    note = sign_note(f"{format_body(head(3))}{line}\n", ORIGIN, KEYS[0], KEYS[1])
    with pytest.raises(CheckpointError):
        open_key_rotation(note)


def test_keys_must_carry_the_origin_and_differ() -> None:
    with pytest.raises(CheckpointError, match="itself"):
        sign_key_rotation(head(1), KEYS[0], KEYS[0])
    stranger = verifier_key("other.example/log", KEYS[1].public_key())
    text = f"{format_body(head(3))}{ROTATION_TAG} {VKEYS[0]} {stranger}\n"
    # Each key signs under its own name: two signature lines, both valid.
    note = (
        sign_note(text, ORIGIN, KEYS[0])
        + sign_note(text, "other.example/log", KEYS[1])[len(text) + 1 :]
    )
    with pytest.raises(CheckpointError, match="origin"):
        open_key_rotation(note)


def test_signer_ids_name_each_signature_line_unverified() -> None:
    note = sign_key_rotation(head(40), KEYS[0], KEYS[1])
    ids = signer_ids(note)
    assert [kid for _, kid in ids] == [key_id(ORIGIN, k.public_key()) for k in KEYS[:2]]
    assert {name for name, _ in ids} == {ORIGIN}
    assert signer_ids("no signature block\n") == []


# --- whom it links -----------------------------------------------------------------------------


def test_pinned_old_key_follows_the_hand_over_and_bounds_itself() -> None:
    keys = TrustedKeys(VKEYS[0])
    rot = open_key_rotation(sign_key_rotation(head(40), KEYS[0], KEYS[1]))
    assert keys.learn(rot) == [rot]
    assert keys.open(signed(40, 0)).size == 40
    assert keys.open(signed(40, 1)).size == 40
    assert keys.open(signed(90, 1)).size == 90
    with pytest.raises(CheckpointError, match="signs only from size 0 to 40"):
        keys.open(signed(41, 0))  # a stolen retired key cannot sign a later head
    with pytest.raises(CheckpointError, match="signs only from size 40"):
        keys.open(signed(39, 1))


def test_pinned_new_key_vouches_for_the_history_before_it() -> None:
    keys = TrustedKeys(VKEYS[2])
    first = open_key_rotation(sign_key_rotation(head(10), KEYS[0], KEYS[1]))
    second = open_key_rotation(sign_key_rotation(head(30), KEYS[1], KEYS[2]))
    assert keys.learn(first) == []  # neither key trusted yet: it waits
    assert keys.unlinked == [first]
    assert keys.learn(second) == [second, first]
    assert keys.unlinked == []
    assert keys.open(signed(5, 0)).size == 5
    assert keys.open(signed(20, 1)).size == 20
    with pytest.raises(CheckpointError, match="rotated"):
        keys.open(signed(31, 1))


def test_unrelated_and_conflicting_rotations() -> None:
    keys = TrustedKeys(VKEYS[0])
    stray = open_key_rotation(sign_key_rotation(head(5), KEYS[4], KEYS[5]))
    assert keys.learn(stray) == [] and keys.unlinked == [stray]
    with pytest.raises(CheckpointError, match="not signed by"):
        keys.open(signed(5, 4))
    keys.learn(open_key_rotation(sign_key_rotation(head(10), KEYS[0], KEYS[1])))
    fork = open_key_rotation(sign_key_rotation(head(12), KEYS[0], KEYS[2]))
    with pytest.raises(CheckpointError, match="handed over twice"):
        keys.learn(fork)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=4),
    st.integers(0, 4),
    st.randoms(use_true_random=False),
    st.integers(0, 250),
    st.integers(0, 4),
)
def test_any_pinned_key_of_a_chain_accepts_exactly_each_keys_span(
    steps: list[int], pin: int, order: random.Random, size: int, signer: int
) -> None:
    """Keys 0..k hand over at non-decreasing sizes; rotations arrive in any order; any one
    key is pinned. Then a checkpoint opens exactly when its signer's span covers its size."""
    k = len(steps)
    sizes = [sum(steps[: i + 1]) for i in range(k)]  # key i hands over to i+1 at sizes[i]
    pin, signer = pin % (k + 1), signer % (k + 1)
    rotations = [
        open_key_rotation(sign_key_rotation(head(sizes[i]), KEYS[i], KEYS[i + 1])) for i in range(k)
    ]
    order.shuffle(rotations)
    keys = TrustedKeys(VKEYS[pin])
    for rot in rotations:
        keys.learn(rot)
    assert keys.unlinked == []
    first = 0 if signer == 0 else sizes[signer - 1]
    last = sizes[signer] if signer < k else None
    inside = first <= size and (last is None or size <= last)
    if inside:
        assert keys.open(signed(size, signer)).size == size
    else:
        with pytest.raises(CheckpointError, match="rotated"):
            keys.open(signed(size, signer))


# --- the verifier following it -------------------------------------------------------------------


def rotated_export(at: int = 100, n: int = 200) -> list[str]:
    """Checkpoints every 50 entries: key 0 up to ``at``, key 1 from there; rotation first."""
    note = sign_key_rotation(head(at, ROOTS[at]), KEYS[0], KEYS[1])
    lines = [json.dumps({"kind": "key-rotation", "note": note})]
    for i in range(n):
        lines.append(entry_line(i))
        if (i + 1) % 50 == 0:
            key = KEYS[0] if i + 1 <= at else KEYS[1]
            lines.append(cp_line(i + 1, ROOTS[i + 1], key))
    return lines


@pytest.mark.parametrize("pinned", [0, 1])
def test_an_export_across_a_rotation_verifies_from_either_key(pinned: int) -> None:
    report = v.verify_export(rotated_export(), VKEYS[pinned], origin=ORIGIN)
    assert report.ok, report.problems
    assert report.checkpoints_verified == 5  # four checkpoints and the rotation's tree head


def test_the_report_names_the_keys_followed_oldest_first(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two hand-overs at the same size (0 to 1 to 2), pinned on the newest key, so they
    are learned newest first: the report still lists them in the chain's order."""
    handovers = [(KEYS[0], KEYS[1]), (KEYS[1], KEYS[2])]
    lines = [
        json.dumps({"kind": "key-rotation", "note": sign_key_rotation(head(100, ROOTS[100]), *k)})
        for k in handovers
    ]
    for i in range(200):
        lines.append(entry_line(i))
        if (i + 1) % 50 == 0:
            lines.append(cp_line(i + 1, ROOTS[i + 1], KEYS[0] if i + 1 <= 100 else KEYS[2]))
    report = v.verify_export(lines, VKEYS[2], origin=ORIGIN)
    assert report.ok, report.problems
    assert report.key_rotations == [(100, VKEYS[1]), (100, VKEYS[2])]
    assert v.print_report(report) == 0
    out = capsys.readouterr().out
    assert f"handed over at tree size 100 to {VKEYS[2]}" in out and "pin the newest" in out


def test_the_retired_key_signing_past_the_hand_over_is_reported() -> None:
    lines = rotated_export()
    late = lines.index(cp_line(150, ROOTS[150], KEYS[1]))
    lines[late] = cp_line(150, ROOTS[150], KEYS[0])
    report = v.verify_export(lines, VKEYS[0], origin=ORIGIN)
    assert not report.ok
    assert any("signs only from size 0 to 100" in p for p in report.problems), report.problems


def test_without_the_rotation_the_new_keys_checkpoints_are_rejected() -> None:
    report = v.verify_export(rotated_export()[1:], VKEYS[0], origin=ORIGIN)
    assert not report.ok
    assert sum("rejected" in p for p in report.problems) == 2  # sizes 150 and 200


def test_a_rotation_whose_head_does_not_match_the_entries_is_reported() -> None:
    lines = rotated_export()
    note = sign_key_rotation(head(100, ROOTS[99]), KEYS[0], KEYS[1])
    lines[0] = json.dumps({"kind": "key-rotation", "note": note})
    report = v.verify_export(lines, VKEYS[1], origin=ORIGIN)
    assert not report.ok
    assert any("key rotation at line 1" in p and "does not match" in p for p in report.problems)


def test_a_rotation_linked_to_no_trusted_key_is_reported() -> None:
    stray = sign_key_rotation(head(0, ROOTS[0]), KEYS[4], KEYS[5])
    lines = [json.dumps({"kind": "key-rotation", "note": stray}), *rotated_export()]
    report = v.verify_export(lines, VKEYS[0], origin=ORIGIN)
    assert not report.ok
    assert any("neither of its keys" in p for p in report.problems), report.problems


def test_a_saved_checkpoint_of_the_old_key_with_the_new_key_pinned() -> None:
    saved = sign_checkpoint(head(50, ROOTS[50]), ORIGIN, KEYS[0])
    report = v.verify_export(rotated_export(), VKEYS[1], origin=ORIGIN, trusted_checkpoint=saved)
    assert report.ok, report.problems
    forged = sign_checkpoint(head(50, ROOTS[49]), ORIGIN, KEYS[0])
    report = v.verify_export(rotated_export(), VKEYS[1], origin=ORIGIN, trusted_checkpoint=forged)
    assert not report.ok


# --- recovery: the old key was lost ------------------------------------------------------------


def test_a_recovery_is_signed_by_the_new_key_alone() -> None:
    note = sign_key_recovery(head(40), VKEYS[0], KEYS[1])
    rot = open_key_rotation(note, ORIGIN)
    assert (rot.size, rot.old_vkey, rot.new_vkey, rot.recovery) == (40, VKEYS[0], VKEYS[1], True)
    assert len(signer_ids(note)) == 1
    with pytest.raises(CheckpointError, match="invalid signature"):
        open_key_rotation(note.replace("\n40\n", "\n41\n", 1))
    # A rotation line with only the new key's signature is no rotation.
    text = f"{format_body(head(40))}{ROTATION_TAG} {VKEYS[0]} {VKEYS[1]}\n"
    with pytest.raises(CheckpointError, match="not signed by"):
        open_key_rotation(sign_note(text, ORIGIN, KEYS[1]))
    with pytest.raises(CheckpointError, match="another key"):
        sign_key_recovery(head(40), VKEYS[1], KEYS[1])


def test_a_recovery_is_followed_from_the_new_key() -> None:
    keys = TrustedKeys(VKEYS[1])
    rot = open_key_rotation(sign_key_recovery(head(40), VKEYS[0], KEYS[1]))
    assert keys.learn(rot) == [rot] and keys.unconfirmed == []
    assert keys.open(signed(30, 0)).size == 30  # the new key vouches for the lost one's past
    with pytest.raises(CheckpointError, match="rotated"):
        keys.open(signed(41, 0))


def test_from_the_lost_key_a_recovery_only_retires_it() -> None:
    keys = TrustedKeys(VKEYS[0])
    rot = open_key_rotation(sign_key_recovery(head(40), VKEYS[0], KEYS[1]))
    assert keys.learn(rot) == [] and keys.unconfirmed == [rot] and keys.unlinked == []
    assert keys.open(signed(40, 0)).size == 40
    with pytest.raises(CheckpointError, match="signs only from size 0 to 40"):
        keys.open(signed(41, 0))  # whoever found the lost key cannot sign on
    with pytest.raises(CheckpointError, match="not signed by"):
        keys.open(signed(50, 1))  # and the new key is not trusted until confirmed


def recovered_export() -> list[str]:
    lines = rotated_export()
    note = sign_key_recovery(head(100, ROOTS[100]), VKEYS[0], KEYS[1])
    lines[0] = json.dumps({"kind": "key-rotation", "note": note})
    return lines


def test_an_export_across_a_recovery() -> None:
    report = v.verify_export(recovered_export(), VKEYS[1], origin=ORIGIN)
    assert report.ok, report.problems
    assert report.key_rotations == [(100, VKEYS[1])]
    report = v.verify_export(recovered_export(), VKEYS[0], origin=ORIGIN)
    assert not report.ok
    assert any("without its own signature" in p for p in report.problems), report.problems
    assert any(VKEYS[1] in p and "out of band" in p for p in report.problems)
