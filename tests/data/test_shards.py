"""Token stores (ArrayRecord shards + index) and the Grain-read iterator: exact resume at any position
(with prefetch), host-count-free global rows (2 hosts == 1 host, a 2-host state resumes on 1 host), ICP
order inside the packed rows, damaged / missing / half-written stores."""

import json
import os
import shutil

import numpy as np
import pytest
import seqio
from etils import epath
from planted import planted_records

from configs import tiny
from voltron_jax.data import corpus, packing, pipeline, prefetch, prepare, shards, tasks

T, B = 16, 4
WORDS = ["alpha", "beta", "gamma", "delta", "\n", "é", "中", "(", ")", "x"]


def _docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 40))) for _ in range(n)]


class CharVocab:
    """Any vocabulary with the interface the stores use (encode, eos_id, vocab_size): code points + 3."""

    eos_id, vocab_size = 1, 70_000  # > 65536: int32 storage

    def encode(self, text: str) -> list[int]:
        return [ord(ch) + 3 for ch in text]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    # small chunks and shards, so a row spans records and shards (module defaults, read at write time)
    mp = pytest.MonkeyPatch()
    mp.setattr(shards, "CHUNK_TOKENS", 37)
    mp.setattr(shards, "CHUNKS_PER_SHARD", 5)
    tasks.register_document_task("shard_a", {"train": _docs(60, 0), "validation": _docs(10, 1)})
    tasks.register_document_task("shard_b", {"train": _docs(30, 2), "validation": _docs(5, 3)})
    c = tiny.get_config("test")
    c.data.cache_dir = str(tmp_path_factory.mktemp("cache"))
    c.data.seq_len, c.data.batch_size = T, B
    yield c
    mp.undo()


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.mark.parametrize("vocab", [seqio.ByteVocabulary(), CharVocab()], ids=["byte", "any-vocab"])
def test_store_holds_the_packed_stream_and_reads_any_range(tmp_path, vocab):
    docs = _docs(50, 4)
    index = shards.write_store(
        tmp_path / "s",
        vocab,
        None,
        segments=[("one", docs[:20]), ("two", docs[20:])],
        chunk_tokens=23,
        chunks_per_shard=4,
    )
    stream, _ = packing.pack_stream([np.asarray(vocab.encode(d)) for d in docs], vocab.eos_id)
    s = shards.TokenStore(tmp_path / "s")
    assert (s.n_tokens, s.n_documents) == (len(stream), 50) == (index["tokens"], index["documents"])
    assert len(index["shards"]) == -(-len(stream) // (23 * 4)) > 2
    assert sum(sh["documents"] for sh in index["shards"]) == 50
    np.testing.assert_array_equal(s.read(0, s.n_tokens), stream)
    n_one = sum(len(vocab.encode(d)) + 1 for d in docs[:20])
    assert s.segments == {"one": (0, n_one, 20), "two": (n_one, len(stream), 30)}
    starts = np.random.default_rng(0).integers(0, len(stream) - 60, 40)
    got = s.read_many(starts, 60)  # ranges across records and shards
    np.testing.assert_array_equal(got, stream[starts[:, None] + np.arange(60)])
    assert s.dtype.itemsize == (4 if isinstance(vocab, CharVocab) else 2)


def test_missing_damaged_and_half_written_stores_are_clear_errors(tmp_path):
    path = tmp_path / "s"
    shards.write_store(path, seqio.ByteVocabulary(), _docs(80, 5), chunk_tokens=20, chunks_per_shard=3)
    files = sorted(f for f in os.listdir(path) if f.endswith(".arrayrecord"))
    victim = path / files[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated
    s = shards.TokenStore(path)
    s.read(0, 10)  # shard 0 is fine
    with pytest.raises(
        corpus.DataError, match=f"token shard {victim} is .* bytes.*the data preparation again"
    ):
        s.read(70, 80)
    victim.unlink()
    with pytest.raises(
        corpus.DataError, match=f"token shard {victim} is missing.*the data preparation again"
    ):
        shards.TokenStore(path).verify()
    victim.write_bytes(data[:80] + bytes(range(64)) + data[144:])  # same size, garbled records: refused
    with pytest.raises(corpus.DataError, match=f"token shard {victim} is"):
        shards.TokenStore(path).read(0, 200)
    # a writer that died before the index: never taken as complete, and rebuilt in place
    (path / shards.INDEX).unlink()
    assert not shards.is_complete(path)
    with pytest.raises(corpus.DataError, match="was not finished.*run the data preparation again"):
        shards.TokenStore(path)
    shards.build_store(path, seqio.ByteVocabulary(), lambda w: w.add(["fresh"]))
    assert shards.TokenStore(path).n_documents == 1


def test_resume_at_any_position_is_exact_with_and_without_prefetch(cfg):
    spec = "shard_a:0.7,shard_b:0.3"
    mk = lambda: pipeline.make_train_iterator(cfg, spec, seed=5)
    n_b = mk().providers[1].n_rows
    total = 3 * n_b // B + 6  # several epochs of shard_b
    ref = _take(mk(), total)
    for depth in (0, 2):
        for pos in (0, 1, 7, n_b // B + 1, total - 3):
            with prefetch.Prefetcher(mk(), depth=depth) as feed:
                assert _equal(_take(feed, pos), ref[:pos])
                state = json.loads(json.dumps(feed.state))  # what a checkpoint holds
            assert len(json.dumps(state)) < 400  # a few integers, whatever the position
            resumed = mk()
            resumed.set_state(state)
            assert _equal(_take(resumed, total - pos), ref[pos:]), (depth, pos)
    with pytest.raises(corpus.DataError, match="state version 1 was written by another data pipeline"):
        mk().set_state(dict(state, version=1))  # the in-memory pipeline's states: another row order


def test_two_hosts_read_the_global_rows_of_one_and_their_state_resumes_on_one(cfg):
    spec = "shard_a:0.5,shard_b:0.5"
    mk = lambda i=0, n=1: pipeline.make_train_iterator(cfg, spec, seed=9, process_index=i, process_count=n)
    ref = _take(mk(), 12)
    hosts = [mk(i, 2) for i in range(2)]
    got = [[next(h) for h in hosts] for _ in range(5)]
    for step, parts in enumerate(got):
        for k in ref[step]:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), ref[step][k])
    states = [h.get_state() for h in hosts]
    assert states[0] == states[1]  # every host saves the same global position
    one = mk()
    one.set_state(json.loads(json.dumps(states[1])))  # 2-host checkpoint, resumed on 1 host
    assert _equal(_take(one, 7), ref[5:])
    four = [mk(i, 4) for i in range(4)]  # and on 4
    for h in four:
        h.set_state(states[0])
    for step in range(5, 9):
        parts = [next(h) for h in four]
        np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), ref[step]["inputs"])


