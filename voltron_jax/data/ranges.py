"""Token stores tokenised in parallel ranges: plan (sharded) -> tokenise each range (any worker) -> pack.

The Beam preparation (voltron_jax/data/beam_pipeline.py) uses this so that the tokenisation, ~1 MB/s of
text per core with SentencePiece, is spread over the workers; the in-process preparation writes the same
stores sequentially (`prepare.tokenize`), and both give the same bytes (tests/data/test_beam.py).

1. The plan, sharded so that no worker holds per-document data of the whole corpus:
   a. `plan_stores(data_cfg, out, vocab)` (one worker, no per-document data): the stores data.ordering
      reads that are not complete yet, each split into units, the pieces of its final document order
      (prepare._fill, doclayout.py): `icp` and `cluster_shuffled` one unit per cluster (its segment),
      `validation` one, `validation_clusters` one per cluster, and the global shuffle `random` one unit
      per bucket of the seeded sort key (its leading 32 bits cut into B equal spans, B = the train
      JSONL text / PLAN_BUCKET_BYTES): the documents of bucket 0 in key order, then bucket 1, ... is
      exactly the global stable key order, so the buckets are planned independently.
   b. `scan(job, out)` (in parallel, one prepared JSONL file each): line offsets and lengths (plus the
      corpus index for the seeded orders, the cluster of validation documents) of that file, handed to
      every unit that reads it: `((store, unit), part)`. Holds one file's (one cluster's) documents.
   c. `cut_unit(parts, range_bytes)` (in parallel, one unit each): the unit's parts in file order, sorted
      by the seeded key where the store is shuffled, cut into ranges of about `range_bytes` of JSONL
      text. Holds one unit's documents (a cluster, or 1/B of the corpus); a range never spans units,
      so segment (cluster) boundaries are range boundaries.
   `plan` runs a-c in process (tests, `tokenize`); Beam runs them as a graph (scan, GroupByKey, cut).
2. `tokenize_range(task, tmp, vocab, out)` (in parallel): reads the range's lines by offset, tokenises
   them with the store's vocabulary and writes the packed id stream (each document followed by EOS, in
   the store's dtype) as one .npy file under `<out>/tokenize-tmp/<fingerprint>-<vocab>/<store>/`,
   atomically (a temporary name, then a rename). Deterministic: a retried range writes the same bytes.
3. `pack(store, vocab, done)` (one worker, I/O only, two integers per range): `shards.build_store`
   appends the range files in order (`StoreWriter.add_stream`), opens each segment where it starts,
   writes the index last and renames the store into place; only then are that store's range files
   removed. A missing unit, range file or wrong range file is one DataError naming it; the store is then
   left incomplete (no index), which the readers never take as finished and the next prepare writes again.

The bytes of a store do not depend on where the ranges are cut (the writer's records and shards follow
the concatenated stream), so the sharded plan writes what the sequential `prepare.tokenize` writes.
Ranges default to 64 MB of text (~60 s of SentencePiece per range on one core).
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from etils import epath

from voltron_jax.data import doclayout, orderings, packing, prepare, shards
from voltron_jax.data.corpus import DataError

TMP = "tokenize-tmp"
RANGE_BYTES = 64 << 20
PLAN_BUCKET_BYTES = 1 << 30  # JSONL text per planned unit of the `random` store (~12 MB of plan per unit)
SHUFFLED = ("random", "cluster_shuffled")


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


def prepared_files(out, n_clusters: int) -> list[str]:
    """The prepared JSONL files, relative to `out`: file id j < k is cluster j's, file id k validation's."""
    out = epath.Path(out)
    train = [doclayout.shard_path(out, j, n_clusters) for j in range(n_clusters)]
    return [os.path.relpath(os.fspath(p), os.fspath(out)) for p in train] + [doclayout.VALIDATION]


def _units(store: str, k: int, n_buckets: int) -> list[str | None]:
    """The segment of each unit of `store`, in store order (None: the store has no segments)."""
    if store in ("icp", "cluster_shuffled", "validation_clusters"):
        return [f"cluster_{j}" for j in range(k)]
    if store == "random":
        return [None] * n_buckets
    if store == "validation":
        return [None]
    raise DataError(f"unknown token store {store!r}.")


def plan_stores(data_cfg, out, vocab) -> list[dict]:
    """Step 1a: the stores data.ordering reads that are not complete yet, as units (no per-document data):
    [{store (folder name), kind, path, tmp, seed, buckets, files, units: [segment or None]}]."""
    out = epath.Path(out)
    base = prepare.token_dir(out, vocab, data_cfg)
    k, seed = int(data_cfg.n_clusters), int(data_cfg.shuffle_seed)
    files = prepared_files(out, k)
    train_bytes = sum((out / f).stat().length for f in files[:k] if (out / f).exists())
    n_buckets = max(1, math.ceil(train_bytes / PLAN_BUCKET_BYTES))
    stores = []
    for store in (*orderings.train_stores(data_cfg.ordering), *prepare.VALIDATION_STORES):
        name = prepare.store_name(store, data_cfg)
        if shards.is_complete(base / name):
            continue
        stores.append(
            dict(
                store=name,
                kind=store,
                path=os.fspath(base / name),
                tmp=os.fspath(tmp_dir(out, base) / name),
                seed=seed,
                buckets=n_buckets,
                files=files,
                units=_units(store, k, n_buckets),
            )
        )
    return stores


def unit_files(kind: str, unit: int, k: int) -> list[int]:
    """The file ids whose scan feeds unit `unit` of a store of kind `kind` (k clusters)."""
    if kind in ("icp", "cluster_shuffled"):
        return [unit]
    if kind == "random":
        return list(range(k))  # every cluster's file feeds every bucket
    return [k]  # validation, validation_clusters


def scan_jobs(stores: list[dict]) -> list[dict]:
    """One job per prepared file that some unit reads: {fid, file, fields, units: [(store, unit, kind)]}."""
    if not stores:
        return []
    files, k = stores[0]["files"], len(stores[0]["files"]) - 1
    jobs = {fid: dict(fid=fid, file=files[fid], fields=set(), units=[]) for fid in range(k + 1)}
    for st in stores:
        kind = st["kind"]
        for u in range(len(st["units"])):
            for fid in unit_files(kind, u, k):
                jobs[fid]["units"].append((st["store"], u, kind))
                if kind in SHUFFLED:
                    jobs[fid]["fields"].add("index")
                if kind == "validation_clusters":
                    jobs[fid]["fields"].add("cluster")
    seed, buckets = stores[0]["seed"], stores[0]["buckets"]
    return [
        dict(j, fields=sorted(j["fields"]), seed=seed, buckets=buckets) for j in jobs.values() if j["units"]
    ]


def _bucket(keys: np.ndarray, n_buckets: int) -> np.ndarray:
    """The bucket of each S12 key: its leading 32 bits (big-endian) cut into `n_buckets` equal spans."""
    lead = np.frombuffer(keys.tobytes(), np.uint8).reshape(-1, 12)[:, :4].astype(np.uint64)
    top = (lead[:, 0] << 24) | (lead[:, 1] << 16) | (lead[:, 2] << 8) | lead[:, 3]
    return (top * np.uint64(n_buckets) >> np.uint64(32)).astype(np.int64)


def scan(job: dict, out) -> list[tuple[tuple[str, int], dict]]:
    """Step 1b: scan one prepared file; its part of every unit that reads it, [((store, unit), part)] with
    part = {fid, refs int64[M, 3] (fid, offset, length), keys S12[M] (seeded stores) or None}."""
    off, ln, vals = doclayout._scan(epath.Path(out) / job["file"], tuple(job["fields"]))
    fid = job["fid"]
    refs = np.stack([np.full(len(off), fid, np.int64), off, ln], 1).reshape(-1, 3)
    keys = doclayout.shuffle_keys(job["seed"], vals["index"]) if "index" in vals else None
    buckets = _bucket(keys, job["buckets"]) if keys is not None and len(keys) else np.zeros(len(off), int)
    parts = []
    for store, u, kind in job["units"]:
        if kind in ("icp", "validation"):
            part = dict(fid=fid, refs=refs, keys=None)
        elif kind == "cluster_shuffled":
            part = dict(fid=fid, refs=refs, keys=keys)
        elif kind == "random":
            sel = buckets == u
            part = dict(fid=fid, refs=refs[sel], keys=keys[sel])
        else:  # validation_clusters
            sel = vals["cluster"] == u
            part = dict(fid=fid, refs=refs[sel], keys=None)
        parts.append(((store, u), part))
    return parts


def range_key(unit: int, i: int) -> str:
    """The name of range `i` of unit `unit` of a store: ranges sort by (unit, i), the store's order."""
    return f"{unit:05d}-{i:06d}"


