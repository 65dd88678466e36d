"""The data preparation (voltron_jax/data/prepare.py) as an Apache Beam pipeline, beyond one machine.

    # local, DirectRunner, the configured corpus (what the tests run):
    python -m voltron_jax.data.beam_pipeline --config=configs/tiny.py --workdir=runs/demo
    # JSONL records {"index", "id", "text", "split"} on a bucket, on Dataflow (Beam options after `--`):
    python -m voltron_jax.data.beam_pipeline --config=configs/voltron_13b.py --workdir=gs://B/run \\
        --input='gs://B/corpus/*.jsonl' -- --runner=DataflowRunner --project=P --region=R \\
        --temp_location=gs://B/tmp --setup_file=./setup.py \\
        --requirements_file=launch/dataflow_requirements.txt
    # only the token stores of a finished preparation (e.g. with another vocabulary), in parallel:
    python -m voltron_jax.data.beam_pipeline --config=configs/tiny.py --workdir=runs/demo --tokenize_only \\
        --config.data.vocab=sentencepiece
    # Flink / Spark: --runner=FlinkRunner --flink_master=HOST:8081 (or --runner=SparkRunner
    # --spark_master_url=spark://HOST:7077) with --environment_type=DOCKER or PROCESS and an SDK
    # environment that has this package installed (pip install -c constraints.txt -e '.[data]').

Graph (each step reuses the in-process function of prepare.py, so the outputs are byte-identical):
    records -> exact dedup (GroupBy text hash, lowest index)      -> kept train records
    kept -> Top.Smallest(fit_sample, key=sample_rank) -> fit_model -> the ClusterModel (one element)
    kept -> BatchElements -> embed + nearest centroid (model as a side input)   (map)
         -> GroupByKey(cluster) -> order_cluster + write the cluster's shard  (ICP per cluster, parallel)
    validation -> embed + assign -> one list sorted by index -> validation.jsonl
    all of the above -> finish: empty shards for empty clusters, stats, prepare.json
    finish -> plan (one worker: SentencePiece on a sample if asked, then the stores to write, each
        split into units: a cluster, or a bucket of the global shuffle; no per-document data)
        -> scan each prepared JSONL file (parallel) -> GroupByKey(store, unit) -> cut each unit's
        documents, in their final order, into ranges of ~--tokenize_range_mb of text (parallel; ranges.py)
        -> Reshuffle -> tokenise each range into an id file under <workdir>/data/tokenize-tmp (parallel)
        -> pack (one worker, I/O only, two integers per range: the range files in order into ArrayRecord
           shards, index last, then the range files are removed)
The fit runs on one worker over the sample only (c-BTM fits on one shard too); the kNN + traversal of a
cluster runs on one worker and needs that cluster's documents and vectors in memory (~N/k * (text +
4*D bytes)): raise data.n_clusters for a bigger corpus. The result does not depend on the runner: the
sample is a hash of ids, embeddings depend only on each document, groups are sorted by index before the
kNN, and ties are broken by index (icp.py). HNSW (data.icp.index='hnsw', or 'auto' above
data.icp.flat_max docs per cluster) is the exception: FAISS builds it with threads, nondeterministically.

Dependency note: apache-beam 2.77 caps protobuf below 7 and sentencepiece 0.2.3 needs a protobuf 7
runtime, so `import seqio` breaks once Beam is installed; sentencepiece is pinned to 0.2.0 (setup.py,
constraints.txt), which imports against protobuf 6. Only the plan, tokenise and pack steps import
seqio (its vocabularies); the graph's other steps import neither seqio nor TensorFlow.

Tokenising (~1-3 MB/s of text per core with SentencePiece) runs in parallel over the ranges; the pack
step only copies ids. No step holds per-document data of the whole corpus: a scan holds one cluster's
(file, offset, length) rows, a cut one unit's (a cluster, or ~1 GB of text of the global shuffle).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags
from etils import epath

from voltron_jax import cli
from voltron_jax.config import validate
from voltron_jax.data import beam_fixes, cbtm, embed, orderings, prepare, ranges
from voltron_jax.data.corpus import DataError


def _parse(item: tuple[str, bytes]) -> dict:
    """(file name, raw line) -> record; a line that is not UTF-8 JSON fails naming its file."""
    name, line = item
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        near = line[max(e.start - 8, 0) : e.start + 8]
        raise DataError(
            f"{name} is not UTF-8 text (byte {e.start} of a line: {near!r}); "
            "re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None
    except ValueError as e:
        raise DataError(f"{name}: a line is not a JSON record {{index, id, text, split}} ({e}).") from None


def check_input(pattern: str) -> list[str]:
    """The files matching `pattern` (local or bucket); DataError when none match or all are empty."""
    from apache_beam.io.filesystems import FileSystems  # lazy: the optional extra [data] (Apache Beam)

    found = [m for r in FileSystems.match([pattern]) for m in r.metadata_list]
    if not found:
        raise DataError(f"--input={pattern!r} matches no file; check the path or glob.")
    if not any(m.size_in_bytes for m in found):
        raise DataError(
            f"--input={pattern!r}: the {len(found)} matching file(s) are empty; give JSONL records "
            "{index, id, text, split}, one per line."
        )
    return [m.path for m in found]


def _min_index(records) -> dict:
    return min(records, key=lambda r: r["index"])


def _embed_assign(batch: list[dict], model: tuple) -> list:
    """Batch of records -> [(cluster, (record, embedding))] with the fitted model (a side input)."""
    m = model[0]
    x = m.embedder.transform([r["text"] for r in batch])  # [B, D]
    labels = cbtm.assign(x, m.centroids)
    return [(int(c), (r, v)) for r, c, v in zip(batch, labels, x, strict=True)]


def _order_and_write(kv, s: dict, out: str) -> dict:
    cluster, items = kv
    items = sorted(items, key=lambda it: it[0]["index"])
    x = np.stack([v for _, v in items]).astype(np.float32)  # [N, D]
    ordered, stats = prepare.order_cluster(cluster, [r for r, _ in items], x, s["icp"])
    k = s["n_clusters"]
    prepare.write_jsonl(prepare.shard_path(epath.Path(out), cluster, k), ordered, ("index", "id", "text"))
    return stats


def _write_validation(records: list[dict], out: str, k: int) -> list[int]:
    records = sorted(records, key=lambda r: r["index"])
    prepare.write_jsonl(epath.Path(out) / prepare.VALIDATION, records, ("index", "id", "text", "cluster"))
    return np.bincount([r["cluster"] for r in records], minlength=k).astype(int).tolist()


def _save_model(model: tuple, out: str) -> list[int]:
    model[0].save(out)
    return model[1]


def check_delivered(stats: list, val_sizes: list, counts: dict) -> None:
    """DataError unless every kept train document reached the ICP step and every validation document its
    file: a runner that loses elements must not leave a preparation marked complete. (Seen: Beam's
    DirectRunner in multi_processing mode, 2 workers, 1 GB corpus, loaded 2-core host: twice of three
    runs ~29k and 3,553 of the 316,588 train documents never reached the ICP step; cause: a race in
    Beam's runner -> worker data stream, fixed here by beam_fixes.install(); docs/results.md.)"""
    n_train, n_val = sum(st["n_in"] for st in stats), int(sum(val_sizes))
    if n_train != counts["kept"] or n_val != counts["validation"]:
        raise DataError(
            f"the Beam runner delivered {n_train} of the {counts['kept']} kept train documents to the ICP "
            f"step and {n_val} of the {counts['validation']} validation documents to validation.jsonl; "
            "the preparation is not marked complete. Run it again (with another runner, or DirectRunner's "
            "default in_memory mode, if it repeats)."
        )


def _finish(
    _, s: dict, data_cfg, out: str, stats: list, val_sizes: list, fit_sizes: list, counts: dict
) -> dict:
    out_p = epath.Path(out)
    k = s["n_clusters"]
    check_delivered(stats, val_sizes, counts)
    present = {st["cluster"] for st in stats}
    for j in range(k):
        if j not in present:  # GroupByKey emits nothing for an empty cluster; keep k shards
            prepare.write_jsonl(prepare.shard_path(out_p, j, k), [], ("index", "id", "text"))
            stats = stats + [prepare.order_cluster(j, [], np.zeros((0, 1), np.float32), s["icp"])[1]]
    report = prepare.summarize(
        stats,
        n_train=counts["train"],
        n_validation=counts["validation"],
        n_exact_dup=counts["train"] - counts["kept"],
        fit_sizes=fit_sizes,
        val_sizes=val_sizes,
    )
    report["seconds"] = dict(icp_parts=prepare.sum_seconds(stats))
    prepare.write_marker(out_p, prepare.fingerprint(s, counts["digest"]), s, report)
    return report


_VOCABS: dict = {}


def _vocab(data_cfg, out: str):
    """The stores' vocabulary, once per worker process (the plan step trains SentencePiece if asked)."""
    key = (out, data_cfg.to_json())
    if key not in _VOCABS:
        _VOCABS[key] = prepare.prepared_vocab(data_cfg, epath.Path(out))
    return _VOCABS[key]


def _plan_stores(_, data_cfg, out: str) -> list[dict]:
    return ranges.plan_stores(data_cfg, out, _vocab(data_cfg, out))


def _cut(kv, range_bytes: int, stores: list[dict]) -> dict:
    (name, unit), parts = kv
    st = next(s for s in stores if s["store"] == name)
    cut = ranges.cut_unit(st, unit, list(parts), range_bytes)
    return dict(cut, tasks=[(t, st["tmp"]) for t in cut["tasks"]])


def _tokenize_range(item: tuple, data_cfg, out: str) -> dict:
    task, tmp = item
    return ranges.tokenize_range(task, tmp, _vocab(data_cfg, out), out)


def _pack(stores: list[dict], data_cfg, out: str, cuts: list[dict], done: list[dict]) -> int:
    for st in stores:  # the same token stores, bytes and all, as prepare.tokenize in process
        ranges.pack(ranges.assemble(st, cuts), _vocab(data_cfg, out), done)
    return len(stores)


def _counts(records, train, val, kept):
    """PCollection of (name, value): document counts and the order-free digest of the input records."""
    import apache_beam as beam  # lazy: the optional extra [data] (Apache Beam)

    def count(pcoll, name):
        return (
            pcoll
            | f"Count_{name}" >> beam.combiners.Count.Globally()
            | f"Key_{name}" >> beam.Map(lambda n: (name, n))
        )

    digest = (
        records
        | "Digest" >> beam.Map(prepare.record_digest)
        | "SumDigest" >> beam.CombineGlobally(sum)
        | "KeyDigest" >> beam.Map(lambda n: ("digest", n))
    )
    return [count(train, "train"), count(val, "validation"), count(kept, "kept"), digest] | beam.Flatten()


def build(p, records, s: dict, out: str, data_cfg, range_bytes: int = ranges.RANGE_BYTES) -> None:
    """Add the preparation to pipeline `p`, reading PCollection `records` and writing under `out`."""
    import apache_beam as beam  # lazy: the optional extra [data] (Apache Beam)
    from apache_beam.pvalue import (  # lazy: the optional extra [data] (Apache Beam)
        AsDict,
        AsList,
        AsSingleton,
    )

    train = records | "Train" >> beam.Filter(lambda r: r["split"] == "train")
    val = records | "Validation" >> beam.Filter(lambda r: r["split"] != "train")
    kept = (
        train
        | "KeyByText" >> beam.Map(lambda r: (prepare.text_key(r), r))
        | "ExactDedup" >> beam.CombinePerKey(_min_index)
        | "Kept" >> beam.Values()
    )
    seed, n_fit = s["embed"]["seed"], s["embed"]["fit_sample"]
    sample = kept | "Sample" >> beam.combiners.Top.Smallest(
        n_fit, key=lambda r: embed.sample_rank(r["id"], seed)
    )
    model = AsSingleton(sample | "Fit" >> beam.Map(prepare.fit_model, s))

    def embed_assign(pcoll, name):
        batches = pcoll | f"Batch{name}" >> beam.BatchElements(min_batch_size=64, max_batch_size=4096)
        return batches | f"EmbedAssign{name}" >> beam.FlatMap(_embed_assign, model)

    stats = (
        embed_assign(kept, "Train")
        | "ByCluster" >> beam.GroupByKey()
        | "OrderAndWrite" >> beam.Map(_order_and_write, s, out)
    )
    val_sizes = (
        embed_assign(val, "Val")
        | "WithCluster" >> beam.Map(lambda kv: dict(kv[1][0], cluster=kv[0]))
        | "ValList" >> beam.combiners.ToList()
        | "WriteVal" >> beam.Map(_write_validation, out, s["n_clusters"])
    )
    fit_sizes = model.pvalue | "SaveModel" >> beam.Map(_save_model, out)
    sides = (
        AsList(stats),
        AsSingleton(val_sizes),
        AsSingleton(fit_sizes),
        AsDict(_counts(records, train, val, kept)),
    )
    report = p | "Once" >> beam.Create([None]) | "Finish" >> beam.Map(_finish, s, data_cfg, out, *sides)
    build_tokenize(report, data_cfg, out, range_bytes)


def build_tokenize(after, data_cfg, out: str, range_bytes: int = ranges.RANGE_BYTES) -> None:
    """Add plan -> tokenise ranges (parallel) -> pack, started by PCollection `after` (one element) once
    <out>/prepare.json exists: the token stores data.ordering reads that are not complete yet."""
    import apache_beam as beam  # lazy: the optional extra [data] (Apache Beam)
    from apache_beam.pvalue import AsList, AsSingleton  # lazy: the optional extra [data] (Apache Beam)

    plans = after | "Plan" >> beam.Map(_plan_stores, data_cfg, out)  # stores and their units, no documents
    cuts = (
        plans
        | "ScanJobs" >> beam.FlatMap(ranges.scan_jobs)  # one per prepared JSONL file
        | "SpreadScans" >> beam.Reshuffle()
        | "Scan" >> beam.FlatMap(ranges.scan, out)  # ((store, unit), that file's part of the unit)
        | "ByUnit" >> beam.GroupByKey()
        | "Cut" >> beam.Map(_cut, range_bytes, AsSingleton(plans))  # one unit's documents at a time
    )
    done = (
        cuts
        | "Ranges" >> beam.FlatMap(lambda cut: cut["tasks"])
        | "Spread" >> beam.Reshuffle()
        | "Tokenize" >> beam.Map(_tokenize_range, data_cfg, out)
    )
    summaries = cuts | "Summaries" >> beam.Map(lambda cut: {k: cut[k] for k in ("store", "unit", "ranges")})
    _ = plans | "Pack" >> beam.Map(_pack, data_cfg, out, AsList(summaries), AsList(done))


def run(
    config,
    workdir,
    *,
    records: list[dict] | None = None,
    input_pattern: str = "",
    beam_args: list[str] | None = None,
    range_bytes: int = ranges.RANGE_BYTES,
) -> dict:
    """Run the Beam pipeline into <workdir>/data; returns the stats written to prepare.json.

    Reads `records` (in memory, beam.Create) or the JSONL files matching `input_pattern`, or else the
    configured corpus. Runs the DirectRunner unless `beam_args` name another runner. The token stores
    are tokenised in ranges of about `range_bytes` of text (ranges.py), in parallel.
    """
    import apache_beam as beam  # lazy: the optional extra [data] (Apache Beam)
    from apache_beam.coders import BytesCoder  # lazy: the optional extra [data] (Apache Beam)
    from apache_beam.options.pipeline_options import PipelineOptions  # lazy: extra [data]

    out = epath.Path(workdir) / "data"
    s = prepare.settings(config)
    if input_pattern:
        check_input(input_pattern)  # before anything under <workdir>/data is cleared
    else:
        records = records if records is not None else prepare.corpus_records(config.data)
        prepare.check_records(records, config.data.n_clusters, "the records given")
    prepare.clear(out)
    beam_fixes.install()  # the DirectRunner's gRPC workers lost data without it (beam_fixes.py)
    options = PipelineOptions(beam_args or ["--runner=DirectRunner"])
    with beam.Pipeline(options=options) as p:
        if input_pattern:
            read = beam.io.ReadFromTextWithFilename(input_pattern, coder=BytesCoder())
            recs = p | "Read" >> read | "Parse" >> beam.Map(_parse)
        else:
            recs = p | "Create" >> beam.Create(records)
        build(p, recs, s, str(out), config.data, range_bytes)
    return prepare.read_marker(out)["stats"]


def tokenize(config, workdir, *, beam_args: list[str] | None = None, range_bytes: int = ranges.RANGE_BYTES):
    """Only the token stores of a finished preparation in <workdir>/data (e.g. for another vocabulary:
    the documents, clusters and ICP order are reused), tokenised in parallel ranges; returns
    {store: folder}. The same bytes as `prepare.tokenize` in process."""
    import apache_beam as beam  # lazy: the optional extra [data] (Apache Beam)
    from apache_beam.options.pipeline_options import PipelineOptions  # lazy: extra [data]

    out = epath.Path(workdir) / "data"
    if prepare.read_marker(out) is None:
        raise DataError(f"{out} holds no finished preparation (no {prepare.MARKER}); prepare it first.")
    beam_fixes.install()  # the DirectRunner's gRPC workers lost data without it (beam_fixes.py)
    with beam.Pipeline(options=PipelineOptions(beam_args or ["--runner=DirectRunner"])) as p:
        build_tokenize(p | "Once" >> beam.Create([None]), config.data, str(out), range_bytes)
    vocab = prepare.prepared_vocab(config.data, out)
    base = prepare.token_dir(out, vocab, config.data)
    stores = (*orderings.train_stores(config.data.ordering), *prepare.VALIDATION_STORES)
    return {st: os.fspath(base / prepare.store_name(st, config.data)) for st in stores}


def main(argv) -> None:

    config = validate(cli.config_from_argv(_CONFIG.value, cli.overrides()))
    range_bytes = int(_RANGE_MB.value * (1 << 20))
    if _TOKENIZE_ONLY.value:
        paths = tokenize(config, _WORKDIR.value, beam_args=list(argv[1:]) or None, range_bytes=range_bytes)
        print("\n".join(f"token store {k}: {v}" for k, v in paths.items()))
        return
    stats = run(
        config,
        _WORKDIR.value,
        input_pattern=_INPUT.value,
        beam_args=list(argv[1:]) or None,
        range_bytes=range_bytes,
    )
    print(prepare.format_report(stats))


if __name__ == "__main__":
    _CONFIG = flags.DEFINE_string("config", None, "Config file (configs/*.py[:variant]).")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; outputs go to <workdir>/data.")
    _INPUT = flags.DEFINE_string(
        "input", "", "JSONL records {index,id,text,split} (glob); empty: data.corpus."
    )
    _RANGE_MB = flags.DEFINE_float(
        "tokenize_range_mb", ranges.RANGE_BYTES >> 20, "Text per tokenise task (MB): a few per worker."
    )
    _TOKENIZE_ONLY = flags.DEFINE_bool(
        "tokenize_only",
        False,
        "Only the token stores of the finished preparation in <workdir>/data "
        "(e.g. another data.vocab), tokenised in parallel; the documents and ICP order are reused.",
    )
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(
        main, doc=__doc__, preload_modules=("apache_beam",)
    )  # no TensorFlow here (protobuf pins, see the module docstring)
