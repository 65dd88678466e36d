"""BitNet b1.58 on the tiny baseline: every attention/MLP projection is a ternary BitLinear.

Run:  python -m voltron_jax.main --config=configs/tiny_bitnet.py --workdir=runs/tiny_bitnet
Same model, data and steps as configs/tiny.py; only the linear slot and the BitNet training recipe
change (techniques-a.md 1.5, the b1.58 FAQ): a two-stage learning rate (x2/3 from half-way, as 1.5e-3
-> 1e-3 in the FAQ's table), weight decay switched off for the second half, and the peak learning rate
that won a 5-point sweep at this size, 1.5e-3: 2-4x dense's best (3.75e-4 to 7.5e-4), below the shared
default 3e-3. Expect a validation loss about 0.31 nats (16%) above dense at its best learning rate: a
larger gap than the paper's few percent at 700M, as BitNet's gap shrinks with scale (docs/results.md,
"BitNet b1.58"). Export for inference:
  python -m voltron_jax.inference.export_bitnet --phase_dir=runs/tiny_bitnet/01_decay \
      --out=runs/tiny_bitnet/packed

Variants: `configs/tiny_bitnet.py:test` (the small test shape of configs/tiny.py).
"""

from voltron_jax import config

PEAK_LR = 1.5e-3  # best of 7.5e-4 .. 1.2e-2 at this size (docs/results.md, "BitNet b1.58")


def get_config(arg: str = ""):
    c = config.load(f"tiny.py:{arg}" if arg else "tiny.py", relative_to=__file__)
    c.model.linear = "bitlinear"
    c.optim.lr = PEAK_LR
    half = (c.recipe.stable.steps + c.recipe.decay.steps) // 2
    c.optim.lr_stage2_step = half
    c.optim.lr_stage2_factor = 2.0 / 3.0
    c.optim.wd_zero_step = half
    return c
