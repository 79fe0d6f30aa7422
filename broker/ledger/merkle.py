"""RFC 9162 (Certificate Transparency v2) Merkle tree over stored complete subtrees.

The ledger stores the hash of every complete, aligned subtree as a node keyed
``(level, index)``: node ``(l, i)`` covers leaves ``[i * 2**l, (i + 1) * 2**l)``.
Every range that occurs in an RFC 9162 proof is a concatenation of O(log n) such
nodes, so proofs are served from a handful of indexed rows instead of rebuilding
the tree; the append path only ever touches the tree's right edge (the
"frontier").  Everything here is pure and depends only on the standard library
so the offline verifier can reuse it.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Node",
    "StreamingTree",
    "append_leaves",
    "consistency_proof",
    "consistency_proof_ranges",
    "inclusion_proof",
    "inclusion_proof_ranges",
    "leaf_hash",
    "node_hash",
    "nodes_needed",
    "range_hash",
    "root_from_frontier",
    "subtree_nodes",
    "verify_consistency",
    "verify_inclusion",
]

Node = tuple[int, int]
"""``(level, index)`` of a complete aligned subtree."""

HASH_SIZE = 32
EMPTY_ROOT: bytes = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """Hash a leaf with the 0x00 domain prefix so a leaf can never pose as an inner node."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash two children with the 0x01 domain prefix (RFC 9162 section 2.1.1)."""
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (n > 1): the RFC's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


def subtree_nodes(start: int, end: int) -> list[Node]:
    """Decompose leaves ``[start, end)`` into aligned complete subtrees, left to right.

    Each step takes the largest power of two that is both aligned at the current
    position and fits; for ``[0, n)`` and for every range in an RFC 9162 proof this
    yields strictly decreasing sizes, which is exactly the shape of the MTH.
    """
    if not 0 <= start <= end:
        raise ValueError(f"invalid leaf range [{start}, {end})")
    out: list[Node] = []
    while start < end:
        level = (end - start).bit_length() - 1
        if start:
            align = (start & -start).bit_length() - 1
            level = min(level, align)
        out.append((level, start >> level))
        start += 1 << level
    return out


def _fold(hashes: Sequence[bytes]) -> bytes:
    """Combine right-edge subtree hashes right to left into the MTH they represent."""
    h = hashes[-1]
    for left in reversed(hashes[:-1]):
        h = _sha256(b"\x01" + left + h).digest()
    return h


def range_hash(start: int, end: int, nodes: Mapping[Node, bytes]) -> bytes:
    """RFC 9162 MTH of leaves ``[start, end)`` from stored complete subtrees.

    Only ranges whose decomposition has strictly decreasing sizes (all ranges in
    RFC 9162 proofs, and every prefix) have an MTH equal to the right-to-left fold,
    so any other range is rejected rather than silently hashed differently.
    Raises ``KeyError`` naming the node if the store lacks one.
    """
    if start == end:
        if start == 0:
            return EMPTY_ROOT
        raise ValueError(f"empty range [{start}, {end}) has no hash")
    parts = subtree_nodes(start, end)
    for (hi, _), (lo, _) in itertools.pairwise(parts):
        if lo >= hi:
            raise ValueError(f"[{start}, {end}) is not an RFC 9162 subtree range")
    return _fold([nodes[node] for node in parts])


def inclusion_proof_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Leaf ranges whose MTHs form PATH(index, D[size]) (RFC 9162 2.1.3.1), in proof order."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} not in tree of size {size}")
    out: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        mid = lo + _split(hi - lo)
        if index < mid:
            out.append((mid, hi))
            hi = mid
        else:
            out.append((lo, mid))
            lo = mid
    out.reverse()  # the recursion emits the deepest sibling first
    return out


def consistency_proof_ranges(first: int, second: int) -> list[tuple[int, int]]:
    """Leaf ranges whose MTHs form PROOF(first, D[second]) (RFC 9162 2.1.4.1), in proof order."""
    if not 0 < first <= second:
        raise ValueError(f"no consistency proof from size {first} to size {second}")
    out: list[tuple[int, int]] = []
    lo, hi, m, complete = 0, second, first, True
    while m != hi - lo:
        mid = lo + _split(hi - lo)
        if m <= mid - lo:
            out.append((mid, hi))
            hi = mid
        else:
            out.append((lo, mid))
            m -= mid - lo
            lo = mid
            complete = False
    if not complete:
        out.append((lo, hi))  # SUBPROOF(m, D[m], false) = {MTH(D[m])}
    out.reverse()
    return out


def nodes_needed(ranges: Iterable[tuple[int, int]]) -> set[Node]:
    """Stored nodes to fetch (in one query) before computing the given range hashes."""
    needed: set[Node] = set()
    for start, end in ranges:
        needed.update(subtree_nodes(start, end))
    return needed


