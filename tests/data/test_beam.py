"""The Apache Beam pipeline (DirectRunner) writes exactly what the in-process preparation writes."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import seqio
from etils import epath
from planted import planted_records

from configs import tiny
from voltron_jax.data import beam_fixes, beam_pipeline, cbtm, corpus, prepare, ranges, shards


def test_seqio_and_beam_import_together():
    # The dependency trap: Beam caps protobuf < 7, sentencepiece 0.2.3 needs protobuf 7 (setup.py pins 0.2.0).
    import apache_beam
    import sentencepiece
    import seqio

    assert apache_beam.__version__.startswith("2.77") and sentencepiece.__version__ == "0.2.0"
    assert seqio.ByteVocabulary().encode("a") == [100]


def _stats_without_timing(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k not in ("seconds", "cpu_seconds", "docs_per_s")}


def test_beam_output_equals_in_process_output(tmp_path):
    recs, _ = planted_records(200, 8, 40, seed=3)
    recs = recs[::-1]  # input order must not matter to either runner
    c = tiny.get_config("test")
    c.data.n_clusters, c.data.embed.dim, c.data.icp.knn = 4, 32, 10
    local, beam = tmp_path / "local", tmp_path / "beam"
    s_local = prepare.prepare(c, str(local), records=recs, progress=False, register=False)
    s_beam = beam_pipeline.run(c, str(beam), records=recs)
    assert _stats_without_timing(s_beam) == _stats_without_timing(s_local)
    files = sorted(
        os.path.relpath(os.path.join(d, f), local / "data")
        for d, _, fs in os.walk(local / "data")
        for f in fs
    )
    stores = [f for f in files if f.startswith("tokens/")]
    # 4 shards, validation, marker, embedder, centroids + 3 token stores (random ordering: the per-cluster
    # shuffled train store, validation, validation by cluster) of one ArrayRecord shard and an index each
    assert len(files) - len(stores) == 4 + 4 and len(stores) == 3 * 2
    for f in files:
        a, b = (local / "data" / f), (beam / "data" / f)
        if f == prepare.MARKER:
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            assert ja["fingerprint"] == jb["fingerprint"] and ja["settings"] == jb["settings"]
        elif f == cbtm.EMBEDDER_FILE:  # pickles differ in memo layout; the fitted maps must not
            texts = [r["text"] for r in recs]
            ma, mb = cbtm.ClusterModel.load(str(local / "data")), cbtm.ClusterModel.load(str(beam / "data"))
            np.testing.assert_array_equal(ma.embedder.transform(texts), mb.embedder.transform(texts))
        else:
            assert a.read_bytes() == b.read_bytes(), f
    assert s_beam["docs"]["kept"] > 150 and sum(s_beam["clusters"]["train_sizes"]) == s_beam["docs"]["kept"]


def test_beam_tokenises_in_small_ranges_and_writes_the_in_process_stores(tmp_path, monkeypatch):
    # ranges of ~700 bytes of text (a few documents each), records of 61 tokens, 3 records per shard:
    # range, document, record and shard boundaries all fall at different places; the bytes must not change
    monkeypatch.setattr(shards, "CHUNK_TOKENS", 61)
    monkeypatch.setattr(shards, "CHUNKS_PER_SHARD", 3)
    monkeypatch.setattr(ranges, "PLAN_BUCKET_BYTES", 4000)  # the global shuffle planned in several units
    recs, _ = planted_records(120, 8, 30, seed=4)
    c = tiny.get_config("test")
    c.data.n_clusters, c.data.embed.dim, c.data.icp.knn = 3, 32, 10
    c.data.ordering = "dedup_random"  # the seeded stores: random (no segments) and cluster_shuffled
    local, beam = tmp_path / "local", tmp_path / "beam"
    prepare.prepare(c, str(local), records=recs, progress=False, register=False)
    beam_pipeline.run(c, str(beam), records=recs, range_bytes=700)
    vocab = seqio.ByteVocabulary()
    stores = ranges.plan(c.data, local / "data", vocab, 700)  # what the Beam run cut (all done here: [])
    assert stores == []
    tokens = lambda root: sorted(
        os.path.relpath(os.path.join(d, f), root / "data" / "tokens")
        for d, _, fs in os.walk(root / "data" / "tokens")
        for f in fs
    )
    names = tokens(local)
    assert names == tokens(beam) and len(names) > 4 * 5  # 4 stores, several shards each
    for f in names:
        a, b = local / "data" / "tokens" / f, beam / "data" / "tokens" / f
        assert a.read_bytes() == b.read_bytes(), f
    assert not (beam / "data" / ranges.TMP).exists()  # the range files went once the indexes were written
    # the split was really small: re-plan the Beam output's stores into a fresh folder
    c.data.token_dir = str(tmp_path / "replan")
    replan = ranges.plan(c.data, beam / "data", vocab, 700)
    n = {s["store"]: len(s["ranges"]) for s in replan}
    assert min(n.values()) > 3 and next(len(s["units"]) for s in replan if s["kind"] == "random") > 2, n
    # only the tokenisation, on Beam, of the in-process preparation: the same stores again
    paths = beam_pipeline.tokenize(c, str(local), range_bytes=700)
    for store, path in paths.items():
        mine = local / "data" / "tokens" / os.path.relpath(path, c.data.token_dir)
        got = {f: (epath.Path(path) / f).read_bytes() for f in os.listdir(path)}
        assert got == {f: (mine / f).read_bytes() for f in os.listdir(mine)}, store


def test_documents_lost_by_the_runner_are_an_error_not_a_finished_preparation(tmp_path):
    c = tiny.get_config("test")
    c.data.n_clusters = 2
    s = prepare.settings(c)
    stats = [prepare.order_cluster(j, [], np.zeros((0, 1), np.float32), s["icp"])[1] for j in range(2)]
    stats[0]["n_in"] = 4  # one of the 5 kept documents never reached its cluster's ICP step
    counts = dict(train=5, validation=1, kept=5, digest=0)
    with pytest.raises(corpus.DataError, match="delivered 4 of the 5 kept train documents"):
        beam_pipeline._finish(None, s, c.data, str(tmp_path), stats, [0, 1], [1, 1], counts)
    assert not (tmp_path / prepare.MARKER).exists()
    stats[0]["n_in"] = 5
    beam_pipeline._finish(None, s, c.data, str(tmp_path), stats, [0, 1], [1, 1], counts)
    assert (tmp_path / prepare.MARKER).exists()


def test_the_runner_data_stream_keeps_every_write_while_a_periodic_flush_sends():
    # Beam 2.77's runner -> worker data stream (the DirectRunner's multi_processing / multi_threading modes)
    # flushes every second from a thread; what was written while that flush was sending was dropped
    # (beam_fixes.py; without install() this loses ~90% of the bytes). With the fix, all arrive, in order.
    from apache_beam.runners.worker import data_plane

    beam_fixes.install()
    sent = []

    def slow_send(data: bytes) -> None:  # a send that waits, as on a full gRPC send queue
        if data:
            time.sleep(0.02)
            sent.append(data)

    stream = data_plane.TimeBasedBufferingClosableOutputStream(
        close_callback=sent.append, flush_callback=slow_send, time_flush_threshold_ms=5
    )
    chunks = [bytes([i]) * 300 for i in range(60)]
    for c in chunks:
        stream.write(c)
        time.sleep(0.002)
    stream.close()
    assert len(sent) > 3  # several periodic flushes sent while the writes went on
    assert b"".join(sent) == b"".join(chunks)


@pytest.mark.heavy
def test_a_real_multi_process_beam_run_loses_records_without_the_fix_and_none_with_it(tmp_path):
    # benchmarks/beam_element_loss.py: the preparation graph's shape, Beam only, DirectRunner multi_processing
    # with 2 workers, the runner's flush period cut from 1 s to 1 ms so that 60k records (~150 MB) meet the
    # race that needed ~1 GB at 1 s. ~1 min, ~3 GB.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "benchmarks", "beam_element_loss.py")
    rows = {}
    for fix in (False, True):
        out = tmp_path / f"fix{fix}.jsonl"
        cmd = [sys.executable, script, "--docs=60000", "--doc_bytes=2500", "--flush_ms=1", f"--json={out}"]
        subprocess.run(cmd + ["--fix"] * fix, check=True, capture_output=True, timeout=600)
        rows[fix] = json.loads(out.read_text())
    assert rows[True]["kept"] == rows[True]["grouped"] > 50_000 and rows[True]["lost"] == 0, rows[True]
    # the race is live in this Beam: once a release no longer loses records here, drop beam_fixes.py
    assert rows[False]["lost"] > 0, rows[False]
