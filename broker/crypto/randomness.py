"""Random ids drawn from the operating system's CSPRNG a block at a time.

Every ``os.urandom`` is a ``getrandom`` system call, and on the small VMs the
broker is sized for a system call is where the kernel preempts a busy worker:
the two ``uuid4`` ids of each disclosure sat under 4 % of the worker's CPU in the
bench profile at peak. Ids here come from a 4 KiB block read with one call. The
bytes are the kernel's, unchanged; a forked child drops the block so that two
processes never hand out the same bytes, and a lock keeps two threads from taking
the same slice. Key material does not come from here: content keys and IVs are
read from the OS when they are made (see ``compact.ecdh_es_a256kw``).
"""

from __future__ import annotations

import os
import threading

__all__ = ["id_bytes", "random_id"]

_BLOCK = 4096
_lock = threading.Lock()
_block = b""
_offset = 0


def id_bytes(n: int) -> bytes:
    """``n`` random bytes (at most 64) for identifiers, from the buffered block."""
    global _block, _offset
    if not 0 < n <= 64:
        raise ValueError("id_bytes hands out 1 to 64 bytes")
    with _lock:
        end = _offset + n
        if end > len(_block):
            _block, _offset, end = os.urandom(_BLOCK), 0, n
        out = _block[_offset:end]
        _offset = end
    return out


def random_id() -> str:
    """A random (version 4) UUID in its canonical text form, like ``str(uuid.uuid4())``."""
    raw = bytearray(id_bytes(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 9562 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _drop_block_in_child() -> None:
    global _block, _offset
    _block, _offset = b"", 0


os.register_at_fork(after_in_child=_drop_block_in_child)
