"""Deduplication: exact (by normalized-content hash) and near-duplicate (MinHash + LSH banding).

Both run in two phases so memory stays bounded on large inputs: workers compute small per-document
fingerprints (one 64-bit hash; `bands` 64-bit LSH band hashes), and after the cleaning pass the
fingerprints alone (8 bytes per document per band, never the text) decide which documents to keep.
The first occurrence is kept, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import xxhash

_MERSENNE = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising false positives + false negatives around
    `threshold` (the same criterion as datasketch: areas under the S-curve 1-(1-s^r)^b)."""

    def area(f, lo, hi, steps=200):
        xs = np.linspace(lo, hi, steps)
        return float(np.trapezoid(f(xs), xs)) if hasattr(np, "trapezoid") else float(np.trapz(f(xs), xs))

    best, best_err = (1, num_perm), math.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = area(lambda s, b=b, r=r: 1 - (1 - s**r) ** b, 0.0, threshold)
            fn = area(lambda s, b=b, r=r: (1 - s**r) ** b, threshold, 1.0)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


@dataclass
class MinHasher:
    """MinHash signatures of word n-gram shingles, reduced to LSH band hashes (vectorized with numpy)."""

    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        from seektrain.errors import UserError

        if not 0.0 < self.threshold < 1.0:
            raise UserError(f"minhash threshold must lie in (0, 1), got {self.threshold}")
        self.num_bands, self.rows = _cached_params(self.threshold, self.num_perm)
        rng = np.random.default_rng(self.seed)
        self._a = rng.integers(1, 1 << 32, self.num_perm, dtype=np.uint64)  # (P,)
        self._b = rng.integers(0, 1 << 32, self.num_perm, dtype=np.uint64)  # (P,)

    def signature(self, words: list[str]) -> np.ndarray:
        """(P,) uint64 MinHash signature of the document's word n-grams (the whole text if shorter)."""
        n = min(self.ngram, max(len(words), 1))
        shingles = {" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}
        hv = np.fromiter(
            (xxhash.xxh32_intdigest(s.encode()) for s in shingles), dtype=np.uint64, count=len(shingles)
        )
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(hv), 4096):  # chunks keep the (S, P) product small
            chunk = hv[start : start + 4096, None]  # (S, 1)
            phv = ((chunk * self._a + self._b) % _MERSENNE) & _MASK32  # (S, P), no overflow: a, hv < 2^32
            np.minimum(sig, phv.min(axis=0), out=sig)
        return sig

    def bands(self, words: list[str]) -> bytes:
        """Band hashes (num_bands little-endian uint64) of the signature: equal band = LSH candidate."""
        sig = self.signature(words)[: self.num_bands * self.rows].reshape(self.num_bands, self.rows)
        out = np.array(
            [xxhash.xxh3_64_intdigest(row.tobytes(), seed=i) for i, row in enumerate(sig)], dtype="<u8"
        )
        return out.tobytes()


_PARAMS: dict[tuple[float, int], tuple[int, int]] = {}


def _cached_params(threshold: float, num_perm: int) -> tuple[int, int]:
    if (threshold, num_perm) not in _PARAMS:
        _PARAMS[(threshold, num_perm)] = lsh_params(threshold, num_perm)
    return _PARAMS[(threshold, num_perm)]


def exact_keep(hashes: np.ndarray) -> np.ndarray:
    """(N,) bool: True for the first document with each hash."""
    keep = np.zeros(len(hashes), dtype=bool)
    if len(hashes):
        _, first = np.unique(hashes, return_index=True)
        keep[first] = True
    return keep


def near_dup_keep(bands: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """(K,) bool over `rows` of the (N, B) band hashes (all rows by default; may be memory-mapped):
    documents sharing any band are joined (union-find, transitively) and only the first of each group
    is kept. One band column is in memory at a time."""
    rows = np.arange(len(bands)) if rows is None else rows
    n = len(rows)
    parent: dict[int, int] = {}  # only documents that collide somewhere: small

    def find(i: int) -> int:
        root = i
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(i, i) != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    for j in range(bands.shape[1] if n else 0):
        col = np.asarray(bands[rows, j])  # (K,)
        order = np.argsort(col, kind="stable")  # (K,) equal hashes become adjacent, lower index first
        sorted_col = col[order]
        same = np.flatnonzero(sorted_col[1:] == sorted_col[:-1])  # order[k+1] collides with order[k]
        for k in same:
            a, b = find(int(order[k])), find(int(order[k + 1]))
            if a != b:
                parent[max(a, b)] = min(a, b)
    keep = np.ones(n, dtype=bool)
    for i in list(parent):
        if find(i) != i:
            keep[i] = False
    return keep
