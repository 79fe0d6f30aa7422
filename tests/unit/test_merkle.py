"""Known-answer and property tests for the RFC 9162 Merkle tree in broker.ledger.merkle.

Two independent implementations live here: a recursive one transcribed from the
RFC's definitions (D[k1:k2] slicing) and an iterative CT-style one (level arrays
with promoted right-edge nodes and bit-twiddled paths).  The module under test
computes proofs from stored nodes produced by ``append_leaves``.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.ledger import merkle as m

# --- reference 1: RFC 9162 section 2.1 definitions, recursive, on slices ----------------


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def ref_mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return _h(b"")
    if n == 1:
        return _h(b"\x00" + d[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return _h(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:]))


def ref_path(idx: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if idx < k:
        return ref_path(idx, d[:k]) + [ref_mth(d[k:])]
    return ref_path(idx - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(mm: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if mm == n:
        return [] if b else [ref_mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if mm <= k:
        return ref_subproof(mm, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(mm - k, d[k:], False) + [ref_mth(d[:k])]


def ref_proof(mm: int, d: list[bytes]) -> list[bytes]:
    return ref_subproof(mm, d, True)


# --- reference 2: iterative CT-style (level arrays, promoted lone right nodes) ----------


def levels_for(leaf_hashes: list[bytes]) -> list[list[bytes]]:
    levels = [list(leaf_hashes)]
    while len(levels[-1]) > 1:
        prev = levels[-1]
        nxt = [_h(b"\x01" + prev[i] + prev[i + 1]) for i in range(0, len(prev) - 1, 2)]
        if len(prev) % 2:
            nxt.append(prev[-1])  # promoted unchanged, as in CT's C++ MerkleTree
        levels.append(nxt)
    return levels


def iter_root(leaf_hashes: list[bytes]) -> bytes:
    return levels_for(leaf_hashes)[-1][0] if leaf_hashes else _h(b"")


def iter_path(index: int, leaf_hashes: list[bytes]) -> list[bytes]:
    out = []
    for level in levels_for(leaf_hashes)[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            out.append(level[sibling])
        index >>= 1
    return out


def iter_consistency(first: int, leaf_hashes: list[bytes]) -> list[bytes]:
    """CT C++ SnapshotConsistency + PathFromNodeToRootAtSnapshot."""
    second = len(leaf_hashes)
    if first == second:
        return []
    levels = levels_for(leaf_hashes)
    level, node = 0, first - 1
    while node & 1:
        node >>= 1
        level += 1
    proof = [levels[level][node]] if node else []
    last = (second - 1) >> level
    while last:
        if node & 1:
            proof.append(levels[level][node - 1])
        elif node < last:
            proof.append(levels[level][node + 1])
        level += 1
        node >>= 1
        last >>= 1
    return proof


# --- fixtures ----------------------------------------------------------------------------

N_MAX = 64
DATA = [bytes([i]) for i in range(N_MAX)]
LEAVES = [m.leaf_hash(x) for x in DATA]


def build_store(
    leaves: list[bytes], rng: random.Random
) -> tuple[dict[m.Node, bytes], dict[m.Node, bytes]]:
    """Append ``leaves`` in random batches, returning all stored nodes and the final frontier."""
    store: dict[m.Node, bytes] = {}
    frontier: dict[m.Node, bytes] = {}
    size = 0
    while size < len(leaves):
        batch = leaves[size : size + rng.randint(1, 9)]
        created, frontier = m.append_leaves(size, frontier, batch)
        for level, index, h in created:
            assert (level, index) not in store
            store[(level, index)] = h
        size += len(batch)
    return store, frontier


STORE, _ = build_store(LEAVES, random.Random(7))

# Roots for leaves bytes([0]) .. bytes([n-1]), n = 1..8, computed once with ref_mth.
FIXED_ROOTS = [
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "a20bf9a7cc2dc8a08f5f415a71b19f6ac427bab54d24eec868b5d3103449953a",
    "3b6cccd7e3e023ff393006f030315ee7ad9eb111b022b41fba7e5b7a3973f688",
    "9bcd51240af4005168f033121ba85be5a6ed4f0e6a5fac262066729b8fbfdecb",
    "b855b42d6c30f5b087e05266783fbd6e394f7b926013ccaa67700a8b0c5a596f",
    "bb36e7d3d4cee5720cbd323d02fab15962e2ba1dadf5f8fc6eeef4fd6ad056a8",
    "3560191803028444b232018ac047fdb561c09c23a7a6876c85e08b5e4d48e9f3",
    "ef7f49b620f6c7ea9b963a214da34b5021c6ded8ed57734380a311ab726aa907",
]

# RFC 6962 test leaves/roots as published with CT's reference implementations.
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    bytes(range(0x60, 0x70)),
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


# --- known answers -------------------------------------------------------------------------


def test_primitives() -> None:
    assert m.EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert m.leaf_hash(b"") == _h(b"\x00")
    assert m.node_hash(b"a", b"b") == _h(b"\x01ab")
    assert m.range_hash(0, 0, {}) == m.EMPTY_ROOT


@pytest.mark.parametrize("n", range(1, 9))
def test_ct_published_roots(n: int) -> None:
    leaves = [m.leaf_hash(x) for x in CT_LEAVES[:n]]
    assert ref_mth(CT_LEAVES[:n]).hex() == CT_ROOTS[n - 1]
    tree = m.StreamingTree()
    for leaf in leaves:
        tree.append(leaf)
    assert tree.root().hex() == CT_ROOTS[n - 1]


@pytest.mark.parametrize("n", range(1, 9))
def test_fixed_vector(n: int) -> None:
    assert ref_mth(DATA[:n]).hex() == FIXED_ROOTS[n - 1]
    assert m.range_hash(0, n, STORE).hex() == FIXED_ROOTS[n - 1]


def test_references_agree_with_each_other() -> None:
    for n in range(1, N_MAX + 1):
        assert ref_mth(DATA[:n]) == iter_root(LEAVES[:n])
        for i in range(n):
            assert ref_path(i, DATA[:n]) == iter_path(i, LEAVES[:n])
        for first in range(1, n + 1):
            assert ref_proof(first, DATA[:n]) == iter_consistency(first, LEAVES[:n])


def test_roots_and_inclusion_from_stored_nodes() -> None:
    for n in range(1, N_MAX + 1):
        root = m.range_hash(0, n, STORE)
        assert root == ref_mth(DATA[:n])
        for i in range(n):
            ranges = m.inclusion_proof_ranges(i, n)
            assert len(m.nodes_needed(ranges)) <= 2 * n.bit_length()
            proof = m.inclusion_proof(i, n, STORE)
            assert proof == ref_path(i, DATA[:n])
            assert m.verify_inclusion(LEAVES[i], i, n, proof, root)


def test_consistency_from_stored_nodes() -> None:
    for n in range(1, N_MAX + 1):
        root = ref_mth(DATA[:n])
        for first in range(1, n + 1):
            ranges = m.consistency_proof_ranges(first, n)
            assert len(m.nodes_needed(ranges)) <= 2 * n.bit_length()
            proof = m.consistency_proof(first, n, STORE)
            assert proof == ref_proof(first, DATA[:n])
            assert m.verify_consistency(first, n, ref_mth(DATA[:first]), root, proof)


def test_subtree_nodes_shape() -> None:
    assert m.subtree_nodes(0, 0) == []
    assert m.subtree_nodes(0, 13) == [(3, 0), (2, 2), (0, 12)]
    assert m.subtree_nodes(8, 13) == [(2, 2), (0, 12)]
    assert m.subtree_nodes(1, 3) == [(0, 1), (0, 2)]
    for n in range(1, 300):
        parts = m.subtree_nodes(0, n)
        assert sum(1 << lv for lv, _ in parts) == n
        assert [lv for lv, _ in parts] == [b for b in reversed(range(n.bit_length())) if n >> b & 1]
    with pytest.raises(ValueError):
        m.subtree_nodes(5, 4)


def test_range_hash_errors() -> None:
    with pytest.raises(KeyError):
        m.range_hash(0, 5, {(2, 0): LEAVES[0]})
    with pytest.raises(ValueError):
        m.range_hash(3, 3, STORE)
    with pytest.raises(ValueError):  # [1, 3) is no RFC subtree: the fold would be wrong
        m.range_hash(1, 3, STORE)


def test_range_validation() -> None:
    for bad in [(0, 0), (-1, 3), (3, 3), (4, 3)]:
        with pytest.raises(ValueError):
            m.inclusion_proof_ranges(*bad)
    for bad in [(0, 3), (-1, 3), (4, 3)]:
        with pytest.raises(ValueError):
            m.consistency_proof_ranges(*bad)
    assert m.consistency_proof_ranges(5, 5) == []
    assert m.verify_consistency(5, 5, LEAVES[0], LEAVES[0], [])
    assert not m.verify_consistency(5, 5, LEAVES[0], LEAVES[1], [])
    assert not m.verify_consistency(5, 5, LEAVES[0], LEAVES[0], [LEAVES[0]])


def test_append_leaves_frontier_and_nodes() -> None:
    rng = random.Random(3)
    leaves = [m.leaf_hash(i.to_bytes(4, "big")) for i in range(257)]
    store, frontier = build_store(leaves, rng)
    n = len(leaves)
    assert set(frontier) == set(m.subtree_nodes(0, n))
    assert frontier == {node: store[node] for node in m.subtree_nodes(0, n)}
    assert m.root_from_frontier(n, frontier) == iter_root(leaves)
    expected_nodes = {(lv, i) for lv in range(n.bit_length()) for i in range(n >> lv)}
    assert set(store) == expected_nodes
    assert all(store[(0, i)] == leaves[i] for i in range(n))
    tree = m.StreamingTree()
    for leaf in leaves:
        tree.append(leaf)
    assert tree.size == n and tree.frontier() == frontier


def test_append_leaves_validation() -> None:
    with pytest.raises(KeyError):
        m.append_leaves(3, {}, [LEAVES[0]])
    with pytest.raises(ValueError):
        m.append_leaves(0, {}, [b"short"])
    created, frontier = m.append_leaves(0, {}, [])
    assert created == [] and frontier == {}
    assert m.root_from_frontier(0, {}) == m.EMPTY_ROOT


def test_streaming_tree_empty() -> None:
    assert m.StreamingTree().root() == m.EMPTY_ROOT


@pytest.mark.parametrize(
    "args",
    [
        (b"x" * 31, 0, 1, [], b"r" * 32),
        (LEAVES[0], -1, 1, [], LEAVES[0]),
        (LEAVES[0], 0, 0, [], LEAVES[0]),
        (LEAVES[0], 1, 1, [], LEAVES[0]),
        (LEAVES[0], 0, 2, ["not bytes"], LEAVES[0]),
        (LEAVES[0], 0, 2, [None], LEAVES[0]),
        (LEAVES[0], 0, 2**70, [LEAVES[1]] * 3, LEAVES[0]),
        ("str", 0, 1, [], LEAVES[0]),
        (LEAVES[0], 0.0, 1, [], LEAVES[0]),
        (LEAVES[0], 0, 1, [LEAVES[1]], LEAVES[0]),  # too long
    ],
)
def test_verify_inclusion_rejects_malformed(args: tuple[Any, ...]) -> None:
    assert m.verify_inclusion(*args) is False


def test_verify_inclusion_size_one() -> None:
    assert m.verify_inclusion(LEAVES[0], 0, 1, [], LEAVES[0])


def test_short_proofs_rejected_even_if_hashes_line_up() -> None:
    """The final ``sn == 0`` checks: a path that ends early must fail on its own."""
    a, x = LEAVES[0], LEAVES[1]
    assert not m.verify_inclusion(a, 0, 2, [], a)
    assert not m.verify_inclusion(a, 0, 5, [x], m.node_hash(a, x))
    assert not m.verify_consistency(2, 5, a, m.node_hash(a, x), [x])
    assert m.verify_consistency(2, 4, a, m.node_hash(a, x), [x])  # exactly long enough


@pytest.mark.parametrize(
    "args",
    [
        (0, 4, m.EMPTY_ROOT, LEAVES[0], []),
        (3, 2, LEAVES[0], LEAVES[1], [LEAVES[2]]),
        (3, 4, LEAVES[0], LEAVES[1], []),
        (3, 4, LEAVES[0], LEAVES[1], [b"short"]),
        (3, 4, LEAVES[0], b"", [LEAVES[2]]),
        (3, 4, LEAVES[0], LEAVES[1], "abc"),
        (3, 4, LEAVES[0], LEAVES[1], None),
        (True, 4, LEAVES[0], LEAVES[1], [LEAVES[2]]),
        (3, 2**80, LEAVES[0], LEAVES[1], [LEAVES[2]] * 4),
    ],
)
def test_verify_consistency_rejects_malformed(args: tuple[Any, ...]) -> None:
    assert m.verify_consistency(*args) is False


# --- properties ----------------------------------------------------------------------------


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**32), data=st.data())
def test_random_trees_all_proofs(n: int, seed: int, data: st.DataObject) -> None:
    rng = random.Random(seed)
    leaves = [m.leaf_hash(rng.randbytes(rng.randint(0, 8))) for _ in range(n)]
    store, frontier = build_store(leaves, rng)
    root = m.root_from_frontier(n, frontier)
    assert root == iter_root(leaves)
    roots = {}
    tree = m.StreamingTree()
    for k, leaf in enumerate(leaves, 1):
        tree.append(leaf)
        roots[k] = tree.root()
    assert roots[n] == root
    for i in range(n):
        proof = m.inclusion_proof(i, n, store)
        assert m.verify_inclusion(leaves[i], i, n, proof, root)
    for first in range(1, n + 1):
        proof = m.consistency_proof(first, n, store)
        assert m.verify_consistency(first, n, roots[first], root, proof)

    # tampering: one index, one consistency start, any element and byte
    i = data.draw(st.integers(0, n - 1), label="index")
    proof = m.inclusion_proof(i, n, store)
    pos = data.draw(st.integers(0, 31), label="byte")
    assert not m.verify_inclusion(_flip(leaves[i], pos), i, n, proof, root)
    assert not m.verify_inclusion(leaves[i], i, n, proof, _flip(root, pos))
    for j in range(len(proof)):
        bad = list(proof)
        bad[j] = _flip(bad[j], pos)
        assert not m.verify_inclusion(leaves[i], i, n, bad, root)
    if n > 1:
        other = data.draw(st.integers(0, n - 1).filter(lambda x: x != i), label="wrong index")
        assert not m.verify_inclusion(leaves[i], other, n, proof, root)
        assert not m.verify_inclusion(leaves[i], i, n, proof[:-1], root)
        assert not m.verify_inclusion(leaves[i], i, n, [*proof, proof[-1]], root)
    first = data.draw(st.integers(1, n), label="first")
    proof = m.consistency_proof(first, n, store)
    if first < n:
        assert not m.verify_consistency(first, n, _flip(roots[first], pos), root, proof)
        assert not m.verify_consistency(first, n, roots[first], _flip(root, pos), proof)
        for j in range(len(proof)):
            bad = list(proof)
            bad[j] = _flip(bad[j], pos)
            assert not m.verify_consistency(first, n, roots[first], root, bad)
        assert not m.verify_consistency(first, n, roots[first], root, proof[:-1])


@settings(max_examples=200, deadline=None)
@given(
    leaf=st.binary(max_size=40),
    index=st.integers(-(2**65), 2**65),
    size=st.integers(-(2**65), 2**65),
    proof=st.lists(st.binary(max_size=40), max_size=70),
    root=st.binary(max_size=40),
)
def test_verify_never_raises(
    leaf: bytes, index: int, size: int, proof: list[bytes], root: bytes
) -> None:
    assert isinstance(m.verify_inclusion(leaf, index, size, proof, root), bool)
    assert isinstance(m.verify_consistency(index, size, leaf, root, proof), bool)


def test_proof_lengths_logarithmic() -> None:
    n = 10**6 + 7
    for i in (0, 1, n // 2, n - 1):
        assert len(m.inclusion_proof_ranges(i, n)) <= math.ceil(math.log2(n))
    for first in (1, 2, 1000, n - 1):
        assert len(m.consistency_proof_ranges(first, n)) <= 2 * math.ceil(math.log2(n))
