"""c-BTM sparse ensemble of a recipe's branches, and single models scored on exactly the same tokens.

Paper: "Scaling Expert Language Models with Unsupervised Domain Discovery" (c-BTM), Gururangan et al.,
arXiv 2303.14177, section 2.3: at inference the branch experts are mixed per context,
    p(x_t | x_<t) = sum_j p(D=j | context) p_j(x_t | x_<t),
with the routing prior p(D=j | context) proportional to exp(-d(h(context), c_j)^2 / T), kept for the
top-k clusters and renormalised (data/cbtm.py `routing_weights`; the run's own fitted embedder h and
centroids c_j under <workdir>/data/). This is the c-BTM baseline that a c-BTX MoE must beat.

Protocol (so the prior never sees what it scores): every validation row of T tokens is split at `prefix`;
the prior is computed from the decoded bytes of the first `prefix` tokens and only the tokens after it are
scored. `mode='single'` scores the run's final model on the same rows and positions, so the MoE, the
dense continuation and the ensemble are compared on identical tokens.

    python -m voltron_jax.experiments.ensemble --workdir=runs/recipe [--mode=cbtm_ensemble|single] \
        [--batches=16 --prefix=128 --top_k=2 --temperature=0.1] [--out=dir]
With --out, the result is written as an eval record to <out>/00_eval/metrics.jsonl, which
`voltron_jax.experiments.ablate` reads like a training run's.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from voltron_jax import cli, train
from voltron_jax.errors import VoltronError
from voltron_jax.experiments import claims
from voltron_jax.inference.api import config_from_meta
from voltron_jax.run import workdir as workdir_lib

MODES = ("cbtm_ensemble", "single")


class EnsembleError(VoltronError, ValueError):
    pass


def token_logprob_fn(rt):
    """Jitted (params, step, batch) -> log p(target) [B, T] for one phase's runtime."""

    dummy = jnp.zeros((1, rt.config.data.seq_len), jnp.int32)
    state_tree = jax.eval_shape(lambda k: rt.model.init(k, dummy), jax.random.key(0)).get("state")

    def fn(params, step, batch):
        variables = train.step_variables(params, state_tree, step)
        logits = rt.model.apply(variables, *train.model_inputs(batch, rt.config.data.doc_mask))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]

    return jax.jit(fn)


def scored_mask(batch: dict, prefix: int) -> np.ndarray:
    """[B, T] weights of the positions that are scored: the row's own weights after the prefix."""
    w = np.array(batch["weights"], np.float32)
    w[:, :prefix] = 0.0
    return w


