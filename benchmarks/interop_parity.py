"""Max |logit difference| between voltron_jax and transformers for imported and exported tiny models (fp32).

    PYTHONPATH=tests/interop JAX_PLATFORMS=cpu python benchmarks/interop_parity.py [kind ...]

Import: random tiny HF Llama / Mistral / Mixtral / JetMoE / packed BitNet (tests/interop/hf_fixtures.py),
loaded with voltron_jax.interop.hf_import. Export: the project's tiny dense (MiniCPM scaling on), MoE,
MoA+MoE and BitNet (bitlinear.norm='sub', ReLU^2, MiniCPM scaling on) models (tests/interop/), reloaded
with AutoModelForCausalLM. Prints one line per model: max abs diff, the logits' std (the scale the
difference is small against), the median over positions of the per-position max diff, the positions
above 1e-4 (BitNet: int8 activations that round the other way, docs/interop.md), and the time.
Kinds given on the command line (e.g. `bitnet`) restrict the run to them.
"""

import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from hf_fixtures import hf_logits, make_hf_bitnet, make_hf_model
from test_hf_bitnet import bitnet_config
from test_hf_export import random_params, tiny_config

from voltron_jax.interop import hf_export, hf_import
from voltron_jax.models import decoder


def line(direction: str, kind: str, ours, theirs, dt: float) -> str:
    per_pos = np.abs(ours - theirs).max(-1)  # [B,T]
    return (
        f"{direction} {kind:12s} max|diff| {per_pos.max():.2e}  std {theirs.std():.2f}  median/position "
        f"{np.median(per_pos):.1e}  positions > 1e-4: {int((per_pos > 1e-4).sum())}/{per_pos.size}  "
        f"{dt:.2f} s"
    )


def main() -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    want = set(sys.argv[1:])
    ids = np.random.default_rng(1).integers(3, 259, (4, 64)).astype(np.int32)
    for kind in ("llama", "llama_tied", "mistral", "mixtral", "jetmoe", "bitnet"):
        if want and kind not in want:
            continue
        with tempfile.TemporaryDirectory() as d:
            hf = make_hf_bitnet(d) if kind == "bitnet" else make_hf_model(kind, d)
            t0 = time.perf_counter()
            m, params = hf_import.load(d)
            dt = time.perf_counter() - t0
            ours = np.asarray(decoder.build_model(m).apply({"params": params}, jnp.asarray(ids)))
            print(line("import", kind, ours, hf_logits(hf, ids), dt), flush=True)
    from transformers import AutoModelForCausalLM

    for kind in ("dense_scaled", "dense_tied", "moe", "moa_moe", "bitnet"):
        if want and kind not in want:
            continue
        c = bitnet_config() if kind == "bitnet" else tiny_config(kind)
        params = random_params(c.model)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            hf_export.export(params, c, d + "/hf")
            dt = time.perf_counter() - t0
            hf = AutoModelForCausalLM.from_pretrained(d + "/hf").eval()
            ours = np.asarray(decoder.build_model(c.model).apply({"params": params}, jnp.asarray(ids)))
            print(line("export", kind, ours, hf_logits(hf, ids), dt), flush=True)


if __name__ == "__main__":
    main()
