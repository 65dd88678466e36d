"""Re-evaluate finished runs: the final checkpoint of each run's last phase on N validation batches.

    python -m voltron_jax.experiments.evaluate --workdir=runs/a --workdir=runs/b [--batches=32] \
        [--json=out.jsonl] [--per_batch]

The loop evaluates on `train.eval_batches` batches, which is cheap but noisy and depends on the code
version that ran; comparing runs (seeds, learning rates, techniques) on one larger fixed validation set
taken by this code is the fair read-out. Each workdir's `config.json` (written by the loop) gives the
model and data; the set is `data.pipeline.make_eval_batches(config, 'pretrain', N)`: N fixed batches of
the pretraining mixture's validation split, spread over the whole split. Prints one line per run.

`--per_batch` adds `batches` {fingerprint: loss} to each JSON line: every batch's mean loss keyed by a
hash of its tokens (`batch_fingerprint`), so two runs' scores pair per batch on provably the same tokens
(the seed + evaluation noise interval of voltron_jax/experiments/claims.py), and `distinct_rows`, the
number of different rows among them (a small validation split repeats rows; see make_eval_batches).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from absl import flags
from etils import epath

from voltron_jax import cli, train
from voltron_jax.data import tasks
from voltron_jax.errors import VoltronError
from voltron_jax.experiments.claims import batch_fingerprint
from voltron_jax.inference.api import config_from_meta
from voltron_jax.run import workdir as workdir_lib

_WORKDIRS = flags.DEFINE_multi_string("workdir", [], "A finished run's workdir (repeatable).")
_BATCHES = flags.DEFINE_integer("batches", 32, "Validation batches (of data.batch_size x seq_len).")
_JSON = flags.DEFINE_string("json", "", "Append one JSON line per run to this file.")
_PER_BATCH = flags.DEFINE_bool("per_batch", False, "Also record each batch's loss keyed by its tokens' hash.")
_TASKS = flags.DEFINE_list(
    "tasks", [], "lm-evaluation-harness tasks (comma-separated) instead of perplexity."
)
_FEWSHOT = flags.DEFINE_integer(
    "num_fewshot", None, "Harness: examples in each prompt (task default if unset)."
)
_LIMIT = flags.DEFINE_float("limit", None, "Harness: documents per task (a count, or a fraction if < 1).")
_INCLUDE = flags.DEFINE_string("include_path", "", "Harness: a folder of extra (local) task YAMLs.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Harness: requests per forward pass.")
_MAXLEN = flags.DEFINE_integer("max_length", None, "Harness: context tokens (default: the run's seq_len).")


class EvalError(VoltronError, ValueError):
    pass


def row_fingerprints(batch: dict) -> set[bytes]:
    return {np.ascontiguousarray(r).tobytes() for r in np.asarray(batch["inputs"])}


def evaluate_run(workdir: str, n_batches: int, per_batch: bool = False) -> dict:
    """{'workdir', 'phase', 'step', 'loss', 'perplexity', 'tokens'} of the run's last phase; with
    `per_batch` also {'batches': {fingerprint: loss}, 'distinct_rows'} (module docstring)."""
    from voltron_jax.data import pipeline  # lazy: the data stack

    root = epath.Path(workdir)
    if not workdir_lib.config_file(root).exists():
        raise EvalError(f"{workdir}: no config.json; pass the workdir of a run started by voltron_jax.main.")
    config = config_from_meta(json.loads(workdir_lib.config_file(root).read_text()))
    if n_batches < 1:
        raise EvalError(f"--batches={n_batches}: evaluate on at least one batch.")
    if train.needs_prepare(config):
        from voltron_jax.data import prepare  # lazy: the data stack

        prepare.prepare(config, root)  # registers the prepared tasks; reuses <workdir>/data
    last = train.phases(config, root)[-1]
    rt = train.Runtime(last)
    state, _ = train.restore_final(last, rt.abstract)
    batches = pipeline.make_eval_batches(last.config, "pretrain", n_batches)
    metrics = train.evaluate(rt, state, batches)
    tokens = int(sum(float(b["weights"].sum()) for b in batches))
    out = dict(workdir=workdir, phase=last.label, step=int(state.step), tokens=tokens, **metrics)
    if per_batch:
        out["batches"] = {batch_fingerprint(b): train.evaluate(rt, state, [b])["loss"] for b in batches}
        if len(out["batches"]) < len(batches):
            raise EvalError(
                f"{workdir}: {len(batches) - len(out['batches'])} of {n_batches} validation batches repeat "
                "another exactly; per-batch pairing needs distinct batches: lower --batches."
            )
        out["distinct_rows"] = len(set().union(*(row_fingerprints(b) for b in batches)))
    return out


def run_harness(workdir: str) -> dict:
    """{'workdir', 'tasks': {task: {metric: value}}} of the lm-evaluation-harness tasks in --tasks."""
    from voltron_jax.interop import lm_eval_adapter  # lazy: the optional extra [interop]

    limit = _LIMIT.value
    limit = int(limit) if limit is not None and limit >= 1 else limit
    res = lm_eval_adapter.run_tasks(
        workdir,
        _TASKS.value,
        num_fewshot=_FEWSHOT.value,
        include_path=_INCLUDE.value or None,
        limit=limit,
        batch_size=_BATCH.value,
        max_length=_MAXLEN.value,
    )
    return dict(workdir=workdir, tasks=res)


def main(argv) -> None:
    del argv  # logging is at WARNING (Orbax logs every restore at INFO) unless --verbose: voltron_jax.cli
    if _WORKDIRS.value and _TASKS.value:
        for w in _WORKDIRS.value:
            r = run_harness(w)
            for task, metrics in sorted(r["tasks"].items()):
                for k, v in sorted(metrics.items()):
                    print(f"{w}: {task} {k} {v:.4f}", flush=True)
            if _JSON.value:
                with open(_JSON.value, "a") as f:
                    f.write(json.dumps(r) + "\n")
        return
    if not _WORKDIRS.value:
        sys.exit(
            "usage: python -m voltron_jax.experiments.evaluate --workdir=runs/a [--workdir=...] "
            "[--batches=32]"
        )

    configs = []
    for w in _WORKDIRS.value:  # a wrong folder fails before TensorFlow and jax start
        if not workdir_lib.config_file(epath.Path(w)).exists():
            raise EvalError(f"{w}: no config.json; pass the workdir of a run started by voltron_jax.main.")
        configs.append(config_from_meta(json.loads(workdir_lib.config_file(epath.Path(w)).read_text())))
    if any(tasks.uses_tensorflow(c.data) for c in configs):
        cli.preload(("tensorflow",))
    for w in _WORKDIRS.value:
        r = evaluate_run(w, _BATCHES.value, _PER_BATCH.value)  # EvalError etc.: one line from voltron_jax.cli
        print(
            f"{w}: {r['phase']} step {r['step']}  val loss {r['loss']:.4f}  ppl {r['perplexity']:.3f}  "
            f"({r['tokens']:,} tokens)",
            flush=True,
        )
        if _JSON.value:
            with open(_JSON.value, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    cli.run(main, doc=__doc__)
