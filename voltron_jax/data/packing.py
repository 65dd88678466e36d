"""Concatenate-and-chunk packing, row shuffling and mixture allocation: pure numpy, no TensorFlow.

Packing: the documents of a split, each followed by EOS, form one token stream S of N tokens. Row r is
the window S[r*T : r*T + T + 1]: inputs are its first T tokens, targets its last T, so consecutive rows
share one boundary token and no token is lost (N - 1 >= rows * T; only the tail shorter than a row is
dropped). Positions run 0..T-1 in every row (continuous across documents, as ICP wants); segment ids
count documents within a row from 1 and step up right after each EOS, for an optional document mask.
(seqio's trim-and-pack is not used: it drops most of each long document.)

Shuffling permutes rows (contexts), never documents: epoch e of a task uses the permutation drawn
from (seed parts, e). Mixtures give each global row to a task by the largest-deficit rule, which keeps
every task's running row count within one row of rate * rows and is a pure function of the counts, so
an iterator state of per-task counts resumes exactly.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest storage dtype for ids below `vocab_size` (uint16 halves the cache of a byte corpus)."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def pack_stream(docs: Sequence[np.ndarray], eos_id: int, dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Documents (token arrays without EOS) -> (stream with one EOS after each document, document lengths).

    The lengths include the EOS, so `lengths.sum() == len(stream)`.
    """
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    stream = np.full(int(lengths.sum()), eos_id, dtype=dtype)
    ends = np.cumsum(lengths)
    for doc, end, n in zip(docs, ends, lengths, strict=True):
        stream[end - n : end - 1] = doc
    return stream, lengths


def num_rows(n_tokens: int, seq_len: int) -> int:
    """Rows of `seq_len` inputs (+1 shared target) a stream of `n_tokens` yields."""
    return max(0, (n_tokens - 1) // seq_len)


def gather_rows(stream: np.ndarray, rows: np.ndarray, seq_len: int) -> np.ndarray:
    """Windows of T+1 tokens of rows `rows`: int32[len(rows), T+1]."""
    starts = np.asarray(rows, dtype=np.int64)[:, None] * seq_len
    return stream[starts + np.arange(seq_len + 1)].astype(np.int32)


def make_batch(windows: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """[B, T+1] windows -> inputs/targets/positions/segment_ids int32[B, T], weights float32[B, T]."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    b, t = inputs.shape
    after_eos = np.zeros((b, t), dtype=np.int32)
    after_eos[:, 1:] = inputs[:, :-1] == eos_id
    return dict(
        inputs=np.ascontiguousarray(inputs, dtype=np.int32),
        targets=np.ascontiguousarray(targets, dtype=np.int32),
        positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        segment_ids=1 + np.cumsum(after_eos, axis=1, dtype=np.int32),
        weights=np.ones((b, t), dtype=np.float32),
    )


def stable_hash(text: str) -> int:
    """A 32-bit hash of `text` that is the same in every process (unlike hash())."""
    return zlib.crc32(text.encode("utf-8"))


def epoch_permutation(n_rows: int, seed_parts: Sequence[int], epoch: int) -> np.ndarray:
    """The row order of `epoch`: a permutation of range(n_rows) fixed by (seed_parts, epoch)."""
    rng = np.random.default_rng([*(int(s) & 0xFFFFFFFF for s in seed_parts), int(epoch)])
    return rng.permutation(n_rows)


def allocate(rates: Sequence[float], counts: Sequence[int], n: int) -> np.ndarray:
    """Task index of each of the next `n` rows of a mixture; `counts` = rows each task got so far.

    Largest deficit first: row g goes to argmax_j rates[j] * (g + 1) - counts[j] (ties: lowest j), where
    g = sum(counts) is the global row index. Depends only on the counts, so it resumes exactly.
    """
    rates = np.asarray(rates, dtype=np.float64)
    c = np.asarray(counts, dtype=np.int64).copy()
    g = int(c.sum())
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        j = int(np.argmax(rates * (g + i + 1) - c))
        out[i] = j
        c[j] += 1
    return out
