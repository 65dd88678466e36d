"""prepare: layout and stats, idempotence, the registered tasks (load and pack), the two-stage mixtures."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from etils import epath
from planted import planted_records

from configs import tiny
from voltron_jax.data import cbtm, pipeline, prepare, tasks
from voltron_jax.data import vocab as vocab_lib

N_TRAIN, N_VAL, K = 200, 40, 4


def _config(tmp, **data):
    c = tiny.get_config("test")
    c.data.n_clusters = K
    c.data.embed.dim = 32
    c.data.icp.knn = 10
    c.data.seq_len, c.data.batch_size = 32, 4
    c.data.cache_dir = str(tmp / "cache")
    for k, v in data.items():
        c.data[k] = v
    return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    recs, pairs = planted_records(N_TRAIN, 8, N_VAL)
    c = _config(tmp)
    stats = prepare.prepare(c, str(tmp / "run"), records=recs, progress=False)
    return c, str(tmp / "run"), recs, pairs, stats


def _shards(workdir):
    return prepare.prepared_documents(workdir, K)


def _stored_docs(task, split, c):
    """The documents of a task's token store, decoded in stream order (split after each EOS)."""
    vocab = vocab_lib.make_vocab(c.data)
    stream, lengths = pipeline.token_stream(tasks.task_name(task), split, vocab, c.data)
    ends = np.cumsum(lengths)
    return [vocab.decode(stream[e - n : e - 1].tolist()) for e, n in zip(ends, lengths, strict=True)]


def test_layout_stats_and_kept_documents(prepared):
    c, workdir, recs, pairs, stats = prepared
    data = os.path.join(workdir, "data")
    names = sorted(os.listdir(data))
    assert names == [
        "centroids.npz",
        "embedder.joblib",
        "prepare.json",
        "tokens",
        "train",
        "validation.jsonl",
    ]
    shards, val = _shards(workdir)
    ids = [r["id"] for shard in shards for r in shard]
    d = stats["docs"]
    assert len(ids) == len(set(ids)) == d["kept"]  # every kept doc exactly once
    assert d["train"] == N_TRAIN and d["exact_duplicates"] == 1 and d["semantic_duplicates"] == 3
    assert d["kept"] + d["exact_duplicates"] + d["semantic_duplicates"] + d["adjacent_duplicates"] == N_TRAIN
    for a, b in [*pairs, ("doc0005", "doc0013")]:
        assert (a in ids) != (b in ids)  # exactly one of each planted duplicate pair
    assert [r["id"] for r in val] == [r["id"] for r in recs if r["split"] == "validation"]
    assert stats["adjacent_cosine"]["icp"] > 3 * stats["adjacent_cosine"]["random"]
    fit = np.asarray(stats["clusters"]["fit_sizes"])
    assert np.abs(fit - fit.sum() / K).max() <= 0.1 * fit.sum() / K
    assert stats["chains"]["mean"] > 5
    model = cbtm.ClusterModel.load(data)  # the clusterer for routed evaluation
    for j, shard in enumerate(shards):
        assert (model.predict([r["text"] for r in shard]) == j).all()
    assert "kept" in prepare.format_report(stats)


def test_idempotent_and_a_config_change_redoes_it(prepared, tmp_path):
    c, workdir, recs, _, stats = prepared
    marker = os.path.join(workdir, "data", "prepare.json")
    before = os.stat(marker).st_mtime_ns
    assert prepare.prepare(c, workdir, records=recs, progress=False, register=False) == stats
    assert os.stat(marker).st_mtime_ns == before  # nothing rewritten
    other = str(tmp_path / "run")
    prepare.prepare(c, other, records=recs, progress=False, register=False)
    fp = json.load(open(os.path.join(other, "data", "prepare.json")))["fingerprint"]
    c2 = _config(tmp_path, n_clusters=2)
    s2 = prepare.prepare(c2, other, records=recs, progress=False, register=False)
    assert len(s2["clusters"]["fit_sizes"]) == 2
    assert sorted(os.listdir(os.path.join(other, "data", "train"))) == [
        "cluster-00000-of-00002.jsonl",
        "cluster-00001-of-00002.jsonl",
    ]  # the old 4-cluster shards are gone
    recs2 = [dict(r, text=r["text"] + " edited") if r["index"] == 7 else r for r in recs]
    prepare.prepare(c2, other, records=recs2, progress=False, register=False)
    assert json.load(open(os.path.join(other, "data", "prepare.json")))["fingerprint"] != fp


def test_prepared_tasks_load_and_pack(prepared):
    c, workdir, _, _, _ = prepared
    c = c.copy_and_resolve_references()
    c.data.ordering = "icp"
    shards, val = _shards(workdir)
    prepare.register_tasks(c, workdir)
    # ICP order survives into the token shards: the stream is the clusters' ICP orders, document by document
    assert _stored_docs("icp", "train", c) == [r["text"] for s in shards for r in s]
    assert _stored_docs("icp", "validation", c) == [r["text"] for r in val]
    it = pipeline.make_train_iterator(c, "pretrain", seed=0)
    assert it.names == ["voltron_icp"]
    batch = next(it)
    assert batch["inputs"].shape == batch["targets"].shape == (4, 32)
    assert (batch["inputs"] > 2).mean() > 0.9  # text bytes, EOS separators only between documents
    for j in range(K):
        b = next(pipeline.make_train_iterator(c, "cluster", seed=0, cluster=j))
        assert b["inputs"].shape == (4, 32)
        assert _stored_docs(f"cluster_{j}", "train", c) == [r["text"] for r in shards[j]]  # ICP order
    ev = pipeline.make_eval_batches(c, "pretrain", 1)[0]
    assert ev["inputs"].shape == (4, 32)


