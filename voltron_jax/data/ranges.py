"""Token stores tokenised in parallel ranges: plan -> tokenise each range (any worker) -> pack in order.

The Beam preparation (voltron_jax/data/beam_pipeline.py) uses this so that the tokenisation, ~1 MB/s of
text per core with SentencePiece, is spread over the workers; the in-process preparation writes the same
stores sequentially (`prepare.tokenize`), and both give the same bytes (tests/data/test_beam.py).

1. `plan(data_cfg, out, vocab, range_bytes)` (one worker, I/O only): once the final document order of
   each store is fixed (the prepared JSONL files: clusters in ICP order; orderings.py), it reads the
   files once, line offsets and lengths only (plus the corpus index, for the seeded orders, and the
   cluster of validation documents), lays out each store's documents in the order `prepare._fill` writes
   them, and cuts them into contiguous ranges of about `range_bytes` of JSONL text. A range never spans
   two segments (clusters), so segment boundaries are range boundaries. Stores already complete are
   left out.
2. `tokenize_range(task, data_cfg, out)` (in parallel): reads the range's lines by offset, tokenises
   them with the store's vocabulary and writes the packed id stream (each document followed by EOS, in
   the store's dtype) as one .npy file under `<out>/tokenize-tmp/<fingerprint>-<vocab>/<store>/`,
   atomically (a temporary name, then a rename). Deterministic: a retried range writes the same bytes.
3. `pack(store_plan, data_cfg, out, vocab)` (one worker, I/O only): `shards.build_store` appends the
   range files in order (`StoreWriter.add_stream`), opens each segment where it starts, writes the index
   last and renames the store into place; only then are that store's range files removed. A missing or
   wrong range file is one DataError naming it; the store is then left incomplete (no index), which the
   readers never take as finished and the next prepare writes again.

Sizing: the plan holds three numbers per document (file, offset, length) of every store it writes; the
plan of a c4-scale corpus (~365M documents) would need ~10 GB on that one worker, which this does not
shard yet. Ranges default to 64 MB of text (~60 s of SentencePiece per range on one core).
"""

from __future__ import annotations

import io
import os

import numpy as np
from etils import epath

from voltron_jax.data import doclayout, orderings, packing, prepare, shards
from voltron_jax.data.corpus import DataError

TMP = "tokenize-tmp"
RANGE_BYTES = 64 << 20


def _cut(refs: np.ndarray, range_bytes: int) -> list[np.ndarray]:
    """Contiguous pieces of `refs` of about `range_bytes` bytes each (at least one document each)."""
    if not len(refs):
        return []
    ends = np.cumsum(refs[:, 2])
    cuts = np.searchsorted(ends, np.arange(range_bytes, int(ends[-1]), range_bytes), side="left") + 1
    cuts = np.unique(cuts[(cuts > 0) & (cuts < len(refs))])
    return np.split(refs, cuts)


def tmp_dir(out, base: epath.Path) -> epath.Path:
    """Where the range files of the stores under `base` (prepare.token_dir) go: the output's temp area."""
    return epath.Path(out) / TMP / epath.Path(base).name


def plan(data_cfg, out, vocab, range_bytes: int = RANGE_BYTES) -> list[dict]:
    """The ranges of every store data.ordering reads that is not complete yet (one dict per store)."""
    out = epath.Path(out)
    base = prepare.token_dir(out, vocab, data_cfg)
    stores = []
    for store in (*orderings.train_stores(data_cfg.ordering), *prepare.VALIDATION_STORES):
        name = prepare.store_name(store, data_cfg)
        if shards.is_complete(base / name):
            continue
        files, docs = doclayout.layout(store, data_cfg, out)
        segments, tasks = [], []
        for seg, refs in docs:
            ids = []
            for piece in _cut(refs, int(range_bytes)):
                ids.append(len(tasks))
                tasks.append(dict(store=name, i=len(tasks), refs=piece, files=files, documents=len(piece)))
            segments.append((seg, ids))
        stores.append(
            dict(
                store=name,
                path=os.fspath(base / name),
                tmp=os.fspath(tmp_dir(out, base) / name),
                segments=segments,
                ranges=tasks,
            )
        )
    return stores


