"""A deep, narrow tiny model for the DenseFormer comparison on CPU (docs/results.md, "DenseFormer").

Run:  python -m voltron_jax.main --config=configs/tiny_deep.py:denseformer --workdir=runs/df0 --config.seed=0
      python -m voltron_jax.main --config=configs/tiny_deep.py --workdir=runs/plain0 --config.seed=0
24 blocks of d=64 (the paper's smallest reported DenseFormer has 24 blocks; 6-12 block models are
untested there), byte-level, sequence 128, batch 8, a short WSD run (200 stable + 40 decay steps): about
150 s of CPU time per run (5-20 min wall on the shared 2-core machine). Variants: '' or 'plain' (the
baseline), 'denseformer' (1x1), 'denseformer_4x5' (the paper's sparse pattern), 'test' (4 blocks, a few
steps). Measured (docs/results.md, "DenseFormer"): validation loss ~2.57 for the baseline and ~2.15
for the 1x1 DenseFormer (3 seeds): a large early-training gain on this deep, narrow model, not the
paper's converged 2.5-4.5%.
"""

from voltron_jax import config

VARIANTS = {
    "": {},
    "plain": {},
    "denseformer": {"residual": "denseformer"},
    "denseformer_4x5": {"residual": "denseformer", "dilation": 4, "period": 5},
    "test": {"residual": "denseformer"},
}


def get_config(arg: str = ""):
    if arg not in VARIANTS:
        raise ValueError(f"configs/tiny_deep.py: unknown variant {arg!r}; choose one of {sorted(VARIANTS)}.")
    c = config.get_default()
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 64, 24, 4, 4, 192
    # Unrolled: on CPU the scanned DenseFormer (push accumulators) costs +60% step time, unrolled +5%.
    m.scan_layers = False
    c.data.seq_len, c.data.batch_size = 128, 8
    c.schedule.warmup = 20
    c.recipe.stable.steps, c.recipe.decay.steps = 200, 40
    c.train.log_every, c.train.eval_every, c.train.eval_batches, c.train.ckpt_every = 20, 240, 32, 240
    v = dict(VARIANTS[arg])
    m.residual = v.pop("residual", "plain")
    m.denseformer.update(v)
    if arg == "test":
        m.n_layers = 4
        c.schedule.warmup = 2
        c.recipe.stable.steps, c.recipe.decay.steps = 4, 2
        c.train.log_every, c.train.eval_every, c.train.eval_batches, c.train.ckpt_every = 2, 4, 2, 4
    return c