def test_every_row_of_an_epoch_once_and_shuffle_by_seed(cfg):
    it = pipeline.make_train_iterator(cfg, "shard_a:1", seed=1)
    n = it.providers[0].n_rows
    stream, _ = pipeline.token_stream(it.names[0], "train", seqio.ByteVocabulary(), cfg.data)
    rows = it.providers[0].windows(np.arange(2 * n))
    every = packing.gather_rows(stream, np.arange(n), T)
    for e in range(2):
        ep = rows[e * n : (e + 1) * n]
        assert sorted(map(bytes, ep)) == sorted(map(bytes, every)) and not np.array_equal(ep, every)
    assert not np.array_equal(rows[:n], rows[n:])  # each epoch its own order
    other = pipeline.make_train_iterator(cfg, "shard_a:1", seed=2).providers[0].windows(np.arange(n))
    assert not np.array_equal(other, rows[:n])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    recs, _ = planted_records(200, 8, 40)
    c = tiny.get_config("test")
    c.data.n_clusters, c.data.embed.dim, c.data.icp.knn = 4, 32, 10
    c.data.seq_len, c.data.batch_size, c.data.ordering = 512, 8, "icp"
    c.data.cache_dir = str(tmp / "cache")
    prepare.prepare(c, str(tmp / "run"), records=recs, progress=False)
    return c, str(tmp / "run"), recs


def test_adjacent_documents_in_a_row_are_icp_neighbours(prepared):
    c, workdir, _ = prepared
    prepare.register_tasks(c, workdir)
    out = epath.Path(workdir) / "data"
    order = [r["text"] for j in range(4) for r in prepare.read_jsonl(prepare.shard_path(out, j, 4))]
    pos = {t: i for i, t in enumerate(order)}
    it = pipeline.make_train_iterator(c, "pretrain", seed=0)
    pairs = 0
    for batch in _take(it, 6):
        for row in batch["inputs"]:
            cuts = np.flatnonzero(row == 1)  # EOS: a document ends
            segs = np.split(row, cuts + 1)
            texts = [bytes((s[s != 1] - 3).astype(np.uint8)).decode("utf-8", "ignore") for s in segs]
            for a, b in zip(texts[:-1], texts[1:]):
                ends = [t for t in order if len(a) >= 25 and t.endswith(a)]
                starts = [t for t in order if len(b) >= 25 and t.startswith(b)]
                if len(ends) == 1 and len(starts) == 1:
                    assert pos[starts[0]] == pos[ends[0]] + 1  # consecutive in the ICP order
                    pairs += 1
    assert pairs > 20


