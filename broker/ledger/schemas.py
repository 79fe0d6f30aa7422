"""Response shapes of the auditor API: hashes are standard base64, as in the checkpoint."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class CheckpointOut(BaseModel):
    origin: str
    tree_size: int
    root_hash: str = Field(description="base64 SHA-256 root of the first tree_size entries")
    note: str = Field(description="C2SP signed note holding a tlog-checkpoint body")
    created_at: datetime


class KeyRotationOut(BaseModel):
    tree_size: int = Field(description="the old key signs no larger tree, the new no smaller")
    old_verifier_key: str
    new_verifier_key: str
    note: str = Field(
        description="the tree head at tree_size with a key-rotation line, "
        "signed by both keys (C2SP signed note)"
    )
    created_at: datetime


class LedgerKeyOut(BaseModel):
    origin: str
    verifier_key: str = Field(
        description="the current checkpoint key as a C2SP note verifier key: "
        "name+hash+base64(0x01||key)"
    )
    jwk: dict[str, str] = Field(description="the same Ed25519 public key as an OKP JWK")
    rotations: list[KeyRotationOut] = Field(
        default_factory=list,
        description="every hand-over of the checkpoint key, oldest first: with them, an "
        "auditor who pinned any earlier key reaches the current one",
    )


class EntryOut(BaseModel):
    index: int
    entry_id: str
    type: str
    created_at: datetime
    leaf_hash: str
    entry: dict[str, Any] = Field(description="the entry as hashed (RFC 8785 canonical JSON)")


class EntryPage(BaseModel):
    items: list[EntryOut]
    next_index: int | None = Field(description="pass as from_index for the next page")


class InclusionProofOut(BaseModel):
    index: int
    tree_size: int
    leaf_hash: str
    hashes: list[str] = Field(description="RFC 9162 inclusion path, leaf to root")


class ConsistencyProofOut(BaseModel):
    first: int
    second: int
    hashes: list[str] = Field(description="RFC 9162 consistency path")


class ReceiptOut(BaseModel):
    disclosure_id: str
    outcome: str
    entry: EntryOut
    inclusion_proof: InclusionProofOut
    checkpoint: CheckpointOut
