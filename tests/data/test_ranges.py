"""Token stores tokenised in ranges (voltron_jax/data/ranges.py) are the in-process stores, byte for byte,
also when ranges are forced small so that many meet inside ArrayRecord records and at shard boundaries;
range files go only after the index is committed, and a missing one leaves the store incomplete."""

import os

import numpy as np
import pytest
import seqio
from planted import planted_records

from configs import tiny
from voltron_jax.data import corpus, prepare, ranges, shards


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    recs, _ = planted_records(160, 8, 40, seed=5)
    c = tiny.get_config("test")
    c.data.n_clusters, c.data.embed.dim, c.data.icp.knn = 4, 32, 10
    c.data.ordering = "dedup_random"  # stores random + cluster_shuffled: the seeded orders
    wd = tmp_path_factory.mktemp("prep")
    prepare.prepare(c, str(wd), records=recs, progress=False, register=False)
    return c, wd / "data"


def _files(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, fs in os.walk(folder)
        for f in fs
    }


@pytest.mark.parametrize("ordering", ["icp", "dedup_random"])
def test_ranged_stores_equal_the_in_process_stores(prepared, tmp_path, monkeypatch, ordering):
    c, out = prepared
    c = c.copy_and_resolve_references()
    c.data.ordering = ordering
    # small records and shards: documents, ranges, records and shards all cross one another
    monkeypatch.setattr(shards, "CHUNK_TOKENS", 97)
    monkeypatch.setattr(shards, "CHUNKS_PER_SHARD", 3)
    # the global shuffle (`random`) planned in buckets of ~1/5 of the text: no unit holds the corpus
    train_bytes = sum(p.stat().st_size for p in (out / "train").iterdir())
    monkeypatch.setattr(ranges, "PLAN_BUCKET_BYTES", train_bytes // 5)
    vocab = seqio.ByteVocabulary()
    c.data.token_dir = str(tmp_path / "seq")
    seq = prepare.tokenize(c.data, out, vocab)
    c.data.token_dir = str(tmp_path / "ranged")
    stores = ranges.plan(c.data, out, vocab, range_bytes=900)
    n_ranges = {s["store"]: len(s["ranges"]) for s in stores}
    assert len(stores) == len(seq) and all(n > 4 for n in n_ranges.values()), n_ranges
    for s in stores:
        unit_docs = [sum(s["documents"][k] for k in keys) for _, keys in s["segments"]]
        assert sum(unit_docs) == sum(s["documents"].values())
        if s["kind"] in ("icp", "cluster_shuffled", "random"):
            assert len(unit_docs) >= 4 and max(unit_docs) < sum(unit_docs) / 2, (s["store"], unit_docs)
    got = ranges.tokenize(c.data, out, vocab, range_bytes=900)
    assert sorted(got) == sorted(os.path.basename(p) for p in seq.values())
    for store, path in seq.items():
        a, b = _files(path), _files(got[os.path.basename(path)])
        index = shards.TokenStore(path).index
        assert len(index["shards"]) > 2 and a == b, store
    assert not (out / ranges.TMP).exists()  # range files removed once the indexes were committed


def test_range_boundaries_fall_inside_records_and_at_segment_starts(prepared, tmp_path, monkeypatch):
    c, out = prepared
    c = c.copy_and_resolve_references()
    c.data.token_dir = str(tmp_path / "t")
    monkeypatch.setattr(shards, "CHUNK_TOKENS", 97)
    vocab = seqio.ByteVocabulary()
    stores = {s["store"]: s for s in ranges.plan(c.data, out, vocab, range_bytes=900)}
    st = stores["cluster_shuffled-seed0"]
    done = [ranges.tokenize_range(t, st["tmp"], vocab, out) for t in st["ranges"]]
    ends = np.cumsum([d["tokens"] for d in done])
    assert (ends % 97 != 0).sum() > 3  # ranges meet mid-record
    pos = {t["i"]: n for n, t in enumerate(st["ranges"])}
    seg_first = [pos[ids[0]] for _, ids in st["segments"] if ids]
    assert seg_first == sorted(seg_first) and len(seg_first) == 4  # each cluster starts a range
    index = ranges.pack(st, vocab, done)
    starts = [0, *ends[:-1]]
    assert [v[0] for v in index["segments"].values()] == [int(starts[i]) for i in seg_first]
    assert index["documents"] == sum(d["documents"] for d in done)


def test_a_missing_range_file_is_one_error_and_the_store_stays_incomplete(prepared, tmp_path):
    c, out = prepared
    c = c.copy_and_resolve_references()
    c.data.token_dir = str(tmp_path / "t")
    vocab = seqio.ByteVocabulary()
    st = ranges.plan(c.data, out, vocab, range_bytes=2000)[0]
    done = [ranges.tokenize_range(t, st["tmp"], vocab, out) for t in st["ranges"]]
    lost = ranges.range_file(st["tmp"], st["ranges"][2]["i"])
    lost.unlink()
    with pytest.raises(corpus.DataError, match=f"range file {lost} .* is missing"):
        ranges.pack(st, vocab, done)
    assert not shards.is_complete(st["path"])  # never taken as complete
    assert ranges.range_file(
        st["tmp"], st["ranges"][1]["i"]
    ).exists()  # the others stay until an index is committed
    with pytest.raises(corpus.DataError, match="is missing; run the data preparation again"):
        shards.TokenStore(st["path"])


def test_a_unit_cut_does_not_depend_on_the_delivery_order_and_a_lost_piece_is_an_error(prepared, tmp_path):
    c, out = prepared
    c = c.copy_and_resolve_references()
    c.data.token_dir = str(tmp_path / "t")
    vocab = seqio.ByteVocabulary()
    stores = ranges.plan_stores(c.data, out, vocab)
    st = next(s for s in stores if s["kind"] == "random")
    scans = [kv for job in ranges.scan_jobs(stores) for kv in ranges.scan(job, out)]
    parts = [part for key, part in scans if key == (st["store"], 0)]
    assert len(parts) == 4  # one per cluster file
    a = ranges.cut_unit(st, 0, parts, 900)
    b = ranges.cut_unit(st, 0, parts[::-1], 900)  # a runner may group them in any order
    assert a["ranges"] == b["ranges"] and sum(n for _, n in a["ranges"]) == sum(len(p["refs"]) for p in parts)
    assert all(np.array_equal(x["refs"], y["refs"]) for x, y in zip(a["tasks"], b["tasks"], strict=True))
    with pytest.raises(corpus.DataError, match="got the scans of files"):
        ranges.cut_unit(st, 0, parts[1:], 900)  # one cluster file's part lost on the way
    cuts = [ranges.cut_unit(st, u, parts, 900) for u in range(len(st["units"]))]
    ranges.assemble(st, cuts)
    with pytest.raises(corpus.DataError, match=r"is missing unit\(s\) \[0\]"):
        ranges.assemble(st, cuts[1:])