def inclusion_proof(index: int, size: int, nodes: Mapping[Node, bytes]) -> list[bytes]:
    """RFC 9162 inclusion proof for leaf ``index`` in the tree of ``size`` leaves."""
    return [range_hash(a, b, nodes) for a, b in inclusion_proof_ranges(index, size)]


def consistency_proof(first: int, second: int, nodes: Mapping[Node, bytes]) -> list[bytes]:
    """RFC 9162 consistency proof between tree sizes ``first`` and ``second``."""
    return [range_hash(a, b, nodes) for a, b in consistency_proof_ranges(first, second)]


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 2.1.3.2 verification; ``leaf`` is the leaf *hash*. Never raises."""
    try:
        if not (_is_hash(leaf) and _is_hash(root) and _is_size(index) and _is_size(size)):
            return False
        if not all(_is_hash(p) for p in proof):
            return False
        if index < 0 or index >= size:
            return False
        fn, sn = index, size - 1
        r = leaf
        for p in proof:
            if sn == 0:
                return False
            if fn & 1 or fn == sn:
                r = node_hash(p, r)
                while fn and not fn & 1:  # "if LSB(fn) is not set, shift until ..."
                    fn >>= 1
                    sn >>= 1
            else:
                r = node_hash(r, p)
            fn >>= 1
            sn >>= 1
        return sn == 0 and r == root
    except (TypeError, ValueError):
        return False


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 2.1.4.2 verification. Never raises.

    Equal sizes are accepted with an empty proof and equal roots (the RFC's
    algorithm rejects every empty path, but PROOF(m, D[m]) is empty by definition).
    """
    try:
        if not (_is_size(first) and _is_size(second)):
            return False
        if not (_is_hash(first_root) and _is_hash(second_root)):
            return False
        path = list(proof)
        if not all(_is_hash(p) for p in path):
            return False
        if first < 1 or second < first:
            return False
        if first == second:
            return not path and first_root == second_root
        if not path:
            return False
        if first & (first - 1) == 0:
            path.insert(0, first_root)
        fn, sn = first - 1, second - 1
        while fn & 1:
            fn >>= 1
            sn >>= 1
        fr = sr = path[0]
        for c in path[1:]:
            if sn == 0:
                return False
            if fn & 1 or fn == sn:
                fr = node_hash(c, fr)
                sr = node_hash(c, sr)
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
            else:
                sr = node_hash(sr, c)
            fn >>= 1
            sn >>= 1
        return fr == first_root and sr == second_root and sn == 0
    except (TypeError, ValueError):
        return False


def append_leaves(
    size: int, frontier: Mapping[Node, bytes], leaves: Sequence[bytes]
) -> tuple[list[tuple[int, int, bytes]], dict[Node, bytes]]:
    """Append leaf hashes to a tree of ``size`` leaves, touching only its right edge.

    ``frontier`` must hold the nodes of ``subtree_nodes(0, size)``.  Returns every
    node completed by the batch (level-0 leaves included) as ``(level, index, hash)``
    rows for the store, and the frontier of the grown tree.
    """
    if size < 0:
        raise ValueError(f"negative tree size {size}")
    stack = [frontier[node] for node in subtree_nodes(0, size)]
    created: list[tuple[int, int, bytes]] = []
    n = size
    for leaf in leaves:
        if not _is_hash(leaf):
            raise ValueError(f"leaf {n} is not a {HASH_SIZE}-byte hash")
        created.append((0, n, leaf))
        h, level, index = leaf, 0, n
        while index & 1:  # a right child completes its parent
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            level += 1
            index >>= 1
            created.append((level, index, h))
        stack.append(h)
        n += 1
    return created, dict(zip(subtree_nodes(0, n), stack, strict=True))


def root_from_frontier(size: int, frontier: Mapping[Node, bytes]) -> bytes:
    """Root hash of a tree of ``size`` leaves from its frontier nodes."""
    return range_hash(0, size, frontier)


class StreamingTree:
    """Append-only tree keeping only the right edge: O(log n) memory for the verifier."""

    __slots__ = ("_size", "_stack")

    def __init__(self) -> None:
        self._size = 0
        self._stack: list[bytes] = []

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    def append(self, leaf: bytes) -> None:
        """Add the next leaf hash, merging the complete subtrees it finishes."""
        stack = self._stack
        h = leaf
        n = self._size
        while n & 1:
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
        self._size += 1

    def root(self) -> bytes:
        """MTH of all leaves appended so far."""
        return _fold(self._stack) if self._stack else EMPTY_ROOT

    def frontier(self) -> dict[Node, bytes]:
        """Current right-edge nodes, in the same shape ``append_leaves`` consumes."""
        return dict(zip(subtree_nodes(0, self._size), self._stack, strict=True))