def test_random_orderings_use_the_same_prepared_documents(prepared):
    c, workdir, _, _, _ = prepared
    shards, _ = _shards(workdir)
    c = c.copy_and_resolve_references()
    c.data.ordering = "dedup_random"
    prepare.register_tasks(c, workdir)
    assert pipeline.make_train_iterator(c, "pretrain", seed=0).names == ["voltron_icp_random"]
    icp = [r["text"] for s in shards for r in s]
    rand = _stored_docs("icp_random", "train", c)
    assert sorted(rand) == sorted(icp) and rand != icp  # the same documents, another order
    by_key = sorted((r for s in shards for r in s), key=lambda r: prepare.shuffle_key(0, r["index"]))
    assert rand == [r["text"] for r in by_key]  # the seeded order: a hash of (seed, corpus index)
    train_0 = _stored_docs("cluster_0", "train", c)
    assert sorted(train_0) == sorted(r["text"] for r in shards[0]) and train_0 != [
        r["text"] for r in shards[0]
    ]


def test_decay_mixture_adds_the_held_out_high_quality_task(prepared):
    c, workdir, _, _, _ = prepared
    c = c.copy_and_resolve_references()
    c.data.ordering = "icp"
    prepare.register_tasks(c, workdir)
    assert pipeline.resolve_mixture(c, "decay") == [("corpus", 0.7), ("pydoc", 0.3)]
    it = pipeline.make_train_iterator(c, "decay", seed=0)
    assert it.names == ["voltron_icp", "voltron_pydoc"]
    next(it)
    ids = [r["id"] for r in prepare.corpus_records(c.data)]  # the stage-1 corpus (file granularity)
    assert ids and not any("pydoc_data" in i or i.startswith("pydoc:") for i in ids)


def test_cluster_eval_uses_only_its_docs_and_skips_a_cluster_without_any(prepared, tmp_path):
    from voltron_jax import train

    c, workdir, _, _, _ = prepared
    c = c.copy_and_resolve_references()
    c.data.ordering, c.train.eval_clusters, c.train.eval_batches = "icp", True, 2
    shards, val = _shards(workdir)
    val = [r for r in val if r["cluster"] != 0]  # nothing routed to cluster 0
    workdir = str(tmp_path / "run")  # a copy whose validation file routes nothing to cluster 0
    shutil.copytree(
        os.path.join(prepared[1], "data"),
        os.path.join(workdir, "data"),
        ignore=shutil.ignore_patterns("tokens"),
    )
    prepare.write_jsonl(
        epath.Path(workdir) / "data" / prepare.VALIDATION, val, ("index", "id", "text", "cluster")
    )
    prepare.register_tasks(c, workdir)
    assert "validation" not in tasks.store_source("cluster_0").splits  # no stand-in split
    assert pipeline.cluster_validation_rows(c, 0) == 0
    sets = train.eval_sets(c, 0, 1)
    assert "cluster_0/" not in sets  # absent, not the overall split under cluster_0's name
    measured = [j for j in range(1, K) if pipeline.cluster_validation_rows(c, j) > 0]
    assert len(measured) >= 2 and set(sets) == {""} | {f"cluster_{j}/" for j in measured}
    vocab = vocab_lib.make_vocab(c.data)
    T = c.data.seq_len
    for j in measured:
        tn = tasks.task_name(f"cluster_{j}")
        assert _stored_docs(f"cluster_{j}", "validation", c) == [r["text"] for r in val if r["cluster"] == j]
        stream, _ = pipeline.token_stream(tn, "validation", vocab, c.data)
        own = {stream[r * T : r * T + T].tobytes() for r in range(len(stream) // T)}
        rows = np.concatenate([b["inputs"] for b in sets[f"cluster_{j}/"]]).astype(stream.dtype)
        assert all(x.tobytes() in own for x in rows)  # only cluster j's validation text
        assert not np.array_equal(rows, np.concatenate([b["inputs"] for b in sets[""]]))


@pytest.mark.slow
def test_cli_on_the_embedded_corpus_then_nothing_to_do(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "voltron_jax.data.prepare",
        "--config=configs/tiny.py:test",
        f"--workdir={tmp_path}",
        "--config.data.n_clusters=2",
        "--config.data.embed.fit_sample=300",
        "--config.data.embed.dim=32",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    stats = json.load(open(tmp_path / "data" / "prepare.json"))["stats"]
    assert stats["docs"]["kept"] > 500 and stats["clusters"]["fit_sizes"] == [150, 150]
    assert stats["adjacent_cosine"]["icp"] > 2 * stats["adjacent_cosine"]["random"]
    assert "mean cosine of adjacent docs" in out
    again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    assert "up to date" in again
