"""Bounded, strict reading of the catalog's configuration files."""

from __future__ import annotations

import re
from pathlib import Path

from broker.catalog.errors import CatalogError

MAX_FILE_BYTES = 1024 * 1024
"""Schemas and policy are small hand-written files; anything larger is a mistake or an attack."""

NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}", re.ASCII)
"""Categories, purposes and fields are snake_case, which also keeps wildcards out of names."""


def read_bounded(path: Path) -> bytes:
    """Read at most ``MAX_FILE_BYTES`` so an oversized file is refused without loading it all."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CatalogError(f"{path}: cannot read file: {reason}") from None
    if len(data) > MAX_FILE_BYTES:
        raise CatalogError(f"{path}: file is larger than 1 MiB ({MAX_FILE_BYTES} bytes)")
    return data


def decode_utf8(path: Path, data: bytes) -> str:
    """Decode strictly so a stray byte is an error, not a silently replaced character."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not valid UTF-8 at byte {exc.start}") from None


def kind_of(value: object) -> str:
    """Name a parsed value's type in the file's own vocabulary (mapping, list, string...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__
