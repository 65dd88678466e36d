"""The tiny dense baseline: the fast base that the demo, other configs and the tests build on.

Run:  python -m voltron_jax.main --config=configs/tiny.py --workdir=runs/demo
Trains a 4-layer, d=256 byte-level LM on the embedded corpus (standard library sources) on CPU in a
few minutes: WSD stable phase then a decay phase on the high-quality mix. Expect validation loss to
fall from ~5.6 (uniform over 259 bytes) to roughly 2 nats/byte.

Variants: `configs/tiny.py:test` is smaller still (unit and integration tests).
"""

from voltron_jax import config


def get_config(arg: str = ""):
    c = config.get_default()
    if arg == "test":
        c.model.d_model = 64
        c.model.n_layers = 2
        c.model.n_heads = 4
        c.model.n_kv_heads = 2
        c.model.d_ff = 128
        c.data.seq_len = 64
        c.data.batch_size = 8
        c.schedule.warmup = 2
        c.recipe.stable.steps = 8
        c.recipe.decay.steps = 4
        c.train.log_every = 2
        c.train.eval_every = 4
        c.train.eval_batches = 2
        c.train.ckpt_every = 4
    elif arg:
        raise ValueError(f"configs/tiny.py: unknown variant {arg!r}; use '' or 'test'.")
    return c