def test_prepare_rewrites_a_half_written_store_with_the_same_bytes(prepared, tmp_path):
    c, workdir, recs = prepared
    other = tmp_path / "run"
    shutil.copytree(os.path.join(workdir, "data"), other / "data")
    (stores,) = (other / "data" / "tokens").iterdir()
    icp = stores / "icp"
    before = {f: (icp / f).read_bytes() for f in os.listdir(icp)}
    (icp / shards.INDEX).unlink()  # the writer died before its index: not complete
    (icp / sorted(f for f in before if f.endswith(".arrayrecord"))[0]).write_bytes(b"half")
    with pytest.raises(corpus.DataError, match="was not finished"):
        shards.TokenStore(icp)
    prepare.prepare(c, str(other), records=recs, progress=False)  # the ICP part is done; the store is redone
    assert {f: (icp / f).read_bytes() for f in os.listdir(icp)} == before
    assert not [f for f in os.listdir(stores) if ".partial-" in f]


def test_sentencepiece_is_trained_on_a_sample_of_the_prepared_corpus(tmp_path):
    from voltron_jax.data import vocab as vocab_lib

    recs, _ = planted_records(120, 4, 20, seed=1)
    c = tiny.get_config("test")
    c.data.corpus, c.data.vocab, c.data.spm_vocab_size = "tfds:c4/en", "sentencepiece", 280
    c.data.n_clusters, c.data.embed.dim, c.data.icp.knn = 2, 16, 5
    c.data.seq_len, c.data.batch_size, c.data.ordering = 32, 4, "icp"
    c.model.vocab_size = 280
    with pytest.raises(corpus.DataError, match="trained by the data preparation"):
        vocab_lib.make_vocab(c.data)  # nothing prepared for this corpus yet
    prepare.prepare(c, str(tmp_path / "run"), records=recs, progress=False)
    model = tmp_path / "run" / "data" / "spm_280.model"
    kept = [r["text"] for j in range(2) for r in prepare.read_jsonl(prepare.shard_path(model.parent, j, 2))]
    # the sample: every kept document's lines (the corpus is below the sample size), in the kept order
    assert vocab_lib.sample_lines_stream(lambda: iter(kept)) == vocab_lib.sample_lines(kept)
    v = vocab_lib.make_vocab(c.data)  # the prepared model, found without data.spm_path
    assert v.vocab_size == 280 and (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
    assert v.decode(v.encode(kept[3])) == kept[3]
    b = next(pipeline.make_train_iterator(c, "pretrain", seed=0))
    stream, _ = pipeline.token_stream("icp", "train", v, c.data)
    assert len(stream) == sum(len(v.encode(t)) + 1 for t in kept) and b["inputs"].max() < 280
    # a sample of a corpus above the budget: a deterministic part of the lines, the same from a stream
    big = [f"line {i} of text\n" * 3 for i in range(2000)]
    part = vocab_lib.sample_lines_stream(lambda: iter(big), max_chars=5000)
    assert part == vocab_lib.sample_lines(big, max_chars=5000) and 0 < len(part) < 6000


HOST = """
import json, sys
import numpy as np
from configs import tiny
from voltron_jax.data import pipeline, tasks
store, cache, i, n, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tasks.register_store_task("two_proc", {"train": (store, None)})
c = tiny.get_config("test")
c.data.cache_dir, c.data.seq_len, c.data.batch_size = cache, 16, 4
it = pipeline.make_train_iterator(c, "two_proc:1", seed=4, process_index=i, process_count=n)
rows = [next(it)["inputs"].tolist() for _ in range(steps)]
print(json.dumps(dict(rows=rows, state=it.get_state())))
"""


@pytest.mark.heavy  # 3 interpreters importing TensorFlow: ~25 CPU s (87 s wall on the shared host)
def test_two_real_processes_read_one_process_rows_and_resume_on_one(tmp_path):
    import subprocess
    import sys

    store = tmp_path / "store"
    shards.write_store(store, seqio.ByteVocabulary(), _docs(200, 7), chunk_tokens=50, chunks_per_shard=4)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=root)

    def host(i, n, steps):
        cmd = [sys.executable, "-c", HOST, str(store), str(tmp_path / "c"), str(i), str(n), str(steps)]
        return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, text=True)

    procs = [host(i, 2, 5) for i in range(2)] + [host(0, 1, 9)]  # 2 hosts side by side, and 1 host
    two = [json.loads(p.communicate()[0].splitlines()[-1]) for p in procs[:2]]
    one = json.loads(procs[2].communicate()[0].splitlines()[-1])
    for step in range(5):
        assert (
            two[0]["rows"][step] + two[1]["rows"][step] == one["rows"][step]
        )  # host 0's half, then host 1's
    assert two[0]["state"] == two[1]["state"]
    tasks.register_store_task("two_proc", {"train": (str(store), None)})
    c = tiny.get_config("test")
    c.data.cache_dir, c.data.seq_len, c.data.batch_size = str(tmp_path / "c"), 16, 4
    it = pipeline.make_train_iterator(c, "two_proc:1", seed=4)
    it.set_state(two[1]["state"])  # the 2-process checkpoint, resumed in this single process
    assert [next(it)["inputs"].tolist() for _ in range(4)] == one["rows"][5:]
