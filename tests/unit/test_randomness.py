"""Buffered random ids: valid v4 UUIDs, never repeated, not shared with a forked child."""

from __future__ import annotations

import os
import threading
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.crypto import randomness
from broker.crypto.randomness import id_bytes, random_id


def test_random_id_is_a_canonical_version_4_uuid() -> None:
    for _ in range(1000):
        text = random_id()
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text  # canonical: lower-case, hyphenated


def test_ids_do_not_repeat_across_many_blocks() -> None:
    # 20,000 ids span about 80 refills of the 4 KiB block.
    ids = {random_id() for _ in range(20_000)}
    assert len(ids) == 20_000


@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=300))
def test_slices_have_the_asked_length_and_never_overlap(sizes: list[int]) -> None:
    outs = [id_bytes(n) for n in sizes]
    assert [len(b) for b in outs] == sizes
    # Overlapping or repeated slices would show up as a repeated 8-byte window.
    windows = [b[i : i + 8] for b in outs for i in range(0, len(b) - 7, 8)]
    assert len(set(windows)) == len(windows)


@pytest.mark.parametrize("n", [0, -1, 65, 4096])
def test_sizes_outside_the_id_range_are_refused(n: int) -> None:
    with pytest.raises(ValueError, match="1 to 64 bytes"):
        id_bytes(n)


def test_threads_never_take_the_same_slice() -> None:
    per_thread = 5_000
    results: list[list[bytes]] = [[] for _ in range(4)]

    def draw(out: list[bytes]) -> None:
        out.extend(id_bytes(16) for _ in range(per_thread))

    threads = [threading.Thread(target=draw, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [b for out in results for b in out]
    assert len(everything) == 4 * per_thread
    assert len(set(everything)) == len(everything)


def test_a_forked_child_does_not_reuse_the_parents_block() -> None:
    id_bytes(16)  # the parent now holds a block with unused bytes
    unused = randomness._block[randomness._offset : randomness._offset + 16]
    assert len(unused) == 16
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next 16 bytes and leave at once
        try:
            os.write(write_end, id_bytes(16))
        finally:
            os._exit(0)
    os.close(write_end)
    child_bytes = os.read(read_end, 16)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child_bytes) == 16
    assert child_bytes != unused
    assert id_bytes(16) == unused  # the parent's own next slice is what it held
