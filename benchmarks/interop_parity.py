"""Max |logit difference| between voltron_jax and transformers for imported and exported tiny models (fp32).

    PYTHONPATH=tests/interop JAX_PLATFORMS=cpu python benchmarks/interop_parity.py

Import: random tiny HF Llama / Mistral / Mixtral / JetMoE (tests/interop/hf_fixtures.py), loaded with
voltron_jax.interop.hf_import. Export: the project's tiny dense (MiniCPM scaling on), MoE and MoA+MoE
models (tests/interop/test_hf_export.py), reloaded with AutoModelForCausalLM. Prints one line per model:
max abs diff, the logits' std (the scale the difference is small against), and the import/export time.
"""

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from hf_fixtures import hf_logits, make_hf_model
from test_hf_export import random_params, tiny_config

from voltron_jax.interop import hf_export, hf_import
from voltron_jax.models import decoder


def main() -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    ids = np.random.default_rng(1).integers(3, 259, (4, 64)).astype(np.int32)
    for kind in ("llama", "llama_tied", "mistral", "mixtral", "jetmoe"):
        with tempfile.TemporaryDirectory() as d:
            hf = make_hf_model(kind, d)
            t0 = time.perf_counter()
            m, params = hf_import.load(d)
            dt = time.perf_counter() - t0
            ours = np.asarray(decoder.build_model(m).apply({"params": params}, jnp.asarray(ids)))
            theirs = hf_logits(hf, ids)
            diff = np.abs(ours - theirs).max()
            print(f"import {kind:12s} max|diff| {diff:.2e}  std {theirs.std():.2f}  {dt:.2f} s")
    from transformers import AutoModelForCausalLM

    for kind in ("dense_scaled", "dense_tied", "moe", "moa_moe"):
        c = tiny_config(kind)
        params = random_params(c.model)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            hf_export.export(params, c, d + "/hf")
            dt = time.perf_counter() - t0
            hf = AutoModelForCausalLM.from_pretrained(d + "/hf").eval()
            ours = np.asarray(decoder.build_model(c.model).apply({"params": params}, jnp.asarray(ids)))
            theirs = hf_logits(hf, ids)
            diff = np.abs(ours - theirs).max()
            print(f"export {kind:12s} max|diff| {diff:.2e}  std {ours.std():.2f}  {dt:.2f} s")


if __name__ == "__main__":
    main()
