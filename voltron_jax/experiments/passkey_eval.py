"""Passkey retrieval scoring: teacher-forced accuracy by length x depth, and the experiment.

The data (examples, the train iterator behind mixture 'passkey') is voltron_jax/data/passkey.py; this
module scores a model on it (Infini-attention, arXiv 2404.07143 §4.2, docs/specs/techniques-a.md 2.3).
Accuracy is teacher-forced: argmax at each answer position given the true prefix (a digit is right if the
argmax is the right byte; a key is right if all 5 are).

    python -m voltron_jax.experiments.passkey_eval --config=configs/passkey_tiny.py --out=runs/passkey

trains the configured model (its recipe: a phase with mixture='passkey') through the one train loop
(`train.run`: checkpoints, resume, metrics in <out>/<label>/), then its segment-local twin
(model.infini.rule='none': same architecture, memory read and write off) on the same passkey batches for
the same steps, loads each final checkpoint and prints both accuracy tables.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import flags

from voltron_jax import cli, recipe, train
from voltron_jax.data.passkey import (  # noqa: F401  (re-exported: the data API next to its scoring)
    DEPTHS,
    DIGITS,
    FILLER,
    KEY,
    OFFSET,
    QUESTION,
    PasskeyIterator,
    encode,
    make_batch,
    make_example,
    min_length,
)
from voltron_jax.inference import api
from voltron_jax.run import report
from voltron_jax.run import workdir as workdir_lib

# --------------------------------------------------------------------------------------------- evaluation


def evaluate(
    logits_fn, lengths, depths=tuple(DEPTHS), n_examples: int = 32, batch_size: int = 16, seed: int = 1234
) -> dict[tuple[int, str], dict[str, float]]:
    """Teacher-forced accuracy per (length, depth). `logits_fn(inputs [B,L] int32) -> [B,L,V]`.

    Returns {(length, depth): {'key': exact-key accuracy, 'digit': per-digit accuracy}}; the same keys
    (drawn from `seed`) are used at every cell."""
    keys = np.random.default_rng(seed).integers(0, 10**DIGITS, n_examples)
    out = {}
    for length in lengths:
        for name in depths:
            right = []
            for i in range(0, n_examples, batch_size):
                ks = keys[i : i + batch_size]
                batch = make_batch(length, [DEPTHS[name]] * len(ks), ks)
                pred = np.asarray(logits_fn(batch["inputs"]))[:, -DIGITS:].argmax(-1)  # [B,5]
                right.append(pred == batch["targets"][:, -DIGITS:])
            right = np.concatenate(right)
            out[(length, name)] = dict(key=float(right.all(1).mean()), digit=float(right.mean()))
    return out


def format_table(results: dict, segment_len: int, title: str = "") -> str:
    """Markdown table: rows = lengths (tokens / segments), columns = depths; 'key% (digit%)'."""
    lengths = sorted({n for n, _ in results})
    depths = [d for d in DEPTHS if any((n, d) in results for n in lengths)]
    lines = ([f"**{title}**", ""] if title else []) + [
        "| length (tokens / segments) | " + " | ".join(depths) + " |",
        "| --- |" + " --- |" * len(depths),
    ]
    for n in lengths:
        cells = [f"{100 * results[n, d]['key']:.0f}% ({100 * results[n, d]['digit']:.0f}%)" for d in depths]
        lines.append(f"| {n} / {n // segment_len} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- experiment


def train_and_evaluate(
    config, workdir: str, eval_segments=(4, 8, 16), n_examples: int = 32
) -> tuple[dict, dict]:
    """Fine-tune `config`'s model through the train loop (`train.run(config, workdir)`: its recipe's
    phases, checkpoints, resume; a finished run is only re-evaluated), load the final checkpoint and
    evaluate it. Returns (results, {'final_loss': last logged train loss, 'seconds', 'gate'})."""

    t0 = time.time()
    train.run(config, workdir)
    seconds = time.time() - t0
    lm = api.load(workdir)
    forward = jax.jit(lambda p, x: lm.train_model.apply({"params": p}, x))
    lengths = [s * config.model.infini.segment_len for s in eval_segments]
    results = evaluate(lambda x: forward(lm.params, x), lengths, n_examples=n_examples)
    betas = [np.asarray(x).ravel() for x in _find(lm.params, "beta")]
    last = recipe.phase_order(config.recipe)[-1]
    folder = workdir_lib.run_dirs(workdir_lib.path(workdir))[last]
    losses = [r["ce"] for r in report.read_metrics(folder) if r.get("kind") == "train" and "ce" in r]
    info = dict(
        final_loss=float(losses[-1]) if losses else float("nan"),
        seconds=seconds,
        gate=[float(x) for x in 1 / (1 + np.exp(-np.concatenate(betas)))] if betas else [],
    )
    return results, info


def _find(tree, name: str) -> list:
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == name] + [x for v in tree.values() for x in _find(v, name)]
    return []


def main(argv) -> None:
    del argv

    f = flags.FLAGS
    config = cli.config_from_argv(_CONFIG.value, cli.overrides())
    os.makedirs(f.out, exist_ok=True)
    segs = [int(s) for s in f.eval_segments.split(",")]
    n = config.model.infini.segment_len
    steps = config.recipe[recipe.phase_order(config.recipe)[0]].steps
    lines = [
        f"passkey: {config.model.n_layers} layers, d={config.model.d_model}, segment {n}, fine-tuned "
        f"{steps} steps on {config.data.seq_len}-token inputs, {f.eval_examples} keys per cell; "
        "cells: key accuracy (per-digit accuracy)",
        "",
    ]
    runs = [("infini", config.model.infini.rule)] + ([("local twin", "none")] if f.twin else [])
    saved = {}
    for label, rule in runs:
        c = config.copy_and_resolve_references()
        c.model.infini.rule = rule
        print(f"== {label} (model.infini.rule={rule})", flush=True)
        workdir = os.path.join(f.out, label.replace(" ", "_"))  # the run: checkpoints, metrics, resume
        results, info = train_and_evaluate(c, workdir, segs, f.eval_examples)
        title = f"{label} (rule={rule}): final answer loss {info['final_loss']:.3f}, {info['seconds']:.0f} s"
        lines += [format_table(results, n, title), ""]
        saved[label] = dict(rule=rule, info=info, results={f"{k[0]}/{k[1]}": v for k, v in results.items()})
        print(lines[-2], flush=True)

    workdir_lib.write_json(os.path.join(f.out, "passkey.json"), saved, sort_keys=False)
    workdir_lib.write_text(os.path.join(f.out, "passkey.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


_CONFIG = None
if __name__ == "__main__":
    _CONFIG = flags.DEFINE_string("config", None, "configs/passkey_tiny.py")
    flags.DEFINE_string("out", "runs/passkey", "Folder for passkey.json and passkey.md.")
    flags.DEFINE_string("eval_segments", "4,8,16", "Evaluation lengths in segments.")
    flags.DEFINE_integer("eval_examples", 32, "Keys per (length, depth) cell.")
    flags.DEFINE_bool("twin", True, "Also train and evaluate the segment-local twin (rule='none').")
    flags.mark_flags_as_required(["config"])
    cli.run(main, doc=__doc__, preload_modules=("tensorflow",))