def cut_unit(st: dict, unit: int, parts: list[dict], range_bytes: int) -> dict:
    """Step 1c: unit `unit` of store `st` (a plan_stores entry): its documents in their store order, cut
    into ranges: {store, unit, ranges: [(key, documents)], tasks: [{store, i (key), refs, files,
    documents}]}. DataError unless `parts` are the parts of exactly the files that feed the unit."""
    store, files = st["store"], st["files"]
    parts = sorted(parts, key=lambda p: p["fid"])  # the order the runner delivers them in must not matter
    want = unit_files(st["kind"], unit, len(files) - 1)
    if [p["fid"] for p in parts] != want:
        raise DataError(
            f"unit {unit} of token store {st['path']} got the scans of files "
            f"{[files[p['fid']] for p in parts]}, not of {[files[f] for f in want]} (a runner lost or "
            "repeated one); run the preparation again."
        )
    refs = np.concatenate([p["refs"] for p in parts]) if parts else np.zeros((0, 3), np.int64)
    if parts and parts[0]["keys"] is not None:  # a seeded order: stable sort by key, ties in file order
        refs = refs[np.argsort(np.concatenate([p["keys"] for p in parts]), kind="stable")]
    tasks = [
        dict(store=store, i=range_key(unit, i), refs=piece, files=files, documents=len(piece))
        for i, piece in enumerate(_cut(refs, int(range_bytes)))
    ]
    return dict(store=store, unit=unit, ranges=[(t["i"], t["documents"]) for t in tasks], tasks=tasks)