def range_file(tmp: str, i: int) -> epath.Path:
    return epath.Path(tmp) / f"range-{i:06d}.npy"


def tokenize_range(task: dict, tmp: str, vocab, out) -> dict:
    """Tokenise one range into its .npy file (atomically); returns {store, i, tokens, documents}."""
    docs_text = list(doclayout.texts(out, task["files"], task["refs"]))
    dtype = packing.token_dtype(int(vocab.vocab_size))
    docs = [
        d
        for i in range(0, len(docs_text), shards.ENCODE_BATCH)
        for d in shards.encode_batch(vocab, docs_text[i : i + shards.ENCODE_BATCH])
    ]
    stream, _ = packing.pack_stream(docs, int(vocab.eos_id), dtype)
    buf = io.BytesIO()
    np.save(buf, stream, allow_pickle=False)
    path = range_file(tmp, task["i"])
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.parent / f"{path.name}.tmp-{os.getpid()}"
    part.write_bytes(buf.getvalue())
    part.replace(path)
    return dict(store=task["store"], i=task["i"], tokens=len(stream), documents=len(docs))


def pack(store: dict, vocab, done: list[dict] | None = None) -> dict:
    """Write `store` (a plan entry) from its range files in order, index last; then remove the range files.

    `done`: what tokenize_range returned for this store's ranges (checked against the files)."""
    expect = {d["i"]: d for d in done or () if d["store"] == store["store"]}

    def fill(w: shards.StoreWriter) -> None:
        for seg, ids in store["segments"]:
            if seg is not None:
                w.begin_segment(seg)
            for i in ids:
                f = range_file(store["tmp"], i)
                if not f.exists():
                    raise DataError(
                        f"range file {f} of token store {store['path']} is missing (its tokenise step did "
                        "not finish); run the preparation again."
                    )
                try:
                    stream = np.load(io.BytesIO(f.read_bytes()), allow_pickle=False)
                except ValueError as e:
                    raise DataError(f"range file {f} is damaged ({e}); run the preparation again.") from e
                n = store["ranges"][i]["documents"]
                if i in expect and (expect[i]["tokens"], expect[i]["documents"]) != (len(stream), n):
                    raise DataError(
                        f"range file {f} holds {len(stream)} ids, its tokenise step wrote "
                        f"{expect[i]['tokens']}; run the preparation again."
                    )
                w.add_stream(stream, n)

    index = shards.build_store(store["path"], vocab, fill)
    tmp = epath.Path(store["tmp"])  # removed only now: the store's index is committed
    if tmp.exists():
        tmp.rmtree()
    parent = tmp.parent
    for d in (parent, parent.parent):  # <out>/tokenize-tmp/<base>, then <out>/tokenize-tmp, when empty
        if d.exists() and not any(d.iterdir()):
            d.rmdir()
    return index


def tokenize(data_cfg, out, vocab=None, range_bytes: int = RANGE_BYTES, map_fn=map) -> dict[str, str]:
    """`prepare.tokenize` by ranges: plan, tokenise every range with `map_fn` (map, or a pool's map), pack.
    Returns {store folder name: path}. Beam runs the same three steps as a graph."""
    out = epath.Path(out)
    vocab = vocab or prepare.prepared_vocab(data_cfg, out)
    stores = plan(data_cfg, out, vocab, range_bytes)
    tasks = [(t, s["tmp"]) for s in stores for t in s["ranges"]]
    done = list(map_fn(lambda a: tokenize_range(a[0], a[1], vocab, out), tasks))
    for s in stores:
        pack(s, vocab, done)
    return {s["store"]: s["path"] for s in stores}
