"""Exact and near-duplicate removal on crafted documents: duplicates go, unique documents stay."""

import random

import numpy as np
from data_helpers import make_doc

from seektrain.data.clean import CleanConfig, clean_document
from seektrain.data.dedup import MinHasher, exact_keep, lsh_params, near_dup_keep


def test_lsh_params_match_datasketch():
    from datasketch.lsh import _optimal_param

    for threshold, perm in [(0.5, 64), (0.8, 128), (0.9, 256)]:
        assert lsh_params(threshold, perm) == _optimal_param(threshold, perm, 0.5, 0.5)


def test_minhash_estimates_jaccard():
    # Word-5-gram sets with a known Jaccard similarity; with 256 permutations the estimate's standard
    # error is sqrt(J(1-J)/256) <= 0.031, so 0.1 is a > 3-sigma bound.
    rng = random.Random(0)
    words = [f"w{rng.randrange(10**6)}" for _ in range(404)]  # 400 distinct 5-grams
    other = words[:204] + [f"x{i}" for i in range(200)]  # shares 200 of its 5-grams: J = 200 / 600
    mh = MinHasher(threshold=0.5, num_perm=256)
    est = float((mh.signature(words) == mh.signature(other)).mean())
    assert abs(est - 200 / 600) < 0.1
    assert (mh.signature(words) == mh.signature(list(words))).all()


def test_exact_keep_first_occurrence():
    assert exact_keep(np.array([5, 3, 5, 7, 3], dtype=np.uint64)).tolist() == [True, True, False, True, False]


def test_near_duplicates_removed_unique_kept():
    rng = random.Random(1)
    base = [make_doc(rng, 300) for _ in range(6)]
    near = []
    for d in base[:3]:  # change 2 of 300 words: Jaccard of 5-grams stays around 0.94
        w = d.split(" ")
        w[50], w[200] = "changed", "edited"
        near.append(" ".join(w))
    docs = base + near + [base[4]]  # plus one exact copy
    mh = MinHasher(threshold=0.8)
    cleaned = [clean_document(d, CleanConfig(), mh) for d in docs]
    keys = np.array([c.key_hash for c in cleaned], dtype=np.uint64)
    bands = np.stack([np.frombuffer(c.bands, dtype="<u8") for c in cleaned])  # (N, bands)
    exact = exact_keep(keys)
    assert exact.tolist() == [True] * 9 + [False]
    near_keep = near_dup_keep(bands)
    assert near_keep.tolist() == [True] * 6 + [False] * 4  # near copies and the exact copy go, base stays


def test_near_dup_groups_are_transitive():
    # 0~1 in band 0, 1~2 in band 1: one group, only 0 kept; 3 is alone.
    bands = np.array([[1, 1, 7, 9], [4, 5, 5, 8]], dtype=np.uint64).T  # (4 docs, 2 bands)
    assert near_dup_keep(bands).tolist() == [True, False, False, True]
    assert near_dup_keep(bands, np.array([1, 2, 3])).tolist() == [True, False, True]
