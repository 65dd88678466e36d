"""1.36B dense shape for throughput benchmarks (24 layers, d=2048, ff=5632, 16 heads, vocab 32000,
seq 2048, batch 8), bf16 compute, scanned layers, dots-saveable remat.

Run:  python benchmarks/step_throughput.py --config=configs/bench_1b.py
Variants select a technique for same-call comparisons: configs/bench_1b.py:bitlinear, :mod, :moe, :infini.
Imports without seqio/TensorFlow (the GPU machine has neither).
"""

from voltron_jax import config

VARIANTS = {
    "": {},
    "dense": {},
    "bitlinear": {"model.linear": "bitlinear"},
    "mod": {"model.routing": "mod"},
    "moe": {"model.ffn": "moe"},
    "infini": {"model.memory": "infini"},
    "denseformer": {"model.residual": "denseformer"},
}


def get_config(arg: str = ""):
    c = config.get_default()
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 32000, 2048, 24, 16, 16, 5632
    m.dtype, m.remat, m.scan_layers, m.attention_impl = "bfloat16", "dots", True, "auto"
    c.data.seq_len, c.data.batch_size = 2048, 8
    if arg not in VARIANTS:
        raise ValueError(f"configs/bench_1b.py: unknown variant {arg!r}; choose one of {sorted(VARIANTS)}.")
    for key, value in VARIANTS[arg].items():
        section, field = key.split(".")
        c[section][field] = value
    return c
