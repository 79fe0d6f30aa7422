"""Handing the ledger's checkpoint key over to a successor, in a form auditors can check.

A rotation note is a checkpoint -- the tree head as it stood when the key was
replaced -- with one extension line naming both verifier keys, signed by both
keys. The old key vouches for its successor and the new key shows it holds its
half, so an auditor who pinned either key can follow the hand-over, in either
direction. From that tree size on, the old key's signature counts only on
checkpoints no larger than it, and the new key's only on checkpoints no smaller:
whoever steals a retired key cannot sign a later tree head that auditors accept.

A *recovery* is the same note with a ``key-recovery`` line, signed by the new key
alone: the old private key was lost, so it cannot vouch. An auditor who pinned the
new key follows it like a rotation. One who pinned the old key learns only that it
signs nothing past that size; the new key stays untrusted until the operator
confirms it out of band, and verification says so.

Tools that know nothing of rotations still read the note as an ordinary
checkpoint (extension lines are allowed by C2SP ``tlog-checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.ledger.checkpoint import (
    MAX_NOTE_BYTES,
    Checkpoint,
    CheckpointError,
    format_body,
    open_checkpoint,
    open_note,
    parse_body,
    parse_verifier_key,
    sign_note,
    verifier_key,
)

__all__ = [
    "KeyRotation",
    "TrustedKeys",
    "open_key_rotation",
    "sign_key_recovery",
    "sign_key_rotation",
]

ROTATION_TAG = "key-rotation"
RECOVERY_TAG = "key-recovery"


@dataclass(frozen=True)
class KeyRotation:
    """``old_vkey`` signs nothing larger than ``checkpoint.size``; ``new_vkey`` from there on."""

    checkpoint: Checkpoint
    old_vkey: str
    new_vkey: str
    #: Signed by the new key alone: the old one was lost.
    recovery: bool = False

    @property
    def size(self) -> int:
        return self.checkpoint.size


def sign_key_rotation(
    cp: Checkpoint, old_key: Ed25519PrivateKey, new_key: Ed25519PrivateKey
) -> str:
    """The rotation note for tree head ``cp``, signed by the old key, then the new one."""
    name = cp.origin
    old_vkey = verifier_key(name, old_key.public_key())
    new_vkey = verifier_key(name, new_key.public_key())
    if old_vkey == new_vkey:
        raise CheckpointError("a key cannot hand over to itself")
    text = f"{format_body(cp)}{ROTATION_TAG} {old_vkey} {new_vkey}\n"
    return sign_note(text, name, old_key, new_key)


def sign_key_recovery(cp: Checkpoint, old_vkey: str, new_key: Ed25519PrivateKey) -> str:
    """The recovery note for tree head ``cp``: ``old_vkey``'s key is lost; the new one signs."""
    name = cp.origin
    new_vkey = verifier_key(name, new_key.public_key())
    old_name, _, _ = parse_verifier_key(old_vkey)
    if old_name != name or old_vkey == new_vkey:
        raise CheckpointError("the lost key must be another key of this log")
    text = f"{format_body(cp)}{RECOVERY_TAG} {old_vkey} {new_vkey}\n"
    return sign_note(text, name, new_key)


def open_key_rotation(note: str, origin: str | None = None) -> KeyRotation:
    """Check that ``note`` is a rotation signed by both the keys it names (a recovery: by
    the new one) and return it.

    Says nothing about whether either key is trusted: that is ``TrustedKeys.learn``.
    """
    if not isinstance(note, str) or len(note) > MAX_NOTE_BYTES:
        raise CheckpointError("rotation note must be text of at most 16 KiB")
    split = note.rfind("\n\n")
    if split < 0:
        raise CheckpointError("rotation note has no signature block")
    lines = note[: split + 1].split("\n")
    if len(lines) != 5 or lines[4] != "":
        raise CheckpointError("a rotation note holds a checkpoint and one key-rotation line")
    parts = lines[3].split(" ")
    if len(parts) != 3 or parts[0] not in (ROTATION_TAG, RECOVERY_TAG):
        raise CheckpointError("malformed key-rotation line")
    tag, old_vkey, new_vkey = parts
    old_name, old_kid, _ = parse_verifier_key(old_vkey)
    new_name, new_kid, _ = parse_verifier_key(new_vkey)
    if old_kid == new_kid:
        raise CheckpointError("a key cannot hand over to itself")
    # The new key signs the text, which names both; in a rotation the old key too.
    text = open_note(note, new_vkey)
    if tag == ROTATION_TAG and open_note(note, old_vkey) != text:
        raise CheckpointError("the two signatures cover different texts")
    cp = parse_body(text)
    if not cp.origin == old_name == new_name:
        raise CheckpointError("rotation keys must be named after the log's origin")
    if origin is not None and cp.origin != origin:
        raise CheckpointError(f"rotation origin {cp.origin!r} != expected {origin!r}")
    return KeyRotation(cp, old_vkey, new_vkey, recovery=tag == RECOVERY_TAG)


