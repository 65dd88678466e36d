"""Data preparation before training: embed -> c-BTM clusters -> ICP order per cluster -> write -> tasks.

    python -m voltron_jax.data.prepare --config=configs/tiny.py --workdir=runs/demo [--config.data.x=y]

Stages (each shared with the Apache Beam version in voltron_jax/data/beam_pipeline.py):
  1. read the corpus as records {index, id, text, split}; exact duplicates of a train text are dropped
     (the lowest index stays);
  2. fit on a sample (the `data.embed.fit_sample` train docs of smallest `embed.sample_rank`): the
     tf-idf -> SVD -> L2 embedder and balanced k-means with k = data.n_clusters (`fit_model`);
  3. embed every document and assign it to its nearest centroid (train and validation);
  4. per cluster (the unit of parallelism): kNN, semantic dedup, greedy traversal, adjacent-duplicate
     filter (`order_cluster`, voltron_jax/data/icp.py);
  5. write <workdir>/data/ (below);
  6. tokenise the documents in their final order into token stores (ArrayRecord shards + index, one
     store per order the configured data.ordering reads; voltron_jax/data/orderings.py) under
     <workdir>/data/tokens/<vocabulary>/ (`tokenize`), then register the tasks (`register_tasks`).

Layout of <workdir>/data/ (docs/design.md):
    prepare.json                         fingerprint, settings and stats; written last (completion mark)
    embedder.joblib, centroids.npz       the fitted clusterer (cbtm.ClusterModel.load(<workdir>/data))
    train/cluster-0000j-of-0000k.jsonl   kept train docs of cluster j in ICP order: {"index","id","text"}
    validation.jsonl                     validation docs in corpus order with their cluster
    spm_<n>.model                        SentencePiece model trained on a sample of the kept train docs
                                         (data.vocab='sentencepiece', no data.spm_path, corpus not stdlib)
    tokens/<vocab>/<store>/              token stores: index.json (written last) + tokens-*.arrayrecord

Registered tasks (mixture names), read from the token stores: 'icp' (data.ordering='icp': the clusters'
ICP orders concatenated) or 'icp_random' ('dedup_random': the same documents in a seeded random order,
the ablation baseline that differs from 'icp' only in order), and 'cluster_<j>' (cluster j's segment of
the ordering's cluster store: ICP order for 'icp', else shuffled within the cluster; validation = the
validation docs routed to cluster j; no validation split if none are). 'icp' and 'icp_random' share
the corpus validation split, so validation losses compare across orderings. data.ordering='icp'
('dedup_random') makes the mixture name 'corpus' mean 'icp' ('icp_random'), so the stable and the
decay mixture (corpus + pydoc, the held-out high-quality set) both read the prepared order.

Idempotent: the fingerprint hashes the settings (corpus, granularity, split, n_clusters, data.embed,
data.icp, data.cbtm) and every input record; a matching prepare.json means nothing is recomputed, any
change redoes everything. With several JAX processes, process 0 prepares and the others wait for its
prepare.json (the workdir is shared storage, as multi-host checkpointing requires anyway).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import flags
from etils import epath
from tqdm.auto import tqdm

from voltron_jax import cli
from voltron_jax.config import validate
from voltron_jax.data import cbtm, corpus, doclayout, embed, icp, orderings, shards
from voltron_jax.data.doclayout import VALIDATION, shard_path, shuffle_key  # prepare's names for them
from voltron_jax.run import workdir as workdir_lib

FORMAT = 1
MARKER = "prepare.json"
WAIT_S = 3600


def settings(config) -> dict:
    """Everything the outputs depend on besides the documents themselves (part of the fingerprint)."""
    d = config.data
    sub = {k: d[k].to_dict() for k in ("embed", "icp", "cbtm")}
    return dict(
        format=FORMAT,
        corpus=d.corpus,
        granularity=d.granularity,
        val_fraction=float(d.val_fraction),
        n_clusters=int(d.n_clusters),
        **sub,
    )


def corpus_records(data_cfg) -> list[dict]:
    """The configured corpus as records {index, id, text, split}, train then validation, in corpus order."""
    if data_cfg.corpus not in corpus.EMBEDDED:
        raise corpus.DataError(
            f"in-process prepare reads the embedded corpus only (data.corpus={data_cfg.corpus!r}); for a "
            "large corpus run the Beam pipeline on JSONL records: python -m voltron_jax.data.beam_pipeline "
            "--config=... --workdir=... --input='<files>*.jsonl' (same <workdir>/data layout)."
        )
    source = corpus.embedded_source(data_cfg.corpus, data_cfg.granularity, float(data_cfg.val_fraction))
    return [
        dict(index=i, id=doc.id, text=doc.text, split=split)
        for i, (split, doc) in enumerate((s, doc) for s in corpus.SPLITS for doc in source.documents(s))
    ]


def check_records(records: list[dict], n_clusters: int, where: str) -> None:
    """Raise DataError (naming `where`) unless `records` hold enough train documents to cluster."""
    n_train = sum(1 for r in records if r.get("split") == "train")
    if n_train < max(3, n_clusters):
        raise corpus.DataError(
            f"{where}: {len(records)} records, {n_train} of them train documents; preparation needs at least "
            f"max(3, data.n_clusters={n_clusters}) train documents ({{index, id, text, split}} per line)."
        )


def record_digest(r: dict) -> int:
    """Order-free part of the fingerprint: records are summed mod 2^256, so any runner gets the same."""
    blob = json.dumps([r["index"], r["id"], r["split"], r["text"]]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest(), "big")


def fingerprint(s: dict, digest_sum: int) -> str:
    blob = json.dumps(s, sort_keys=True) + f"{digest_sum % 2**256:064x}"
    return hashlib.sha256(blob.encode()).hexdigest()


def text_key(r: dict) -> str:
    return hashlib.sha1(r["text"].encode()).hexdigest()


def dedup_exact(train: list[dict]) -> list[dict]:
    """One record per distinct text (the lowest index), in index order."""
    best: dict[str, dict] = {}
    for r in train:
        k = text_key(r)
        if k not in best or r["index"] < best[k]["index"]:
            best[k] = r
    return sorted(best.values(), key=lambda r: r["index"])


def fit_model(sample: list[dict], s: dict) -> tuple[cbtm.ClusterModel, list[int]]:
    """Embedder + balanced k-means fit on the sample; returns the model and the fit-set cluster sizes."""
    texts = [r["text"] for r in sorted(sample, key=lambda r: r["index"])]
    return fit_clusters(fit_sample_embedder(texts, s), texts, s)


def fit_sample_embedder(texts: list[str], s: dict) -> embed.Embedder:
    kw = {k: v for k, v in s["embed"].items() if k != "fit_sample"}  # kind, dim, min_df, max_features, seed
    return embed.fit_embedder(texts, **kw)


def fit_clusters(embedder: embed.Embedder, texts: list[str], s: dict) -> tuple[cbtm.ClusterModel, list[int]]:
    c = s["cbtm"]
    x = embedder.transform(texts)  # [S, D]
    centroids, labels = cbtm.fit_balanced_kmeans(
        x, s["n_clusters"], iters=c["iters"], eps_frac=c["eps_frac"], seed=c["seed"]
    )
    return cbtm.ClusterModel(embedder, centroids), np.bincount(labels, minlength=s["n_clusters"]).tolist()


def order_cluster(cluster: int, records: list[dict], x: np.ndarray, icp_cfg: dict) -> tuple[list[dict], dict]:
    """ICP order of one cluster's records (sorted by index, embeddings x [N, D]); returns (ordered, stats)."""
    res = icp.order_documents(x, [r["text"] for r in records], **icp_cfg)
    cos_sum, pairs = icp.adjacent_cosine(x, res.order)
    kept = x[res.order].astype(np.float64)  # [M, D]
    stats = dict(
        cluster=cluster,
        n_in=len(records),
        n_semantic_dup=res.n_semantic_dup,
        n_adjacent_dup=res.n_adjacent_dup,
        n_out=len(res.order),
        chain_lengths=res.chain_lengths.tolist(),
        adj_cos_sum=cos_sum,
        adj_pairs=pairs,
        vec_sum=kept.sum(0).tolist() if len(kept) else [],
        sq_norm_sum=float((kept * kept).sum()),
        seconds=res.seconds,
    )
    return [records[i] for i in res.order], stats


