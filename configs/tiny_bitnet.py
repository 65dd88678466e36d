"""BitNet b1.58 on the tiny baseline: every attention/MLP projection is a ternary BitLinear.

Run:  python -m voltron_jax.main --config=configs/tiny_bitnet.py --workdir=runs/tiny_bitnet
Same model, data and steps as configs/tiny.py; only the linear slot and the BitNet training recipe
change (techniques-a.md 1.5, the b1.58 FAQ): a higher peak learning rate than dense, a two-stage
learning rate (x2/3 from half-way, as 1.5e-3 -> 1e-3 in the FAQ's table) and weight decay switched off
for the second half. Expect a validation loss a few percent above the dense tiny run (docs/results.md,
"BitNet b1.58"). Export for inference:
  python -m voltron_jax.export_bitnet --phase_dir=runs/tiny_bitnet/01_decay --out=runs/tiny_bitnet/packed

Variants: `configs/tiny_bitnet.py:test` (the small test shape of configs/tiny.py).
"""

from configs import tiny

LR_FACTOR = 2.0  # BitNet peak lr / dense peak lr (see docs/results.md for the small sweep)


def get_config(arg: str = ""):
    c = tiny.get_config(arg)
    c.model.linear = "bitlinear"
    c.optim.lr = LR_FACTOR * c.optim.lr
    half = (c.recipe.stable.steps + c.recipe.decay.steps) // 2
    c.optim.lr_stage2_step = half
    c.optim.lr_stage2_factor = 2.0 / 3.0
    c.optim.wd_zero_step = half
    return c
