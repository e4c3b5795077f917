"""Exact and near-duplicate detection over a document column, deterministic and with bounded memory.

Exact: a 64-bit xxh3 hash of each document in one numpy array, stably sorted; every later copy of a hash is a
duplicate (the first occurrence in corpus order is kept).

Near: MinHash signatures (datasketch's MinHash with one fixed set of permutations, so it is reproducible)
over lower-cased word n-gram shingles, written to a memory-mapped file on disk; then LSH banding (b bands of
r rows, datasketch's choice for the threshold) one band at a time: each band's keys are hashed into a uint64
array and sorted, documents sharing a key are candidates, and a candidate is kept as a duplicate only when the
signatures agree on >= threshold of their rows (the Jaccard estimate), which removes most LSH false positives.
Duplicates are merged with union-find into clusters whose representative is the earliest document.
RAM holds a few integers per document (the key array, its sort order, the union-find parents), never text:
signatures live on disk, so corpora larger than memory work.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

WORD = re.compile(r"\w+", re.UNICODE)
MAX_CHECKS = 16  # candidates compared per document in one bucket (buckets of true duplicates are small)


def exact_duplicates(texts: Iterable[str], n: int) -> np.ndarray:
    """Boolean mask: True for a document whose exact text appeared earlier."""
    import xxhash

    hashes = np.fromiter((xxhash.xxh3_64_intdigest(t.encode("utf-8")) for t in texts), dtype=np.uint64, count=n)
    return _later_copies(hashes)


def _later_copies(keys: np.ndarray) -> np.ndarray:
    order = np.argsort(keys, kind="stable")
    ranked = keys[order]
    dup = np.zeros(len(keys), dtype=bool)
    dup[order[1:][ranked[1:] == ranked[:-1]]] = True
    return dup


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives at the threshold (datasketch's optimiser)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def shingles(text: str, ngram: int) -> list[bytes]:
    words = WORD.findall(text.lower())
    if len(words) <= ngram:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i : i + ngram]).encode("utf-8") for i in range(len(words) - ngram + 1)]


def signatures(texts: Iterator[str], n: int, num_perm: int, ngram: int, seed: int, path: Path) -> np.ndarray:
    """MinHash signatures (n x num_perm uint32) in a memory-mapped file."""
    import xxhash
    from datasketch import MinHash

    mh = MinHash(num_perm=num_perm, seed=seed, hashfunc=xxhash.xxh32_intdigest)  # permutations drawn once
    sigs = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint32, shape=(max(n, 1), num_perm))
    for i, text in enumerate(texts):
        mh.clear()
        mh.update_batch(shingles(text, ngram))
        sigs[i] = mh.hashvalues
    sigs.flush()
    return sigs


def near_duplicates(
    texts: Iterator[str], n: int, threshold: float, num_perm: int, ngram: int, seed: int, workdir: Path
) -> np.ndarray:
    """Boolean mask: True for a document that is a near-duplicate of an earlier one (its cluster's first)."""
    if n < 2:
        return np.zeros(n, dtype=bool)
    sigs = signatures(texts, n, num_perm, ngram, seed, workdir / "minhash.npy")
    bands, rows = lsh_params(threshold, num_perm)
    parent = np.arange(n, dtype=np.int64)
    weights = np.random.default_rng(seed).integers(1, 2**63 - 1, size=rows, dtype=np.uint64) | np.uint64(1)
    for band in range(bands):
        block = np.asarray(sigs[:, band * rows : (band + 1) * rows], dtype=np.uint64)
        with np.errstate(over="ignore"):  # a polynomial hash of the band's rows, mod 2^64
            keys = (block * weights).sum(axis=1, dtype=np.uint64)
        _merge_bucket_members(keys, sigs, parent, threshold)
    roots = np.array([_find(parent, i) for i in range(n)])
    return roots != np.arange(n)


def _merge_bucket_members(keys: np.ndarray, sigs: np.ndarray, parent: np.ndarray, threshold: float) -> None:
    order = np.argsort(keys, kind="stable")  # equal keys: corpus order, so earlier documents come first
    ranked = keys[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        members = order[start:end]
        for j in range(1, len(members)):
            doc = int(members[j])
            for earlier in members[max(0, j - MAX_CHECKS) : j]:
                if _find(parent, doc) == _find(parent, int(earlier)):
                    break
                if np.mean(sigs[doc] == sigs[int(earlier)]) >= threshold:
                    _union(parent, doc, int(earlier))
                    break


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = int(parent[root])
    while parent[i] != root:  # path compression
        parent[i], i = root, int(parent[i])
    return root


def _union(parent: np.ndarray, a: int, b: int) -> None:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:  # the earliest document stays the root, so it is the one kept
        parent[max(ra, rb)] = min(ra, rb)
