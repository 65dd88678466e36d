"""HF checkpoints in: imported Llama / Mistral / Mixtral models compute transformers' own logits (fp32,
max abs diff <= 1e-4) and the same greedy generations with the KV cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

from hf_fixtures import hf_greedy, hf_logits, make_hf_model  # noqa: E402

from voltron_jax.errors import ConfigError  # noqa: E402
from voltron_jax.inference import generate  # noqa: E402
from voltron_jax.interop import hf_import  # noqa: E402
from voltron_jax.models import decoder  # noqa: E402

BOS = 1


def _ids(vocab: int, shape=(2, 24), seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "mistral", "mixtral", "jetmoe"])
def test_import_matches_transformers(kind, tmp_path):
    hf = make_hf_model(kind, str(tmp_path))
    m, params = hf_import.load(str(tmp_path))
    assert m.tie_embeddings == (kind == "llama_tied") and ("lm_head" in params) != m.tie_embeddings
    assert (m.ffn == "moe") == (kind in ("mixtral", "jetmoe"))
    assert (m.attention == "moa") == (kind == "jetmoe")
    assert (m.n_kv_heads, m.norm_eps) == ((4, 1e-6) if kind == "jetmoe" else (2, 1e-5))
    assert m.rope_theta == hf.config.rope_parameters["rope_theta"]
    ids = _ids(m.vocab_size)
    ours = np.asarray(decoder.build_model(m).apply({"params": params}, jnp.asarray(ids)))
    theirs = hf_logits(hf, ids)
    assert theirs.std() > 0.3  # the models are far from uniform: the tolerance below means something
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    prompts = [[5, 17, 9, 40], [33, 8]]
    got = generate.generate_ids(
        decoder.build_model(m, decode=True),
        decoder.build_model(m),
        params,
        prompts,
        12,
        temperature=0.0,
        eos_id=BOS,  # the document boundary the HF model expects first (vocab 'tokenizers' maps it so)
        stop_at_eos=False,
    )
    assert got == [hf_greedy(hf, [BOS, *p], 12) for p in prompts]


def test_scanned_layout_is_the_same_function(tmp_path):
    make_hf_model("llama", str(tmp_path))
    m, params = hf_import.load(str(tmp_path))
    m.scan_layers = True
    scanned = hf_import.to_params(hf_import.read_tensors(str(tmp_path)), m)
    ids = jnp.asarray(_ids(m.vocab_size))
    a = decoder.build_model(m).apply({"params": scanned}, ids)
    m.scan_layers = False
    b = decoder.build_model(m).apply({"params": params}, ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    assert jax.tree.leaves(scanned["stack"])[0].shape[0] == m.n_layers


def test_unsupported_checkpoints_fail_clearly(tmp_path):
    import json

    make_hf_model("llama", str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    bad = dict(cfg, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0})
    with pytest.raises(ConfigError, match="rope_type='llama3'"):
        hf_import.model_config(bad)
    with pytest.raises(ConfigError, match="attention_bias"):
        hf_import.model_config(dict(cfg, attention_bias=True))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        hf_import.model_config(dict(cfg, architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ConfigError, match="is not a folder"):
        hf_import.load(str(tmp_path / "nothing"))
    m, _ = hf_import.load(str(tmp_path))
    m.n_kv_heads = 4
    with pytest.raises(ConfigError, match="model.n_kv_heads=4 .* --config.model.n_kv_heads=2"):
        hf_import.load_params(str(tmp_path), m)
    m.n_kv_heads, m.linear = 2, "bitlinear"  # same sizes, but BitLinear's own norm params
    with pytest.raises(ConfigError, match="linear 'dense'.*hf_import.configure"):
        hf_import.load_params(str(tmp_path), m, _abstract(m))
    m.linear = "dense"
    assert hf_import.load_params(str(tmp_path), m, _abstract(m))["embed"]["embedding"].shape == (320, 32)


def _abstract(m):
    return nn.unbox(jax.eval_shape(decoder.build_model(m).init, jax.random.key(0), jnp.zeros((1, 8), int)))[
        "params"
    ]


def test_bf16_and_sharded_checkpoints_import(tmp_path):
    import torch

    hf = make_hf_model("llama", str(tmp_path / "fp32"))
    hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"), max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "bf16").glob("*.safetensors"))
    assert len(shards) > 1  # sharded, with model.safetensors.index.json
    _, p32 = hf_import.load(str(tmp_path / "fp32"))
    m16, p16 = hf_import.load(str(tmp_path / "bf16"))
    assert m16.dtype == "float32"  # params are fp32 in the project; the bf16 values exactly
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16), strict=True):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32), b)