def assemble(st: dict, cuts: list[dict]) -> dict:
    """The pack step's view of store `st` (a plan_stores entry) from its units' cuts (any order):
    `st` plus segments [(segment or None, [range keys])] and documents {range key: n}. DataError when a
    unit never reached this step (a runner lost it)."""
    mine = {c["unit"]: c for c in cuts if c["store"] == st["store"]}
    missing = [u for u in range(len(st["units"])) if u not in mine]
    if missing:
        raise DataError(
            f"the plan of token store {st['path']} is missing unit(s) {missing[:5]} of {len(st['units'])} "
            "(their cut step never reached the pack step); run the preparation again."
        )
    segments = [(seg, [key for key, _ in mine[u]["ranges"]]) for u, seg in enumerate(st["units"])]
    documents = {key: n for c in mine.values() for key, n in c["ranges"]}
    return dict(st, segments=segments, documents=documents)


def plan(data_cfg, out, vocab, range_bytes: int = RANGE_BYTES) -> list[dict]:
    """Steps 1a-c in process: the stores not complete yet, each with its `ranges` (tasks, in order),
    segments and documents (what `pack` reads)."""
    stores = plan_stores(data_cfg, out, vocab)
    grouped: dict[tuple[str, int], list[dict]] = {}
    for job in scan_jobs(stores):
        for key, part in scan(job, out):
            grouped.setdefault(key, []).append(part)
    result = []
    for st in stores:
        cuts = [
            cut_unit(st, u, grouped.get((st["store"], u), []), range_bytes) for u in range(len(st["units"]))
        ]
        result.append(dict(assemble(st, cuts), ranges=[t for c in cuts for t in c["tasks"]]))
    return result


def range_file(tmp: str, key: str) -> epath.Path:
    """The id file of range `key` (range_key) of the store whose temp folder is `tmp`."""
    return epath.Path(tmp) / f"range-{key}.npy"


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
    """Write `store` (a `plan` or `assemble` entry: segments, documents) from its range files in order,
    index last; then remove the range files.

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
                n = store["documents"][i]
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