def mix(logps: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """log sum_j prior[b, j] p_j[b, t] for logps [K, B, T], prior [B, K] (zero weights contribute 0)."""
    with np.errstate(divide="ignore"):
        logw = np.log(prior).T[:, :, None]  # [K, B, 1]
    z = logw + logps
    m = z.max(0)
    return m + np.log(np.exp(z - m).sum(0))


def evaluate(
    workdir: str,
    mode: str = "cbtm_ensemble",
    n_batches: int = 16,
    prefix: int = 128,
    top_k: int = 2,
    temperature: float = 0.1,
) -> dict:
    """{'mode', 'loss', 'perplexity', 'tokens', 'step', 'batches'} on the scored suffix of `n_batches`
    validation batches of the pretraining mixture (the same rows and positions for every mode); `batches`
    is each batch's mean loss keyed by its token fingerprint (claims.batch_fingerprint), for the per-batch
    pairing of voltron_jax/experiments/claims.py."""

    from voltron_jax.data import cbtm, pipeline, prepare  # lazy: the data stack
    from voltron_jax.data import vocab as vocab_lib  # lazy: the data stack

    if mode not in MODES:
        raise EnsembleError(f"--mode={mode!r}: choose one of {MODES}.")
    root = epath.Path(workdir)
    if not workdir_lib.config_file(root).exists():
        raise EnsembleError(
            f"{workdir}: no config.json; pass the workdir of a run started by voltron_jax.main."
        )
    config = config_from_meta(json.loads(workdir_lib.config_file(root).read_text()))
    if not 0 < prefix < config.data.seq_len:
        raise EnsembleError(f"--prefix={prefix} must lie in (0, data.seq_len={config.data.seq_len}).")
    if train.needs_prepare(config):
        prepare.prepare(config, root)  # registers the prepared tasks; reuses <workdir>/data
    todo = train.phases(config, root)
    if mode == "single":
        models = [todo[-1]]
    else:
        fanned = [p for p in todo if p.member is not None]
        if not fanned:
            raise EnsembleError(f"{workdir}: its recipe has no fan-out (branch) phase to ensemble.")
        # the last fan-out phase's members, cluster order (the decayed branches when they were decayed)
        models = [p for p in fanned if p.name == fanned[-1].name]
    batches = pipeline.make_eval_batches(models[0].config, "pretrain", n_batches)
    masks = [scored_mask(b, prefix) for b in batches]
    logps, step, rt = [], 0, None
    for ph in models:  # [K][n_batches] of [B, T]; fan-out members share one compiled runtime
        if rt is None or rt.phase.name != ph.name:
            rt = train.Runtime(ph)
            fn = token_logprob_fn(rt)
        state, _ = train.restore_final(ph, rt.abstract)
        logps.append([np.asarray(fn(state.params, state.step, b)) for b in batches])
        step = max(step, int(state.step))
    per_batch = []  # [(fingerprint, summed loss, scored tokens)]
    if mode == "single":
        for b, lp, m in zip(batches, logps[0], masks, strict=True):
            per_batch.append((claims.batch_fingerprint(b, prefix), float(-(lp * m).sum()), float(m.sum())))
    else:
        clusterer = cbtm.ClusterModel.load(str(workdir_lib.data_dir(root)))
        if clusterer.n_clusters != len(models):
            raise EnsembleError(f"{clusterer.n_clusters} clusters but {len(models)} branches in {workdir}.")
        vocab = vocab_lib.make_vocab(config.data, str(root))
        for i, (b, m) in enumerate(zip(batches, masks, strict=True)):
            texts = [vocab.decode(row[:prefix].tolist()) for row in b["inputs"]]
            prior = clusterer.weights(texts, temperature, top_k)  # [B, K]
            lp = mix(np.stack([lps[i] for lps in logps]), prior)
            per_batch.append((claims.batch_fingerprint(b, prefix), float(-(lp * m).sum()), float(m.sum())))
    total = sum(x for _, x, _ in per_batch)
    tokens = float(sum(m.sum() for m in masks))
    loss = total / max(tokens, 1.0)
    scores = {k: x / max(n, 1.0) for k, x, n in per_batch}
    return dict(
        mode=mode, loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=int(tokens), step=step,
        batches=scores if len(scores) == len(per_batch) else None,  # None: a batch repeated exactly
        distinct_rows=len({r.tobytes() for b in batches for r in np.ascontiguousarray(b["inputs"])}),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--mode", default="cbtm_ensemble", choices=MODES)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument(
        "--prefix", type=int, default=128, help="tokens of each row that route; the rest is scored"
    )
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--out", default="", help="write the result as an eval record under this directory")
    a = p.parse_args(argv)
    record = eval_record_dir(a.out) if a.out else None  # a wrong --out fails before the evaluation
    r = evaluate(a.workdir, a.mode, a.batches, a.prefix, a.top_k, a.temperature)
    print(
        f"{a.workdir}: {a.mode} val loss {r['loss']:.4f}  ppl {r['perplexity']:.3f}  ({r['tokens']:,} tokens)"
    )
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
        workdir_lib.write_text(
            workdir_lib.metrics_file(record), json.dumps({"kind": "eval", **r, "source": a.workdir}) + "\n"
        )


EVAL_FOLDER = workdir_lib.phase_folder(0, "eval")


def eval_record_dir(out: str):
    """<out>/00_eval, where --out is a new folder or one holding only earlier evaluation records (an
    ablate run folder); a training run's workdir is refused: the record would sit among its phases."""
    root = workdir_lib.path(out)
    if root.is_dir() and (
        workdir_lib.config_file(root).exists()
        or any(workdir_lib.is_phase_dir(p) and p.name != EVAL_FOLDER for p in root.iterdir())
    ):
        raise EnsembleError(
            f"--out={out} is a training run's workdir; pass a folder of its own for the evaluation "
            "record (e.g. runs/<name>_ensemble). Nothing was written."
        )
    return root / EVAL_FOLDER


if __name__ == "__main__":
    cli.run(lambda argv: main(argv[1:]), absl_flags=False)
