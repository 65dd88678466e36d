"""Passkey retrieval at small scale with Infini-attention (issue 4; techniques-a.md 2.3, 2.5, 2.7).

Run:  python -m voltron_jax.experiments.passkey_eval --config=configs/passkey_tiny.py --out=runs/passkey
Fine-tunes (from scratch, through the one train loop: train.run, checkpoints in runs/passkey/infini/ and
runs/passkey/local_twin/) a small byte-level model with memory='infini', segment length 64, on passkey
inputs of 4 segments (256 tokens; loss only on the 5 key digits), then its segment-local twin
(model.infini.rule='none') on the same batches for the same steps, and prints for each the accuracy
table at 4, 8 and 16 segments x depths start / middle / end. The local twin can only answer when the key
is in the last segment ('end'); the memory model must carry it across segments. Success is not
guaranteed at this scale (the published negative result, techniques-a.md 2.5): report what comes out.

Variants: `:test` is a seconds-long smoke run (tests/eval/test_passkey.py).
The recipe phase's mixture 'passkey' is voltron_jax.data.passkey.PasskeyIterator (the train loop's
iterator protocol); `python -m voltron_jax.main --config=configs/passkey_tiny.py` trains it alone.
"""

import ml_collections

from voltron_jax import config


def get_config(arg: str = ""):
    c = config.get_default()
    m = c.model
    m.update(d_model=64, n_layers=4, n_heads=2, n_kv_heads=2, d_ff=192, memory="infini")
    m.infini.segment_len = 64
    m.infini.rule = "linear"
    m.infini.gate_init = 0.0  # from scratch: sigmoid(beta) = 0.5
    c.data.seq_len = 256  # 4 segments
    c.data.batch_size = 16
    c.data.mixtures.passkey = "passkey:1.0"
    c.optim.lr = 1e-3
    c.optim.gate_lr = 1e-2  # HF blog fix: the gates need their own, larger lr and no weight decay
    c.schedule.name = "cosine"
    c.schedule.warmup = 50
    c.recipe = ml_collections.ConfigDict()
    c.recipe.passkey = config.phase(1500, mixture="passkey")
    if arg == "test":
        m.update(d_model=32, n_layers=2, d_ff=64)
        m.infini.segment_len = 32
        c.data.seq_len = 64
        c.data.batch_size = 4
        c.schedule.warmup = 1
        c.recipe.passkey.steps = 3
    elif arg:
        raise ValueError(f"configs/passkey_tiny.py: unknown variant {arg!r}; use '' or 'test'.")
    return c