def write_jsonl(path: epath.Path, records: list[dict], fields: tuple[str, ...]) -> None:
    """Write records (only `fields`) as JSON lines; via a temporary name so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text("".join(json.dumps({f: r[f] for f in fields}) + "\n" for r in records))
    tmp.replace(path)


def read_jsonl(path: epath.Path) -> list[dict]:
    return list(iter_jsonl(path))


def iter_jsonl(path: epath.Path):
    """Records of a prepared JSONL file, one line at a time (memory: one record); a damaged file is one
    DataError naming it and the fix."""
    path = epath.Path(path)
    try:
        with path.open("r") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        data = next((p for p in (path.parent, path.parent.parent) if (p / MARKER).exists()), path.parent)
        raise corpus.DataError(
            f"{path} is damaged ({type(e).__name__}: {e}); it is prepared data: remove {data / MARKER} and "
            "rerun the same command to prepare the data again."
        ) from e


def summarize(
    cluster_stats: list[dict],
    *,
    n_train: int,
    n_validation: int,
    n_exact_dup: int,
    fit_sizes: list[int],
    val_sizes: list[int],
) -> dict:
    """The stats report: docs kept/dropped, chain lengths, adjacent cosine ICP vs random, cluster sizes."""
    cs = sorted(cluster_stats, key=lambda st: st["cluster"])
    chains = np.asarray([n for st in cs for n in st["chain_lengths"]] or [0])
    kept = sum(st["n_out"] for st in cs)
    vec_sum = np.sum([st["vec_sum"] for st in cs if st["vec_sum"]] or [[0.0]], axis=0)
    sq = sum(st["sq_norm_sum"] for st in cs)
    pairs = sum(st["adj_pairs"] for st in cs)
    # Mean cosine of adjacent docs under a uniformly random order = mean over distinct pairs (exact).
    random_cos = float((vec_sum @ vec_sum - sq) / (kept * (kept - 1))) if kept > 1 else 0.0
    return dict(
        docs=dict(
            train=n_train,
            validation=n_validation,
            exact_duplicates=n_exact_dup,
            semantic_duplicates=sum(st["n_semantic_dup"] for st in cs),
            adjacent_duplicates=sum(st["n_adjacent_dup"] for st in cs),
            kept=kept,
        ),
        chains=dict(
            count=int((chains > 0).sum()),
            mean=float(chains.mean()),
            median=float(np.median(chains)),
            p90=float(np.percentile(chains, 90)),
            max=int(chains.max()),
            singletons=int((chains == 1).sum()),
        ),
        adjacent_cosine=dict(icp=sum(st["adj_cos_sum"] for st in cs) / max(pairs, 1), random=random_cos),
        clusters=dict(
            fit_sizes=fit_sizes, train_sizes=[st["n_out"] for st in cs], validation_sizes=val_sizes
        ),
    )


# --------------------------------------------------------------------------------------------- in process


class _Clock:
    """Wall seconds, process CPU seconds (all threads) and documents/s per phase, for the stats report."""

    def __init__(self):
        self.t, self.c, self.seconds, self.cpu_seconds, self.docs_per_s = self._now() + ({}, {}, {})

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def lap(self, name: str, n_docs: int) -> None:
        t, c = self._now()
        self.seconds[name] = self.seconds.get(name, 0.0) + t - self.t
        self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + c - self.c
        self.docs_per_s[name] = n_docs / max(self.seconds[name], 1e-9)
        self.t, self.c = t, c


def _compute(records: list[dict], s: dict, out: epath.Path, progress: bool) -> dict:
    clock, k = _Clock(), s["n_clusters"]
    train = [r for r in records if r["split"] == "train"]
    val = sorted((dict(r) for r in records if r["split"] != "train"), key=lambda r: r["index"])  # + cluster
    kept = dedup_exact(train)
    clock.lap("exact_dedup", len(train))
    chosen = set(embed.sample_ids([r["id"] for r in kept], s["embed"]["fit_sample"], s["embed"]["seed"]))
    sample = [r["text"] for r in kept if r["id"] in chosen]  # index order, as fit_model sorts
    embedder = fit_sample_embedder(sample, s)
    clock.lap("fit_embedder", len(sample))
    model, fit_sizes = fit_clusters(embedder, sample, s)
    clock.lap("fit_kmeans", len(sample))
    x = embed.embed_in_batches(model.embedder, [r["text"] for r in kept], progress=progress)  # [N, D]
    xv = embed.embed_in_batches(model.embedder, [r["text"] for r in val], progress=progress, desc="embed val")
    clock.lap("embed", len(kept) + len(val))
    labels, val_labels = cbtm.assign(x, model.centroids), cbtm.assign(xv, model.centroids)
    clock.lap("assign", len(kept) + len(val))
    stats = _order_all(kept, x, labels, s, out, progress)
    clock.lap("icp", len(kept))
    for r, c in zip(val, val_labels, strict=True):
        r["cluster"] = int(c)
    write_jsonl(out / VALIDATION, val, ("index", "id", "text", "cluster"))
    model.save(str(out))
    clock.lap("write", len(kept) + len(val))
    val_sizes = np.bincount(val_labels, minlength=k).tolist()
    n_train, n_val, n_dup = len(train), len(val), len(train) - len(kept)
    report = summarize(
        stats,
        n_train=n_train,
        n_validation=n_val,
        n_exact_dup=n_dup,
        fit_sizes=fit_sizes,
        val_sizes=val_sizes,
    )
    report["seconds"] = dict(clock.seconds, icp_parts=sum_seconds(stats))
    report["docs_per_s"] = clock.docs_per_s
    report["cpu_seconds"] = clock.cpu_seconds
    return report


def _order_all(
    kept: list[dict], x: np.ndarray, labels: np.ndarray, s: dict, out: epath.Path, progress: bool
) -> list[dict]:
    """ICP order and shard of every cluster, one after the other (Beam runs them in parallel)."""

    k, stats = s["n_clusters"], []
    for j in tqdm(range(k), desc="icp", unit="cluster", disable=not progress):
        idx = np.flatnonzero(labels == j)
        ordered, st = order_cluster(j, [kept[i] for i in idx], x[idx], s["icp"])
        write_jsonl(shard_path(out, j, k), ordered, ("index", "id", "text"))
        stats.append(st)
    return stats


def sum_seconds(stats: list[dict]) -> dict:
    """Wall seconds of the ICP sub-phases (knn, dedup, traverse, filter) summed over clusters."""
    out = {}
    for st in stats:
        for name, sec in st["seconds"].items():
            out[name] = out.get(name, 0.0) + sec
    return out


def clear(out: epath.Path) -> None:
    for name in (MARKER, VALIDATION, cbtm.EMBEDDER_FILE, cbtm.CENTROIDS_FILE):
        if (out / name).exists():
            (out / name).unlink()
    for name in ("train", TOKENS, "tokenize-tmp"):  # tokenize-tmp: ranges.py's range files
        if (out / name).exists():
            (out / name).rmtree()
    for f in out.glob("spm_*.model") if out.exists() else ():
        f.unlink()


def read_marker(out: epath.Path) -> dict | None:
    path = out / MARKER
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise corpus.DataError(
            f"{path} is not readable JSON ({type(e).__name__}: {e}); it is the completion mark of the data "
            f"preparation: remove it and rerun the same command (the preparation is redone into {out})."
        ) from e


def write_marker(out: epath.Path, fp: str, s: dict, stats: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_json(
        out / MARKER, dict(fingerprint=fp, settings=s, stats=stats), indent=1, sort_keys=False
    )


def _jax_process() -> tuple[int, int]:
    jax = sys.modules.get("jax")  # only if the caller already uses JAX (the train loop); the CLI does not
    return (jax.process_index(), jax.process_count()) if jax is not None else (0, 1)


def prepare(
    config, workdir, *, records: list[dict] | None = None, progress: bool = True, register: bool = True
) -> dict:
    """Run (or reuse) the preparation for `config` into <workdir>/data and register its tasks.

    `records` replaces the configured corpus (tests, external corpora): dicts {index, id, text, split}.
    Returns the stats dict (also stored in <workdir>/data/prepare.json).
    """
    out = workdir_lib.data_dir(epath.Path(workdir))
    s = settings(config)
    done = read_marker(out)
    if records is None and config.data.corpus not in corpus.EMBEDDED:
        # A corpus that cannot be listed here was prepared by the Beam pipeline: same settings = done.
        if done is None or done["settings"] != s:
            corpus_records(config.data)  # raises: how to run the Beam pipeline
        fp = done["fingerprint"]
    else:
        where = "the records given" if records is not None else f"data.corpus={config.data.corpus!r}"
        records = corpus_records(config.data) if records is None else records
        check_records(records, config.data.n_clusters, where)
        fp = fingerprint(s, sum(record_digest(r) for r in records))
    pid, _ = _jax_process()
    if pid > 0:  # process 0 writes; the others wait for it
        t0 = time.time()
        while (done is None or done["fingerprint"] != fp) and time.time() - t0 < WAIT_S:
            time.sleep(5)
            done = read_marker(out)
        if done is None or done["fingerprint"] != fp:
            raise TimeoutError(
                f"process {pid}: {out / MARKER} did not appear within {WAIT_S} s; run "
                "`python -m voltron_jax.data.prepare` once before a multi-host run."
            )
    if done is not None and done["fingerprint"] == fp:
        stats = done["stats"]
        if progress:
            print(f"prepare: {out} is up to date (fingerprint {fp[:12]}); nothing to do.", flush=True)
    else:
        clear(out)
        stats = _compute(records, s, out, progress)
        write_marker(out, fp, s, stats)
        if progress:
            print(format_report(stats), flush=True)
    if pid == 0:
        tokenize(config.data, out, progress=progress)
    if register:
        register_tasks(config, workdir)  # the other processes wait here for process 0's token stores
    return stats


# --------------------------------------------------------------------------------------------- tasks


def prepared_documents(workdir, n_clusters: int) -> tuple[list[list[dict]], list[dict]]:
    """(train records per cluster in ICP order, validation records in corpus order) from <workdir>/data."""
    out = workdir_lib.data_dir(epath.Path(workdir))
    if read_marker(out) is None:
        raise corpus.DataError(
            f"{out} holds no finished preparation; run `python -m voltron_jax.data.prepare "
            "--config=... --workdir=...` (or the Beam pipeline) first."
        )
    return [read_jsonl(shard_path(out, j, n_clusters)) for j in range(n_clusters)], read_jsonl(
        out / VALIDATION
    )


TOKENS = "tokens"
VALIDATION_STORES = ("validation", "validation_clusters")


def store_name(store: str, data_cfg) -> str:
    """Folder name of a token store; the seeded orders carry their seed (a new seed, a new store)."""
    return f"{store}-seed{int(data_cfg.shuffle_seed)}" if store in ("random", "cluster_shuffled") else store


def _fill(store: str, out: epath.Path, data_cfg):
    """`fill(writer)` that writes store `store` from the prepared JSONL files (documents in their order)."""
    k, seed = int(data_cfg.n_clusters), int(data_cfg.shuffle_seed)
    texts = lambda rs: (r["text"] for r in rs)
    cluster = lambda j: iter_jsonl(shard_path(out, j, k))

    def fill(w: shards.StoreWriter) -> None:
        if store == "icp":  # cluster after cluster, each in ICP order (as written by order_cluster)
            for j in range(k):
                w.begin_segment(f"cluster_{j}")
                w.add(texts(cluster(j)))
        elif store == "cluster_shuffled":  # one cluster in memory at a time
            for j in range(k):
                w.begin_segment(f"cluster_{j}")
                w.add(texts(sorted(cluster(j), key=lambda r: shuffle_key(seed, r["index"]))))
        elif store in ("random", "validation_clusters"):  # streamed: texts read back by byte offset
            files, docs = doclayout.layout(store, data_cfg, out)  # three integers per document in memory
            for seg, refs in docs:
                if seg is not None:
                    w.begin_segment(seg)
                w.add(doclayout.texts(out, files, refs))
        elif store == "validation":
            w.add(texts(iter_jsonl(out / VALIDATION)))
        else:
            raise corpus.DataError(f"unknown token store {store!r}.")

    return fill


def _needs_own_spm(data_cfg) -> bool:
    return data_cfg.vocab == "sentencepiece" and not data_cfg.spm_path and data_cfg.corpus != "stdlib"


def spm_path(data_cfg, out) -> epath.Path:
    return epath.Path(out) / f"spm_{int(data_cfg.spm_vocab_size)}.model"


def prepared_vocab(data_cfg, out: epath.Path, progress: bool = False):
    """The vocabulary the token stores use: data.vocab, with a SentencePiece model trained here on a
    deterministic line sample of the kept train documents when none is given and the corpus is not
    the embedded one (<workdir>/data/spm_<n>.model; pass it as data.spm_path to the train loop)."""
    from voltron_jax.data import vocab as vocab_lib

    out = epath.Path(out)
    if _needs_own_spm(data_cfg):
        path = spm_path(data_cfg, out)
        if not path.exists():
            k = int(data_cfg.n_clusters)
            docs = lambda: (r["text"] for j in range(k) for r in iter_jsonl(shard_path(out, j, k)))
            lines = vocab_lib.sample_lines_stream(docs)
            if progress:
                print(
                    f"prepare: training SentencePiece ({data_cfg.spm_vocab_size}) on {len(lines)} lines",
                    flush=True,
                )
            if "://" in os.fspath(path):  # the trainer writes a local file; copy it to the bucket
                with tempfile.TemporaryDirectory() as tmp:
                    local = os.path.join(tmp, path.name)
                    vocab_lib.train_sentencepiece(
                        lines, int(data_cfg.spm_vocab_size), local, max_chars=1 << 62
                    )
                    epath.Path(local).copy(path, overwrite=True)
            else:
                vocab_lib.train_sentencepiece(
                    lines, int(data_cfg.spm_vocab_size), os.fspath(path), max_chars=1 << 62
                )
        import seqio  # lazy: seqio/TensorFlow, only for SentencePiece

        return seqio.SentencePieceVocabulary(os.fspath(path))
    return vocab_lib.make_vocab(data_cfg)


def token_dir(out: epath.Path, vocab, data_cfg) -> epath.Path:
    """Where the token stores live: <data.token_dir or <workdir>/data/tokens>/<prepare fingerprint>-<vocab>
    (a shared data.token_dir never mixes two preparations)."""
    root = epath.Path(data_cfg.token_dir) if data_cfg.get("token_dir") else epath.Path(out) / TOKENS
    marker = read_marker(epath.Path(out))
    if marker is None:
        raise corpus.DataError(f"{out} holds no finished preparation (no {MARKER}); prepare first.")
    return root / f"{marker['fingerprint'][:12]}-{shards.vocab_id(vocab)}"


def tokenize(data_cfg, out, vocab=None, progress: bool = False) -> dict[str, str]:
    """Write the token stores data.ordering reads (and the validation stores) that are not complete
    yet; returns {store: folder}. Same function for the in-process and the Beam preparation."""
    out = epath.Path(out)
    vocab = vocab or prepared_vocab(data_cfg, out, progress)
    base = token_dir(out, vocab, data_cfg)
    paths = {}
    for store in (*orderings.train_stores(data_cfg.ordering), *VALIDATION_STORES):
        path = base / store_name(store, data_cfg)
        if not shards.is_complete(path):
            index = shards.build_store(path, vocab, _fill(store, out, data_cfg))
            if progress:
                print(
                    f"prepare: token store {path}: {index['documents']} docs, {index['tokens']} tokens",
                    flush=True,
                )
        paths[store] = os.fspath(path)
    return paths


def _wait_for(paths: list[epath.Path]) -> None:
    t0 = time.time()
    while not all(shards.is_complete(p) for p in paths):
        if time.time() - t0 > WAIT_S:
            missing = [os.fspath(p) for p in paths if not shards.is_complete(p)]
            raise TimeoutError(f"token stores {missing} did not appear within {WAIT_S} s; prepare first.")
        time.sleep(5)


def register_tasks(config, workdir) -> list[str]:
    """Register the ordering's corpus task ('icp' | 'icp_random') and 'cluster_<j>' from the token stores
    under <workdir>/data (tokenising them first if needed); returns their task names."""
    from voltron_jax.data import tasks  # lazy: the data stack

    d = config.data
    out = epath.Path(workdir) / "data"
    if read_marker(out) is None:
        raise corpus.DataError(
            f"{out} holds no finished preparation; run `python -m voltron_jax.data.prepare "
            "--config=... --workdir=...` (or the Beam pipeline) first."
        )
    from voltron_jax.data import vocab as vocab_lib  # lazy: the data stack

    if _needs_own_spm(d):  # the model this preparation trains on the corpus (process 0 trains it)
        model = spm_path(d, out)
        if _jax_process()[0] == 0:
            prepared_vocab(d, out)
        t0 = time.time()
        while not model.exists() and time.time() - t0 < WAIT_S:
            time.sleep(5)
        vocab_lib.use_prepared_spm(d, os.fspath(model))
    vocab = vocab_lib.make_vocab(d)
    base = token_dir(out, vocab, d)
    o = orderings.get(d.ordering)
    stores = (*orderings.train_stores(d.ordering), *VALIDATION_STORES)
    paths = {s: base / store_name(s, d) for s in stores}
    if _jax_process()[0] == 0:
        tokenize(d, out, vocab)
    else:
        _wait_for(list(paths.values()))
    val_clusters = shards.TokenStore(paths["validation_clusters"])
    names = []
    if o.corpus_task:
        names.append(
            tasks.register_store_task(
                o.corpus_task,
                {"train": (paths[o.corpus_store], None), "validation": (paths["validation"], None)},
            )
        )
    for j in range(int(d.n_clusters)):
        splits = {"train": (paths[o.cluster_store], f"cluster_{j}")}
        if val_clusters.segments[f"cluster_{j}"][2]:  # no stand-in: no validation docs, no split
            splits["validation"] = (paths["validation_clusters"], f"cluster_{j}")
        names.append(tasks.register_store_task(f"cluster_{j}", splits))
    return names


def format_report(stats: dict) -> str:
    """Human-readable stats report."""
    dd, ch, cos, cl = stats["docs"], stats["chains"], stats["adjacent_cosine"], stats["clusters"]
    lines = [
        f"prepare: {dd['train']} train docs -> {dd['kept']} kept (dropped: {dd['exact_duplicates']} exact, "
        f"{dd['semantic_duplicates']} semantic, {dd['adjacent_duplicates']} adjacent near-duplicates); "
        f"{dd['validation']} validation docs",
        f"chains: {ch['count']} (mean {ch['mean']:.1f}, median {ch['median']:.0f}, p90 {ch['p90']:.0f}, "
        f"max {ch['max']}, singletons {ch['singletons']})",
        f"mean cosine of adjacent docs: ICP {cos['icp']:.3f} vs random order {cos['random']:.3f}",
        f"cluster sizes: fit {cl['fit_sizes']}, train {cl['train_sizes']}, "
        f"validation {cl['validation_sizes']}",
    ]
    if "seconds" in stats:
        lines.append(
            "seconds: "
            + ", ".join(f"{k} {v:.2f}" for k, v in stats["seconds"].items() if not isinstance(v, dict))
        )
    return "\n".join(lines)


def main(argv) -> None:
    del argv

    config = validate(cli.config_from_argv(_CONFIG.value, cli.overrides()))
    prepare(config, _WORKDIR.value, progress=True, register=False)


if __name__ == "__main__":
    _CONFIG = flags.DEFINE_string("config", None, "Config file (configs/*.py[:variant]).")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; outputs go to <workdir>/data.")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main, doc=__doc__, preload_modules=("tensorflow",))