@dataclass
class _Span:
    """The tree sizes a key may sign: from ``first`` to ``last`` (None: no end yet)."""

    vkey: str
    first: int = 0
    last: int | None = None
    successor: str | None = None


@dataclass
class TrustedKeys:
    """The checkpoint keys an auditor trusts, grown from one pinned key by rotations."""

    pinned: str
    _spans: dict[str, _Span] = field(default_factory=dict)
    _waiting: list[KeyRotation] = field(default_factory=list)
    #: Recoveries away from a trusted key to one not trusted: they only bounded the old key.
    _unconfirmed: list[KeyRotation] = field(default_factory=list)

    def __post_init__(self) -> None:
        parse_verifier_key(self.pinned)
        self._spans[self.pinned] = _Span(self.pinned)

    @property
    def unlinked(self) -> list[KeyRotation]:
        """Rotations seen that name no trusted key (so far)."""
        return list(self._waiting)

    @property
    def unconfirmed(self) -> list[KeyRotation]:
        """Recoveries from a trusted key to a key nobody vouched for: confirm it out of band."""
        return list(self._unconfirmed)

    def learn(self, rotation: KeyRotation) -> list[KeyRotation]:
        """Take in a checked rotation; returns the rotations now linked (oldest first).

        A rotation is linked when either of its keys is trusted; one that is not yet
        waits and is linked as soon as another rotation makes one of its keys trusted.
        Raises ``CheckpointError`` when it contradicts what is known (a key handed
        over twice, or a span that would end before it starts).
        """
        self._waiting.append(rotation)
        linked: list[KeyRotation] = []
        progress = True
        while progress:
            progress = False
            for waiting in list(self._waiting):
                if waiting.new_vkey in self._spans or (
                    waiting.old_vkey in self._spans and not waiting.recovery
                ):
                    self._waiting.remove(waiting)
                    self._apply(waiting)
                    linked.append(waiting)
                    progress = True
                elif waiting.old_vkey in self._spans:
                    # Nobody trusted vouches for the new key, but the old one is retired
                    # all the same: a note that only narrows trust is safe to heed.
                    self._waiting.remove(waiting)
                    self._bound(waiting)
                    self._unconfirmed.append(waiting)
        return linked

    def _apply(self, rot: KeyRotation) -> None:
        self._bound(rot)
        new = self._spans.setdefault(rot.new_vkey, _Span(rot.new_vkey))
        if new.last is not None and new.last < rot.size:
            raise CheckpointError(
                f"the rotation at size {rot.size} contradicts the sizes its keys signed before"
            )
        new.first = max(new.first, rot.size)

    def _bound(self, rot: KeyRotation) -> None:
        """The old key signs nothing larger than the hand-over."""
        old = self._spans.setdefault(rot.old_vkey, _Span(rot.old_vkey))
        if old.successor is not None and (old.successor, old.last) != (rot.new_vkey, rot.size):
            raise CheckpointError(
                f"the key {_short(rot.old_vkey)} was handed over twice (at sizes {old.last} "
                f"and {rot.size}): the log presented conflicting rotations"
            )
        if old.first > rot.size:
            raise CheckpointError(
                f"the rotation at size {rot.size} contradicts the sizes its keys signed before"
            )
        old.last, old.successor = rot.size, rot.new_vkey

    def open(self, note: str, origin: str | None = None) -> Checkpoint:
        """Verify a checkpoint against the trusted keys, each within its span of sizes."""
        first_error: CheckpointError | None = None
        for span in self._spans.values():
            try:
                cp = open_checkpoint(note, span.vkey, origin)
            except CheckpointError as exc:
                first_error = first_error or exc
                continue
            if cp.size < span.first or (span.last is not None and cp.size > span.last):
                bound = f"from size {span.first}" + (
                    f" to {span.last}" if span.last is not None else ""
                )
                raise CheckpointError(
                    f"signed by {_short(span.vkey)} at size {cp.size}, but that key signs only "
                    f"{bound} (it was rotated)"
                )
            return cp
        if len(self._spans) == 1 and first_error is not None:
            raise first_error
        raise CheckpointError("note is not signed by any trusted checkpoint key")


def _short(vkey: str) -> str:
    """``name+keyid``: enough to tell keys apart in a message."""
    return "+".join(vkey.split("+")[:2])
