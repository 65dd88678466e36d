"""Mixture-of-Depths evaluation of a finished run: validation loss with top-k routing (training-style,
non-causal) and with causal routing (predictor or router sign, as at decode), the predictor's (or the
router's, for causal='aux_loss') routing accuracy against the top-k targets, and the fraction of tokens
the causal rule routes.

    python benchmarks/mod_eval.py --workdir=runs/tiny_mod [--phase=decay] [--batches=32]

Reads the run's config.json and the phase's last checkpoint (default: the last phase of the recipe), and
evaluates the first `batches` validation batches of the pretraining mixture. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath


def restore_params(config, workdir: epath.Path, phase_name: str):
    """(phase, params) of the named (default: last) phase's final checkpoint."""
    from voltron_jax import train

    phases = train.phases(config, workdir)
    phase = next((p for p in phases if p.name == phase_name), None) if phase_name else phases[-1]
    if phase is None:
        raise SystemExit(f"no phase {phase_name!r} in {[p.name for p in phases]}.")
    rt = train.Runtime(phase)
    state, _ = train.restore_final(phase, rt.abstract)
    return phase, jax.device_get(state.params)


def evaluate(model_cfg, params, batches, route_by: str, doc_mask: bool) -> dict:
    """Mean token NLL and the sown routing statistics (mean over routed layers and batches)."""
    from voltron_jax.models import decoder

    m = ml_collections.ConfigDict(model_cfg.to_dict())
    m.mod.route_by = route_by
    model = decoder.build_model(m)

    @jax.jit
    def run(batch):
        seg = batch["segment_ids"] if doc_mask else None
        logits, cols = model.apply(
            {"params": params},
            batch["inputs"],
            batch["positions"],
            seg,
            mutable=["intermediates", "aux_loss"],
        )
        logz = jax.nn.logsumexp(logits, axis=-1)
        nll = logz - jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        stats = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(cols.get("intermediates", {}))[0]:
            name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
            stats.setdefault(name, []).append(jnp.mean(leaf))
        stats = {k: jnp.mean(jnp.stack(v)) for k, v in stats.items()}
        return jnp.sum(nll * batch["weights"]), jnp.sum(batch["weights"]), stats

    tot, n, acc = 0.0, 0.0, {}
    for b in batches:
        s, c, stats = run({k: jnp.asarray(v) for k, v in b.items()})
        tot, n = tot + float(s), n + float(c)
        for k, v in stats.items():
            acc.setdefault(k, []).append(float(v))
    return {"loss": tot / max(n, 1.0), **{k: float(np.mean(v)) for k, v in acc.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--phase", default="")
    p.add_argument("--batches", type=int, default=32)
    a = p.parse_args()
    from voltron_jax.data import pipeline

    workdir = epath.Path(a.workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    if config.model.routing != "mod":
        raise SystemExit(f"{workdir} is not a MoD run (model.routing={config.model.routing!r}).")
    phase, params = restore_params(config, workdir, a.phase)
    batches = pipeline.make_eval_batches(phase.config, "pretrain", a.batches)
    res = {"workdir": a.workdir, "phase": phase.name, "mod_causal": config.model.mod.causal}
    for route_by in ("topk", "causal"):
        res[route_by] = evaluate(phase.config.model, params, batches, route_by, phase.config.data.doc_mask)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
