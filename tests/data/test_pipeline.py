"""Packing, shuffling, mixtures, per-host sharding, exact resume, vocabularies and clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio

from configs import tiny
from voltron_jax.data import corpus, packing, pipeline, streaming, tasks
from voltron_jax.data import vocab as vocab_lib

T, B = 16, 4
WORDS = ["def", "x", "return", "(", ")", ":", "import", "os", "λ", "\n    ", "class", "self", "1", "é"]


def _docs(n: int, seed: int, mean_words: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 2 * mean_words))) for _ in range(n)]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tasks.register_document_task("synth_a", {"train": _docs(40, 0), "validation": _docs(10, 1)})
    tasks.register_document_task("synth_b", {"train": _docs(25, 2, 6), "validation": _docs(8, 3)})
    tasks.register_document_task("synth_tiny", {"train": _docs(4, 4, 4), "validation": _docs(3, 5, 4)})
    c = tiny.get_config("test")
    c.data.cache_dir = str(tmp_path_factory.mktemp("cache"))
    c.data.seq_len, c.data.batch_size = T, B
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(batches_a, batches_b):
    return all(np.array_equal(a[k], b[k]) for a, b in zip(batches_a, batches_b, strict=True) for k in a)


def test_byte_vocab_round_trip_and_special_ids():
    v = vocab_lib.make_vocab(tiny.get_config("test").data)
    assert (v.vocab_size, v.pad_id, v.eos_id, v.unk_id) == (259, 0, 1, 2)
    assert v.encode("hello") == [107, 104, 111, 111, 114]  # bytes + 3
    text = "def f(x):\n\treturn 'é中'\n"
    assert v.decode(v.encode(text)) == text


@pytest.mark.slow
def test_packing_conserves_tokens(cfg):
    vocab = seqio.ByteVocabulary()
    tn = tasks.ensure_task("synth_a", cfg.data, vocab)
    stream, lengths = pipeline.token_stream(tn, "train", vocab, cfg.data)
    docs = [d.text for d in tasks.document_source(tn).documents("train")]
    encoded = [vocab.encode(d) for d in docs]
    assert len(stream) == sum(len(e) + 1 for e in encoded) == lengths.sum()  # + one EOS per document
    assert (stream == vocab.eos_id).sum() == len(docs) and stream[-1] == vocab.eos_id
    np.testing.assert_array_equal(stream, packing.pack_stream(encoded, vocab.eos_id)[0])
    # Rows in stream order cover the stream up to the tail (< one row), each token once.
    n = packing.num_rows(len(stream), T)
    rows = packing.gather_rows(stream, np.arange(n), T)
    assert rows.shape == (n, T + 1) and len(stream) - 1 - n * T < T
    np.testing.assert_array_equal(np.concatenate([rows[:, :-1].ravel(), rows[-1, -1:]]), stream[: n * T + 1])


def test_packing_conserves_tokens_of_the_stdlib(cfg):
    vocab = seqio.ByteVocabulary()
    tn = tasks.ensure_task("stdlib", cfg.data, vocab)
    stream, lengths = pipeline.token_stream(tn, "train", vocab, cfg.data)
    docs = tasks.document_source(tn).documents("train")
    assert len(stream) == sum(len(d.text.encode("utf-8")) + 1 for d in docs) and len(lengths) == len(docs)


def test_batch_fields(cfg):
    b = next(pipeline.make_train_iterator(cfg, "synth_a:1", seed=0))
    assert {k: v.shape for k, v in b.items()} == {k: (B, T) for k in b}
    assert all(b[k].dtype == np.int32 for k in ("inputs", "targets", "positions", "segment_ids"))
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    np.testing.assert_array_equal(b["positions"], np.broadcast_to(np.arange(T), (B, T)))
    np.testing.assert_array_equal(b["weights"], np.ones((B, T), np.float32))
    seg, eos = b["segment_ids"], b["inputs"] == 1
    assert (seg[:, 0] == 1).all()
    np.testing.assert_array_equal(np.diff(seg, axis=1), eos[:, :-1])  # steps up exactly after each EOS
    assert eos.any()


def test_shuffle_is_seeded_and_covers_each_row_once_per_epoch(cfg):
    mk = lambda seed: pipeline.make_train_iterator(cfg, "synth_a:1", seed=seed)
    it = mk(0)
    n = it.providers[0].n_rows
    assert _equal(_take(mk(0), 5), _take(mk(0), 5))
    assert not _equal(_take(mk(0), 5), _take(mk(1), 5))
    got = np.concatenate([np.concatenate([x["inputs"], x["targets"][:, -1:]], 1) for x in _take(it, n)])
    stream, _ = pipeline.token_stream(it.names[0], "train", seqio.ByteVocabulary(), cfg.data)
    every = packing.gather_rows(stream, np.arange(n), T)
    epoch0 = got[:n]
    assert not np.array_equal(epoch0, every)  # shuffled ...
    assert sorted(map(bytes, epoch0)) == sorted(map(bytes, every))  # ... a permutation of all rows


def test_resume_is_exact_across_epochs(cfg):
    spec = "synth_tiny:0.5,synth_b:0.5"
    it = pipeline.make_train_iterator(cfg, spec, seed=3)
    n_tiny = it.providers[0].n_rows
    k = n_tiny + 1  # past the end of synth_tiny's first epoch (it gets ~B/2 rows a batch)
    ref = _take(it, 2 * k)
    fresh = pipeline.make_train_iterator(cfg, spec, seed=3)
    _take(fresh, k)
    state = json.loads(json.dumps(fresh.get_state()))
    assert state["tasks"]["voltron_synth_tiny"]["epoch"] >= 1
    resumed = pipeline.make_train_iterator(cfg, spec, seed=3)
    resumed.set_state(state)
    assert _equal(_take(resumed, k), ref[k:])


def test_host_slices_concatenate_to_the_global_batch(cfg):
    spec = "synth_a:0.6,synth_b:0.4"
    glob = _take(pipeline.make_train_iterator(cfg, spec, seed=1), 6)
    for count in (2, 4):
        hosts = [
            _take(pipeline.make_train_iterator(cfg, spec, seed=1, process_index=i, process_count=count), 6)
            for i in range(count)
        ]
        for step, g in enumerate(glob):
            for key in g:
                np.testing.assert_array_equal(np.concatenate([h[step][key] for h in hosts]), g[key])


def test_mixture_allocation_is_exact():
    rates = [0.5, 0.3, 0.2]
    counts = np.zeros(3, np.int64)
    for _ in range(50):
        plan = packing.allocate(rates, counts, 7)
        assert len(plan) == 7
        counts += np.bincount(plan, minlength=3)
        assert np.abs(counts - np.asarray(rates) * counts.sum()).max() < 1  # within one row at every batch
    # A 0.7/0.3 mixture of 8-row batches: 11.2 rows of 16 is not an integer; the long-run count still is.
    got = np.bincount(packing.allocate([0.7, 0.3], [0, 0], 8 * 100), minlength=2)
    np.testing.assert_array_equal(got, [560, 240])


def test_mixture_rows_come_from_their_tasks(cfg):
    it = pipeline.make_train_iterator(cfg, "synth_a:3,synth_b:1", seed=0)
    _take(it, 10)
    st = it.get_state()["tasks"]
    rows = {
        k: v["epoch"] * p.n_rows + v["offset"] for (k, v), p in zip(st.items(), it.providers, strict=True)
    }
    assert rows == {"voltron_synth_a": 30, "voltron_synth_b": 10}


def _eval_rows(cfg, name, n_batches):
    a = pipeline.make_eval_batches(cfg, f"{name}:1", n_batches)
    assert _equal(a, pipeline.make_eval_batches(cfg, f"{name}:1", n_batches))  # fixed
    stream, _ = pipeline.token_stream(tasks.task_name(name), "validation", seqio.ByteVocabulary(), cfg.data)
    return np.concatenate([x["inputs"] for x in a]), stream, packing.num_rows(len(stream), T)


def test_eval_batches_spread_over_the_whole_split_in_order(cfg):
    flat, stream, n = _eval_rows(cfg, "synth_a", 1)
    assert n > 2 * len(flat)  # a long split: a prefix would miss most of it
    rows = [i * n // len(flat) for i in range(len(flat))]
    assert rows[-1] >= n // 2  # not the first rows
    for x, r in zip(flat, rows, strict=True):
        np.testing.assert_array_equal(x, stream[r * T : r * T + T])  # validation split, in order


def test_eval_batches_use_every_row_of_a_short_split_equally(cfg):
    flat, stream, n = _eval_rows(cfg, "synth_tiny", 6)
    assert len(flat) > n
    hits = np.array([[np.array_equal(x, stream[r * T : r * T + T]) for r in range(n)] for x in flat])
    assert hits.any(1).all()  # every eval row is a row of the split
    uses = hits.sum(0)
    assert uses.min() >= len(flat) // n and uses.max() <= len(flat) // n + 1  # none doubled by a wrap


def _as_seqio_task(name: str, vocab) -> str:
    """Document task `name` also as a seqio task (what a TFDS task is), to stream it through seqio."""
    return tasks.register_document_task(name, tasks.document_source(name), vocab)


def test_streaming_rows_match_memory_rows_and_resume(cfg):
    vocab = seqio.ByteVocabulary()
    tn = _as_seqio_task("synth_a", vocab)
    stream, _ = pipeline.token_stream(tn, "train", vocab, cfg.data)
    n = packing.num_rows(len(stream), T)
    plain = streaming.StreamRows(tn, "train", T, (0,), False, None, block_rows=4)
    got = plain.take(n + 3)  # one epoch then the start of the next
    np.testing.assert_array_equal(got[:n], packing.gather_rows(stream, np.arange(n), T))
    np.testing.assert_array_equal(got[n:], got[:3])
    shuffled = streaming.StreamRows(tn, "train", T, (0,), True, None, block_rows=4)
    first = shuffled.take(6)
    state = dict(shuffled.state)
    ref = shuffled.take(n)
    assert sorted(map(bytes, first[:4])) == sorted(map(bytes, got[:4])) and not np.array_equal(first, got[:6])
    again = streaming.StreamRows(tn, "train", T, (0,), True, None, block_rows=4)
    again.set_state(state)
    np.testing.assert_array_equal(again.take(n), ref)


def test_streaming_task_in_the_iterator_resumes_exactly(cfg, monkeypatch):
    # Serve synth_b as a stream (the TFDS path) by hiding its in-memory documents from the pipeline.
    _as_seqio_task("synth_b", vocab_lib.ByteVocabulary())
    real = tasks.document_source
    monkeypatch.setattr(tasks, "document_source", lambda n: None if n == "voltron_synth_b" else real(n))
    monkeypatch.setattr(streaming, "STREAM_BLOCK_ROWS", 5)
    spec = "synth_a:0.5,synth_b:0.5"
    it = pipeline.make_train_iterator(cfg, spec, seed=2)
    assert it.providers[1].streaming and not it.providers[0].streaming
    ref = _take(it, 12)
    first = pipeline.make_train_iterator(cfg, spec, seed=2)
    _take(first, 7)
    state = json.loads(json.dumps(first.get_state()))
    assert set(state["tasks"]["voltron_synth_b"]) == {"rows", "epoch", "doc", "token", "in_block"}
    resumed = pipeline.make_train_iterator(cfg, spec, seed=2)
    resumed.set_state(state)
    assert _equal(_take(resumed, 5), ref[7:])


def test_registration_is_idempotent_and_replaces_changed_documents():
    vocab = seqio.ByteVocabulary()
    name = tasks.register_document_task("synth_idem", {"train": ["a b", "c"]}, vocab)
    task = seqio.TaskRegistry.get(name)
    assert tasks.register_document_task("synth_idem", {"train": ["a b", "c"]}, vocab) == name
    assert seqio.TaskRegistry.get(name) is task
    tasks.register_document_task("synth_idem", {"train": ["d"]}, vocab)
    assert seqio.TaskRegistry.get(name) is not task
    assert tasks.document_source(name).documents("train")[0].text == "d"


def test_tfds_task_is_registered_without_loading(cfg):
    name = tasks.ensure_task("tfds:c4/en", cfg.data, seqio.ByteVocabulary())
    assert name == "voltron_tfds_c4_en" and tasks.document_source(name) is None
    assert isinstance(seqio.TaskRegistry.get(name).source, seqio.TfdsDataSource)
    assert tasks.ensure_task("corpus", cfg.data, seqio.ByteVocabulary()) == "voltron_stdlib"


def test_corpus_name_follows_data_ordering(cfg):
    c = cfg.copy_and_resolve_references()
    c.data.ordering = "dedup_random"
    with pytest.raises(corpus.DataError, match="unknown data task 'icp_random'.*voltron_jax.data.prepare"):
        tasks.ensure_task("corpus", c.data, seqio.ByteVocabulary())
    tasks.register_document_task("icp_random", {"train": ["b a"], "validation": ["c"]})
    assert tasks.ensure_task("corpus", c.data, seqio.ByteVocabulary()) == "voltron_icp_random"


@pytest.mark.slow
def test_tfds_task_streams_mocked_c4_and_resumes(cfg):
    import tensorflow_datasets as tfds

    # tfds.testing.mock_data fakes the c4 records in memory: the real TfdsDataSource path, no download.
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        it = pipeline.make_train_iterator(cfg, "tfds:c4/en:0.5,synth_a:0.5", seed=0)
        ref = _take(it, 6)
        first = pipeline.make_train_iterator(cfg, "tfds:c4/en:0.5,synth_a:0.5", seed=0)
        _take(first, 3)
        resumed = pipeline.make_train_iterator(cfg, "tfds:c4/en:0.5,synth_a:0.5", seed=0)
        resumed.set_state(json.loads(json.dumps(first.get_state())))
        assert _equal(_take(resumed, 3), ref[3:])
    assert it.providers[0].streaming and ref[0]["inputs"].shape == (B, T)


def test_clear_errors(cfg):
    mk = lambda c=cfg, mixture="synth_a:1", **kw: pipeline.make_train_iterator(c, mixture, seed=0, **kw)
    with pytest.raises(corpus.DataError, match="unknown data task 'nope'"):
        mk(mixture="nope:1")
    with pytest.raises(corpus.DataError, match="not 'name:rate'"):
        mk(mixture="synth_a:x")
    with pytest.raises(corpus.DataError, match="no cluster assignment"):
        mk(cluster=3)
    with pytest.raises(corpus.DataError, match="not divisible by process_count=3"):
        mk(process_index=0, process_count=3)
    small = cfg.copy_and_resolve_references()
    small.model.vocab_size = 100
    with pytest.raises(corpus.DataError, match="--config.model.vocab_size=259"):
        mk(small)
    tasks.register_document_task("synth_empty", {"train": ["ab"], "validation": []})
    with pytest.raises(corpus.DataError, match="fewer than one row"):
        mk(mixture="synth_empty:1")
    it = mk()
    with pytest.raises(corpus.DataError, match="does not match"):
        it.set_state(mk(mixture="synth_b:1").get_state())


@pytest.mark.slow
def test_sentencepiece_trains_small_and_round_trips(cfg, tmp_path):
    texts = [d.text for d in corpus.stdlib_source().documents("train")[:20]]
    path = vocab_lib.train_sentencepiece(texts, 400, str(tmp_path / "spm.model"), max_chars=60_000)
    c = cfg.copy_and_resolve_references()
    c.data.vocab, c.data.spm_path = "sentencepiece", path
    v = vocab_lib.make_vocab(c.data)
    assert (v.vocab_size, v.pad_id, v.eos_id, v.unk_id) == (400, 0, 1, 2)
    code = "class A:\n    def f(self, x):\n\t\treturn x  # ü 中\n\n"
    assert v.decode(v.encode(code)) == code  # indentation, newlines and unicode survive
    with pytest.raises(corpus.DataError, match="model.vocab_size"):
        vocab_lib.check_vocab_size(259, v, c.data)
    c.model.vocab_size = 400
    b = next(pipeline.make_train_iterator(c, "synth_a:1", seed=0))
    assert b["inputs"].max() < 400 and (b["inputs"] == v.eos_id).any()


@pytest.mark.slow
def test_models_import_without_data_or_tensorflow():
    code = (
        "import sys, voltron_jax.models, voltron_jax.models.decoder; "
        "bad = [m for m in ('seqio', 'tensorflow', 'voltron_jax.data') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


def test_orderings_are_one_table(monkeypatch):
    from voltron_jax import train
    from voltron_jax.config import validate
    from voltron_jax.data import orderings
    from voltron_jax.errors import ConfigError

    c = tiny.get_config("test")
    c.data.ordering = "nope"
    with pytest.raises(ConfigError, match=", ".join(repr(n) for n in orderings.ORDERINGS)):
        validate(c)
    # a new ordering in the table is known to validation, the 'corpus' name and the train loop at once
    extra = orderings.Ordering("semantic", True, "icp", "icp", "icp", doc="test")
    monkeypatch.setitem(orderings.ORDERINGS, "semantic", extra)
    c.data.ordering = "semantic"
    validate(c)
    assert train.needs_prepare(c) and orderings.train_stores("semantic") == ("icp",)
    tasks.register_document_task("icp", {"train": ["a b"], "validation": ["c"]})
    assert tasks.ensure_task("corpus", c.data, seqio.ByteVocabulary()) == "voltron_icp"


def test_python_docs_corpus_feeds_the_mixture_name_corpus(cfg, tmp_path, monkeypatch):
    """data.corpus='python_docs' (the installed Python documentation sources, data/corpus.py): the mixture
    name 'corpus' streams exactly its documents, each followed by EOS."""
    root = tmp_path / "python3.11" / "html" / "_sources"
    texts = {
        f"library/m{i}.rst.txt": f"Module {i}\n{'=' * 8}\n\n" + "Long prose. " * (40 + i) for i in range(6)
    }
    for rel, text in texts.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    monkeypatch.setattr(corpus, "PYTHON_DOCS_GLOB", str(tmp_path / "python3*" / "html" / "_sources"))
    tasks._builtin_source.cache_clear()
    c = cfg.copy_and_resolve_references()
    c.data.corpus, c.data.ordering = "python_docs", "random"
    vocab = seqio.ByteVocabulary()
    tn = tasks.ensure_task("corpus", c.data, vocab)
    assert tn == tasks.task_name("python_docs")
    docs = tasks.document_source(tn).documents("train")
    assert {d.id for d in docs} <= set(texts) and all(d.text == texts[d.id] for d in docs)
    stream, _ = pipeline.token_stream(tn, "train", vocab, c.data)
    assert len(stream) == sum(len(d.text.encode()) + 1 for d in docs)
    b = next(pipeline.make_train_iterator(c, "corpus:1", seed=0))
    assert b["inputs"].shape == (B, T)
    tasks._builtin_source.cache_clear()
