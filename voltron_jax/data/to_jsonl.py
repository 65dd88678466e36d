"""Raw corpus -> the JSONL records {index, id, text, split} that the data preparation reads.

    # raw JSON lines with a "text" field (C4's c4-train.*.json.gz, any .jsonl / .json.gz / .json.bz2 ...)
    python -m voltron_jax.data.to_jsonl --input='raw/c4-train.*.json.gz' --output=corpus \
        [--val_fraction=0.001 --docs_per_file=200000]
    # a TFDS dataset already in a data_dir (nothing is downloaded): its train / validation splits
    python -m voltron_jax.data.to_jsonl --input=tfds:c4/en:3.1.0 --tfds_data_dir=gs://B/tfds --output=corpus

Records are numbered in input order (files sorted by name, lines in file order; TFDS: train then
validation), which the preparation uses to break ties, so the same input always gives the same files.
`id` is the record's "id" or "url" when it has one, else '<file name>:<line>'. Raw input is split into
train / validation by a hash of the id (`--val_fraction`); TFDS keeps its own splits. Empty texts are
skipped. Output: <output>/records-00000.jsonl, ... (each written under a temporary name, then renamed),
local or on a bucket (etils paths). One process reads the input in order: for a corpus of hundreds of
GB, run one conversion per group of input files with disjoint --first_index ranges.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import os

from absl import flags
from etils import epath

from voltron_jax import cli
from voltron_jax.data import corpus


def _open_text(path: epath.Path):
    raw = path.open("rb")
    name = path.name
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8")
    if name.endswith(".bz2"):
        return io.TextIOWrapper(bz2.BZ2File(raw), encoding="utf-8")
    return io.TextIOWrapper(raw, encoding="utf-8")


def raw_records(pattern: str, val_fraction: float):
    """(id, text, split) of raw JSON lines matching `pattern`, files in name order."""
    files = sorted(epath.Path(os.path.dirname(pattern) or ".").glob(os.path.basename(pattern)))
    if not files:
        raise corpus.DataError(f"--input={pattern!r} matches no file; check the path or glob.")
    for f in files:
        with _open_text(f) as lines:
            for n, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    text = rec["text"]
                except (ValueError, KeyError, TypeError):
                    raise corpus.DataError(
                        f"{f}, line {n + 1}: not a JSON object with a 'text' field; give JSON lines "
                        '(e.g. C4\'s {"text": ..., "url": ...}).'
                    ) from None
                rid = str(rec.get("id") or rec.get("url") or f"{f.name}:{n}")
                yield rid, text, corpus.split_of(rid, val_fraction)


def tfds_records(name: str, data_dir: str):
    """(id, text, split) of a TFDS dataset's train and validation splits ('text' feature)."""
    import tensorflow_datasets as tfds  # lazy: TensorFlow, only for a TFDS source

    builder = tfds.builder(name, data_dir=data_dir or None)
    for split in ("train", "validation"):
        if split not in builder.info.splits:
            continue
        for n, ex in enumerate(builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator()):
            yield f"{split}:{n}", ex["text"].decode("utf-8"), split


def convert(records, output: str, docs_per_file: int = 200_000, first_index: int = 0) -> dict:
    """Write `records` ((id, text, split) tuples) as numbered JSONL files; returns counts."""
    out = epath.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    counts = dict(train=0, validation=0, files=0)
    buf: list[str] = []
    index = first_index

    def flush():
        path = out / f"records-{counts['files']:05d}.jsonl"
        tmp = out / f".{path.name}.tmp"
        tmp.write_text("".join(buf))
        tmp.replace(path)
        counts["files"] += 1
        buf.clear()

    for rid, text, split in records:
        if not text:
            continue
        buf.append(json.dumps(dict(index=index, id=rid, text=text, split=split)) + "\n")
        counts[split] += 1
        index += 1
        if len(buf) == docs_per_file:
            flush()
    if buf:
        flush()
    return counts


def main(argv) -> None:
    del argv
    src = _INPUT.value
    records = (
        tfds_records(src[5:], _TFDS_DIR.value) if src.startswith("tfds:") else raw_records(src, _VAL.value)
    )
    counts = convert(records, _OUTPUT.value, _PER_FILE.value, _FIRST.value)
    print(
        f"to_jsonl: {counts['train']} train + {counts['validation']} validation records in "
        f"{counts['files']} files under {_OUTPUT.value}"
    )


if __name__ == "__main__":
    _INPUT = flags.DEFINE_string("input", None, "Raw JSON lines (glob) or tfds:<name>[:<version>].")
    _OUTPUT = flags.DEFINE_string("output", None, "Folder for records-*.jsonl (local or bucket).")
    _VAL = flags.DEFINE_float("val_fraction", 0.001, "Raw input: share of records for validation.")
    _TFDS_DIR = flags.DEFINE_string("tfds_data_dir", "", "TFDS data_dir holding the dataset.")
    _PER_FILE = flags.DEFINE_integer("docs_per_file", 200_000, "Records per output file.")
    _FIRST = flags.DEFINE_integer("first_index", 0, "Index of the first record (parallel conversions).")
    flags.mark_flags_as_required(["input", "output"])
    cli.run(main, doc=__doc__)
