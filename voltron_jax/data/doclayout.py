"""Where each prepared document lies: the prepared JSONL files, the seeded sort key, and every token store's
documents in their final order as byte ranges of those files.

Below both writers of token stores: `prepare._fill` streams the seeded stores from `layout` + `texts`, and
`ranges.plan` cuts the same order (per cluster, or per bucket of the seeded key) into ranges tokenised in
parallel, so both write the same bytes. Memory: three integers per document (file, offset, length), never
the texts.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from etils import epath

from voltron_jax.data.corpus import DataError

VALIDATION = "validation.jsonl"


def shard_path(out: epath.Path, cluster: int, n_clusters: int) -> epath.Path:
    """The prepared JSONL file of one cluster (its documents in ICP order)."""
    return out / "train" / f"cluster-{cluster:05d}-of-{n_clusters:05d}.jsonl"


def shuffle_key(seed: int, index: int) -> bytes:
    """Sort key of a document in the seeded random orders: a hash of (seed, corpus index)."""
    return hashlib.sha256(f"{int(seed)}/{int(index)}".encode()).digest()[:12]


def _scan(path: epath.Path, fields: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(byte offsets int64[N], byte lengths int64[N], {field: int64[N]}) of the records of a JSONL file."""
    offsets, lengths, vals = [], [], {f: [] for f in fields}
    pos = 0
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
                lengths.append(len(line))
                if fields:
                    r = json.loads(line)
                    for k in fields:
                        vals[k].append(r[k])
            pos += len(line)
    return (
        np.asarray(offsets, np.int64),
        np.asarray(lengths, np.int64),
        {k: np.asarray(v, np.int64) for k, v in vals.items()},
    )


def shuffle_keys(seed: int, index: np.ndarray) -> np.ndarray:
    """`shuffle_key` of each corpus index, as S12[N] (numpy orders them as bytes, as Python does)."""
    return np.asarray([shuffle_key(seed, int(i)) for i in index], dtype="S12").reshape(-1)


def _shuffled(seed: int, index: np.ndarray) -> np.ndarray:
    """Positions in the seeded order `prepare.shuffle_key` gives (a stable sort, as Python's sorted)."""
    return np.argsort(shuffle_keys(seed, index), kind="stable")


def layout(store: str, data_cfg, out) -> tuple[list[str], list[tuple[str | None, np.ndarray]]]:
    """(files, [(segment or None, refs int64[N, 3] = (file, offset, length))]): store `store`'s documents
    in their order (prepare._fill), as byte ranges of the prepared JSONL files (paths relative to `out`).
    Memory: three integers per document (and a 12-byte sort key while a seeded order is sorted)."""
    files: list[str] = []
    return files, _store_docs(store, data_cfg, epath.Path(out), files)


def texts(out, files: list[str], refs: np.ndarray):
    """The texts at `refs` (rows (file, offset, length) into `files` under `out`), in order, one at a time."""
    out, handles = epath.Path(out), {}
    try:
        for fid, off, ln in refs:
            f = handles.get(int(fid))
            if f is None:
                f = handles[int(fid)] = (out / files[int(fid)]).open("rb")
            f.seek(int(off))
            yield json.loads(f.read(int(ln)))["text"]
    finally:
        for f in handles.values():
            f.close()


def _store_docs(
    store: str, data_cfg, out: epath.Path, files: list[str]
) -> list[tuple[str | None, np.ndarray]]:
    k, seed = int(data_cfg.n_clusters), int(data_cfg.shuffle_seed)

    def refs(rel: str, fields=()):
        off, ln, vals = _scan(out / rel, fields)
        fid = files.index(rel) if rel in files else (files.append(rel) or len(files) - 1)
        return np.stack([np.full(len(off), fid, np.int64), off, ln], 1).reshape(-1, 3), vals

    train = [os.path.relpath(os.fspath(shard_path(out, j, k)), os.fspath(out)) for j in range(k)]
    if store == "icp":
        return [(f"cluster_{j}", refs(train[j])[0]) for j in range(k)]
    if store == "cluster_shuffled":
        out_ = []
        for j in range(k):
            r, v = refs(train[j], ("index",))
            out_.append((f"cluster_{j}", r[_shuffled(seed, v["index"])]))
        return out_
    if store == "random":
        parts = [refs(train[j], ("index",)) for j in range(k)]
        r = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 3), np.int64)
        index = np.concatenate([p[1]["index"] for p in parts])
        return [(None, r[_shuffled(seed, index)])]
    if store == "validation":
        return [(None, refs(VALIDATION)[0])]
    if store == "validation_clusters":
        r, v = refs(VALIDATION, ("cluster",))
        return [(f"cluster_{j}", r[v["cluster"] == j]) for j in range(k)]
    raise DataError(f"unknown token store {store!r}.")
