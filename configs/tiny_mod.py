"""Mixture-of-Depths on the tiny model, sized for CPU comparisons (docs/results.md, "Mixture-of-Depths").

Run (one per variant, same seed):
  python -m voltron_jax.main --config=configs/tiny_mod.py:dense --workdir=runs/mod_dense
  python -m voltron_jax.main --config=configs/tiny_mod.py:mod --workdir=runs/mod_steps
  python -m voltron_jax.main --config=configs/tiny_mod.py:mod_flops --workdir=runs/mod_flops
  python benchmarks/mod_eval.py --workdir=runs/mod_steps     # top-k vs causal loss, predictor accuracy
The tiny shape (4 layers, d=256, seq 256) with batch 8 and a short WSD run (100 stable + 20 decay
steps). 'mod': MoD at capacity 0.125 on every other block (layers 1 and 3), predictor for causal
sampling, the same steps as 'dense'. 'mod_flops': the same MoD model trained for as many training FLOPs
as 'dense' (steps scaled by the analytic FLOPs ratio, ~1.7x). 'mod_aux': the router-BCE causal fix
instead of the predictor. Measured (docs/results.md, "Mixture-of-Depths"): at this length MoD beats the
4-layer dense model at equal steps (val ~2.44 vs ~2.51, as does a 2-layer dense model: shallow nets learn
faster early) and reaches ~2.20 at equal FLOPs; causal (predictor) routing costs < 0.01 nats vs top-k.
"""

from voltron_jax import config

VARIANTS = ("dense", "mod", "mod_flops", "mod_aux", "test")


def get_config(arg: str = "mod"):
    if arg not in VARIANTS:
        raise ValueError(f"configs/tiny_mod.py: unknown variant {arg!r}; choose one of {VARIANTS}.")
    c = config.load("tiny.py:test" if arg == "test" else "tiny.py", relative_to=__file__)
    c.data.batch_size = 8 if arg != "test" else c.data.batch_size
    if arg != "test":
        c.schedule.warmup = 20
        c.recipe.stable.steps, c.recipe.decay.steps = 100, 20
        c.train.log_every, c.train.eval_every, c.train.eval_batches, c.train.ckpt_every = 10, 1000, 32, 1000
    if arg == "dense":
        return c
    c.model.routing = "mod"
    if arg == "mod_aux":
        c.model.mod.causal = "aux_loss"
    if arg == "mod_flops":
        from voltron_jax.models import decoder  # lazy: only this variant needs the FLOPs model

        dense = c.model.copy_and_resolve_references()
        dense.routing = "none"
        ratio = decoder.flops_per_token(dense, c.data.seq_len) / decoder.flops_per_token(
            c.model, c.data.seq_len
        )
        c.recipe.stable.steps = round(c.recipe.stable.steps * ratio)
        c.recipe.decay.steps = round(c.recipe.decay.steps * ratio)
    return c
