"""Does Beam's DirectRunner deliver every element? A minimal repro of the document loss, Beam only.

    # the faulty piece alone, in seconds: the runner's time-flushed data stream, with and without the fix
    python benchmarks/beam_element_loss.py --stream_only
    # the preparation graph's shape with cheap steps (~3 min and ~10 GB per run at this size):
    python benchmarks/beam_element_loss.py --docs=320000 --doc_bytes=3000 --sleep_us_per_doc=300 \
        --runs=2 --mode=multi_processing --workers=2 [--fix] [--trace] [--json=out.jsonl]
    # the same race on a small input, the runner's flush period cut from 1 s to 1 ms (~30 s, ~3 GB):
    python benchmarks/beam_element_loss.py --docs=60000 --doc_bytes=2500 --flush_ms=1 [--fix]

Graph: synthetic records {index, id, text, split} (1% validation) go through the shape of
voltron_jax/data/beam_pipeline.py's graph before the tokenisation, with cheap stand-ins for the
expensive steps: exact dedup (sha1 of the text -> CombinePerKey(lowest index)) -> a fit sample
(Top.Smallest) -> a "model" side input -> BatchElements -> assign each record a cluster with the model
(FlatMap with the side input, `--sleep_us_per_doc` standing in for the embedding's cost) ->
GroupByKey(cluster) -> count each group. Beam Metrics counters count the elements into and out of
BatchElements, the batches, the elements into the assign step and out of the groups; Count.Globally and
the group sizes count the data itself. One JSON row per run; `lost` = kept - grouped. `--trace` logs,
in the runner process, the elements each bundle's input holds when the runner sends it to a worker
(and with `BEAM_LOSS_TRACE=1 PYTHONPATH=benchmarks/beam_loss_hook`, what the workers received; see
docs/results.md). `--fix` installs voltron_jax.data.beam_fixes first; without it no project code is
imported.

Stream only: Beam's `TimeBasedBufferingClosableOutputStream` (what the runner writes each bundle's
input to, flushed every second by a thread) with a flush callback that takes 0.2 s to send, written
1 kB at a time for ~0.5 s: the bytes written minus the bytes the callbacks received.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import AsDict, AsList, AsSingleton
from apache_beam.runners.portability.fn_api_runner import execution, fn_runner, worker_handlers
from apache_beam.runners.worker import data_plane

WORDS = [f"w{i}" for i in range(5000)]


def make_records(shard: int, per_shard: int, doc_bytes: int, n_dup: int):
    rng = np.random.default_rng(shard)
    for j in range(per_shard):
        i = shard * per_shard + j
        n = max(1, int(rng.lognormal(np.log(doc_bytes / 6), 0.5)))
        text = " ".join(WORDS[k] for k in rng.integers(0, len(WORDS), n))
        if i % 1000 < n_dup:  # some exact duplicates, as a real corpus has
            text = f"duplicate {i % 7}"
        yield dict(index=i, id=f"doc{i}", text=text, split="validation" if i % 100 == 0 else "train")


def text_key(r):
    return hashlib.sha1(r["text"].encode()).hexdigest()


def rank(r):
    return hashlib.blake2b(r["id"].encode(), digest_size=8).digest()


def build(p, args):

    per = args.docs // args.shards
    records = (
        p
        | "Shards" >> beam.Create(list(range(args.shards)))
        | "Spread" >> beam.Reshuffle()
        | "Make" >> beam.FlatMap(make_records, per, args.doc_bytes, args.dups)
    )
    train = records | "Train" >> beam.Filter(lambda r: r["split"] == "train")
    kept = (
        train
        | "KeyByText" >> beam.Map(lambda r: (text_key(r), r))
        | "ExactDedup" >> beam.CombinePerKey(lambda rs: min(rs, key=lambda r: r["index"]))
        | "Kept" >> beam.Values()
    )
    sample = kept | "Sample" >> beam.combiners.Top.Smallest(args.sample, key=rank)

    def fit(rs):
        rng = np.random.default_rng(0)
        return rng.standard_normal((args.clusters, args.dim)).astype(np.float32)

    model = AsSingleton(sample | "Fit" >> beam.Map(fit))
    into_assign = Metrics.counter("loss", "into_assign")
    out_assign = Metrics.counter("loss", "out_of_assign")
    into_group = Metrics.counter("loss", "values_out_of_group")
    into_batch = Metrics.counter("loss", "into_batch")
    out_batch = Metrics.counter("loss", "out_of_batch")
    batches_out = Metrics.counter("loss", "batches_out_of_batch")
    batches_in = Metrics.counter("loss", "batches_into_assign")

    def tally(x, counter, n):
        counter.inc(n(x))
        return x

    def assign(batch, centroids):
        into_assign.inc(len(batch))
        batches_in.inc(1)
        time.sleep(args.sleep_us_per_doc * 1e-6 * len(batch))  # the embedding's cost, roughly
        out = []
        for r in batch:
            h = int.from_bytes(hashlib.sha1(r["id"].encode()).digest()[:8], "little")
            v = np.random.default_rng(h).standard_normal(args.dim).astype(np.float32)
            out.append((int(np.argmax(centroids @ v)), (r, v)))
        out_assign.inc(len(out))
        return out

    def count_group(kv):
        k, items = kv
        n = sum(1 for _ in items)
        into_group.inc(n)
        return dict(cluster=k, n_in=n)

    stats = (
        kept
        | "IntoBatch" >> beam.Map(tally, into_batch, lambda _: 1)
        | "Batch" >> beam.BatchElements(min_batch_size=64, max_batch_size=4096)
        | "OutOfBatch" >> beam.Map(tally, out_batch, len)
        | "BatchesOut" >> beam.Map(tally, batches_out, lambda _: 1)
        | "Assign" >> beam.FlatMap(assign, model)
        | "ByCluster" >> beam.GroupByKey()
        | "CountGroup" >> beam.Map(count_group)
    )

    def count(pc, name):
        return (
            pc
            | f"Count{name}" >> beam.combiners.Count.Globally()
            | f"Key{name}" >> beam.Map(lambda n: (name, n))
        )

    counts = [count(records, "records"), count(train, "train"), count(kept, "kept")] | beam.Flatten()

    def finish(_, stats, counts):
        return dict(counts, grouped=sum(s["n_in"] for s in stats), groups=sorted(s["n_in"] for s in stats))

    return p | "Once" >> beam.Create([None]) | "Finish" >> beam.Map(finish, AsList(stats), AsDict(counts))


def trace_runner_buffers() -> None:
    """In the runner process: log, per bundle sent to a worker, the elements of each input part and, per
    stage input buffer, the elements appended to it against those handed out by partition()."""

    log = logging.getLogger("trace")
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO)
    logging.getLogger("apache_beam.runners.worker.data_plane").setLevel(logging.INFO)

    def n_elems(buf, chunks):
        return sum(len(list(buf._coder_impl.decode_all(c))) for c in chunks)

    lb = execution.ListBuffer
    orig = dict(append=lb.append, partition=lb.partition, copy=lb.copy, extend=lb.extend)
    count = lambda self: getattr(self, "_n_appended", 0)

    def append(self, element):
        self._n_appended = count(self) + len(list(self._coder_impl.decode_all(element)))
        return orig["append"](self, element)

    def copy(self):
        new = orig["copy"](self)
        new._n_appended = count(self)
        return new

    def extend(self, extra):
        self._n_appended = count(self) + count(extra)
        return orig["extend"](self, extra)

    def partition(self, n):
        parts = orig["partition"](self, n)
        if type(self._coder_impl).__name__ != "CoderImpl":
            got = [n_elems(self, p) for p in parts]
            level = logging.WARNING if sum(got) != count(self) else logging.INFO
            log.log(level, "partition(%d) of buffer %x: appended %d, parts %s", n, id(self), count(self), got)
        return parts

    lb.append, lb.partition, lb.copy, lb.extend = append, partition, copy, extend
    orig_send = fn_runner.BundleManager._send_input_to_worker

    def send(self, process_bundle_id, read_transform_id, byte_streams):
        impl = self.bundle_context_manager.get_input_coder_impl(read_transform_id)
        vals = [wv.value for b in byte_streams or [] for wv in impl.decode_all(b)]
        inner = sum(len(v) for v in vals if isinstance(v, list))
        log.info(
            "%s to %s: %s gets %d elements (%d inside lists)",
            process_bundle_id,
            self._worker_handler.worker_id,
            read_transform_id,
            len(vals),
            inner,
        )
        return orig_send(self, process_bundle_id, read_transform_id, byte_streams)

    fn_runner.BundleManager._send_input_to_worker = send


def run_once(args) -> dict:

    opts = [
        "--runner=DirectRunner",
        f"--direct_running_mode={args.mode}",
        f"--direct_num_workers={args.workers}",
    ]
    t0 = time.time()
    p = beam.Pipeline(options=PipelineOptions(opts))
    out = build(p, args)
    path = os.path.join(tempfile.mkdtemp(prefix="beam_loss_"), "finish.json")

    def write(d):
        with open(path, "w") as f:
            json.dump(d, f)

    _ = out | "Write" >> beam.Map(write)
    res = p.run()
    res.wait_until_finish()
    metrics = {m.key.metric.name: m.committed for m in res.metrics().query()["counters"]}
    with open(path) as f:
        finish = json.load(f)
    row = dict(mode=args.mode, workers=args.workers, docs=args.docs, doc_bytes=args.doc_bytes, fix=args.fix)
    row.update(finish, metrics=metrics, seconds=round(time.time() - t0, 1))
    row["lost"] = finish["kept"] - finish["grouped"]
    return row


def stream_only(fix: bool) -> dict:
    """The runner's time-flushed stream alone: bytes written vs bytes the flush/close callbacks got."""
    sent = []

    def slow_send(data: bytes) -> None:  # building the message, waiting on a full send queue
        if data:
            time.sleep(0.2)
            sent.append(len(data))

    s = data_plane.TimeBasedBufferingClosableOutputStream(
        close_callback=lambda data: sent.append(len(data)),
        flush_callback=slow_send,
        time_flush_threshold_ms=50,
    )
    written = 0
    for _ in range(100):
        s.write(b"x" * 1000)
        written += 1000
        time.sleep(0.005)
    s.close()
    return dict(stream_only=True, fix=fix, written=written, delivered=sum(sent), lost=written - sum(sent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--doc_bytes", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--dups", type=int, default=2, help="exact duplicates per 1000 documents")
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--sample", type=int, default=2000)
    ap.add_argument("--mode", default="multi_processing")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sleep_us_per_doc", type=float, default=0.0, help="stand-in for the embed cost")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", default="")
    ap.add_argument("--trace", action="store_true", help="log the runner's buffers (slow)")
    ap.add_argument("--fix", action="store_true", help="voltron_jax.data.beam_fixes.install() first")
    ap.add_argument("--flush_ms", type=int, default=0, help="the runner's stream flush period (Beam: 1000)")
    ap.add_argument(
        "--stream_only", action="store_true", help="only the faulty stream, without then with --fix"
    )
    args = ap.parse_args()
    if args.stream_only:
        print("ROW " + json.dumps(stream_only(False)), flush=True)
        args.fix = True
    if args.fix:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from voltron_jax.data import beam_fixes  # lazy: only with --fix (this script needs no project code)

        beam_fixes.install()
    if args.stream_only:
        print("ROW " + json.dumps(stream_only(True)), flush=True)
        return
    if args.trace:
        trace_runner_buffers()
    if args.flush_ms:  # a shorter period makes the race likely on small inputs
        worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = args.flush_ms
    for _ in range(args.runs):
        row = run_once(args)
        print("ROW " + json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
