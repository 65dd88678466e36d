"""Hugging Face checkpoints in: a Llama / Mistral / Mixtral / JetMoE / BitNet folder -> voltron_jax config and
params.

    from voltron_jax.interop import hf_import
    model_cfg, params = hf_import.load("path/to/hf_model")     # folder: config.json + *.safetensors
    config = hf_import.configure(config, "path/to/hf_model")   # a run: model, vocabulary, seq_len checked

A recipe phase starts from such a folder with `init.from_="hf:/path/to/hf_model"` (voltron_jax/recipe.py):
the train loop reads the tensors with `load_params` and checks them against the phase's model, so a
c-BTX recipe can branch a pretrained dense seed (configs/cbtx_hf.py; docs/interop.md).

The imported model is the checkpoint's exact function (tests/interop/test_hf_import.py compares logits
with transformers' own forward): every project feature that would change the math is off (linear
'dense', memory 'none', residual 'plain', routing 'none', MiniCPM scaling neutral) and a Mixtral's MoE
runs with `moe.impl='capacity'` and `capacity_factor = n_experts / top_k`, which never drops a token
(JetMoE's MoA the same); a JetMoE becomes attention 'moa' (n_heads = n_kv_heads, head_dim = kv_channels)
over an MoE FFN, its zero output biases dropped (non-zero ones are refused).

Conventions checked against transformers' Llama code: RoPE is the rotate-half form on both sides (HF's
q_proj/k_proj rows are already in rotate-half order, so no permutation), inv_freq = theta^(-2i/K);
RMSNorm is x * rsqrt(mean(x^2) + eps) * weight in fp32 on both sides; GQA pairs query head h with KV
head h // (H/G) (HF's repeat_kv, jax.nn.dot_product_attention's grouping); Mixtral's router takes the
softmax over all experts, the top-k, renormalised, = the softmax over the chosen logits (models/moe.py).
HF Linear weights are [out, in]; project kernels [in, out] (experts stacked [E, in, out]).

Key mapping (layer i; `.T` = transpose):
    model.embed_tokens.weight                      -> embed/embedding
    lm_head.weight.T (absent when tied)            -> lm_head/kernel
    model.norm.weight                              -> final_norm/scale
    model.layers.i.input_layernorm.weight          -> layer i attn_norm/scale
    model.layers.i.post_attention_layernorm.weight -> layer i ffn_norm/scale
    model.layers.i.self_attn.{q,k,v,o}_proj.weight.T -> layer i attn/{q,k,v,o}/kernel
    model.layers.i.mlp.{gate,up,down}_proj.weight.T  -> layer i ffn/{gate,up,down}/kernel   (dense)
    model.layers.i.block_sparse_moe.gate.weight.T    -> layer i ffn/router                   (Mixtral)
    model.layers.i.block_sparse_moe.experts.e.{w1,w3,w2}.weight.T -> layer i ffn/{gate,up,down}/kernel[e]
    (transformers 5's fused in-memory names mlp.gate.weight, mlp.experts.gate_up_proj [E,2F,D] (gate rows
    first) and mlp.experts.down_proj [E,D,F] are read as well.)
    JetMoE: the inverse of hf_export.py's JetMoE mapping (kv_proj = [k; v], input_linear = [gate; up]).
    BitNet (packed, quantization_config bitnet/bitlinear/offline; hf_export.py's docstring has the format):
    model.layers.i.self_attn.attn_sub_norm.weight -> layer i attn/o/norm/scale
    model.layers.i.mlp.ffn_sub_norm.weight        -> layer i ffn/down/norm/scale
    {q,k,v,o,gate,up,down}_proj.{weight, weight_scale} -> .../kernel = W_int * u * beta / mean|W_int u|,
        W_int unpacked, beta = 1 / weight_scale, magnitudes u in [0.75, 1.25] (hf_bitnet.latent_kernel):
        a latent kernel whose project quantisation (beta' = mean|kernel|, RoundClip(kernel / beta'))
        gives back W_int and beta (to the fp32 mean's rounding, ~1e-7), so the imported model computes
        the checkpoint's function and trains on with the STE; the last ulp is chosen so that hf_export
        writes weight_scale back bit for bit (import -> export is the identity).
    The model is model.linear='bitlinear', bitlinear.norm='sub', mlp.activation = hidden_act.
Layer i is params/stack/block_i/layer_0 (scan_layers=False) or row i of params/stack/blocks/layer_0.

Not imported (ConfigError naming the field): rope scaling other than 'default', attention or MLP
biases, activations other than SiLU, a Mistral sliding window shorter than the run's data.seq_len.
"""

from __future__ import annotations

import glob
import json
import os

import jax
import ml_collections
import numpy as np

from voltron_jax import config as config_lib
from voltron_jax.errors import ConfigError
from voltron_jax.inference.api import _shapes
from voltron_jax.interop import hf_bitnet

HF_PREFIX = "hf:"
ARCHITECTURES = {
    "LlamaForCausalLM": "mlp",
    "MistralForCausalLM": "mlp",
    "MixtralForCausalLM": "moe",
    "JetMoeForCausalLM": "moe",  # with attention 'moa'
    "BitNetForCausalLM": "mlp",  # with linear 'bitlinear', bitlinear.norm 'sub'
}
JETMOE_BLOCK_EPS = 1e-6  # transformers' JetMoeRMSNorm default, used by every JetMoE block norm


def read_hf_config(path: str) -> dict:
    """config.json of the checkpoint folder `path` (a clear error when it is not one)."""
    if not os.path.isdir(path):
        raise ConfigError(
            f"{path!r} is not a folder; pass a Hugging Face checkpoint folder (config.json inside)."
        )
    f = os.path.join(path, "config.json")
    if not os.path.exists(f):
        raise ConfigError(f"{path!r} has no config.json; pass a Hugging Face checkpoint folder.")
    with open(f) as fh:
        return json.load(fh)


def rope_theta(hf: dict) -> float:
    """RoPE base of an HF config (transformers 5: rope_parameters; 4.x: rope_theta / rope_scaling)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ConfigError(
            f"the checkpoint's rope_type={kind!r} (RoPE scaling) has no voltron_jax equivalent; only "
            "'default' RoPE imports (set rope_scaling to null in config.json to import it unscaled)."
        )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config(hf: dict) -> ml_collections.ConfigDict:
    """The voltron_jax `config.model` of HF config `hf`: the exact architecture, every project technique
    that would change its math off."""

    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"architecture {arch!r} cannot be imported; supported: {', '.join(ARCHITECTURES)} "
            "(export supports more: voltron_jax/interop/hf_export.py)."
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"the checkpoint has {key}=true; voltron_jax models have no biases.")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish", "relu2") or (
        act == "relu2" and arch in ("MixtralForCausalLM", "JetMoeForCausalLM")
    ):
        raise ConfigError(f"hidden_act={act!r}: only SiLU (SwiGLU) and ReLU^2 (gated) MLPs import.")
    m = config_lib.get_default().model
    jetmoe = arch == "JetMoeForCausalLM"
    if jetmoe and float(hf.get("rms_norm_eps", 1e-6)) != JETMOE_BLOCK_EPS:
        raise ConfigError(
            f"JetMoE rms_norm_eps={hf['rms_norm_eps']} differs from its block norms' fixed "
            f"{JETMOE_BLOCK_EPS}; voltron_jax has one model.norm_eps, so only "
            f"rms_norm_eps={JETMOE_BLOCK_EPS} imports."
        )
    d = hf["hidden_size"]
    h = hf["num_key_value_heads"] if jetmoe else hf["num_attention_heads"]
    hd = (hf.get("kv_channels") if jetmoe else hf.get("head_dim")) or d // h
    m.vocab_size = hf["vocab_size"]
    m.d_model = d
    m.n_layers = hf["num_hidden_layers"]
    m.n_heads = h
    m.n_kv_heads = hf.get("num_key_value_heads") or h
    m.head_dim = 0 if hd * h == d else hd
    m.d_ff = hf["intermediate_size"]
    m.rope_theta = rope_theta(hf)
    m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.dtype = "float32"
    # neutral project features: the imported function is the checkpoint's
    m.linear, m.attention, m.memory, m.residual, m.routing = "dense", "mha", "none", "plain", "none"
    m.scale_emb, m.scale_depth, m.dim_model_base = 1.0, 0.0, 0
    m.ffn = ARCHITECTURES[arch]
    m.mlp.activation = "relu2" if act == "relu2" else "silu"
    if arch == "BitNetForCausalLM":
        hf_bitnet.check_quantization(hf)
        m.linear = "bitlinear"
        m.bitlinear.norm, m.bitlinear.weights, m.bitlinear.eps = "sub", "ternary", 1e-5
    if m.ffn == "moe":
        e, k = hf["num_local_experts"], hf["num_experts_per_tok"]
        if k == 1:
            raise ConfigError(
                "num_experts_per_tok=1: voltron_jax's top-1 gate is the router probability (Switch), "
                "the checkpoint's is 1; only top_k >= 2 imports exactly."
            )
        m.moe.n_experts, m.moe.top_k = e, k
        m.moe.impl, m.moe.capacity_factor = "capacity", e / k  # never drops: the exact Mixtral
        if jetmoe:
            m.attention = "moa"
            m.moa.n_experts, m.moa.top_k = e, k
            m.moa.impl, m.moa.capacity_factor = "capacity", e / k
    return m


def sliding_window(hf: dict) -> int:
    """Mistral's attention window (0: none)."""
    return int(hf.get("sliding_window") or 0) if hf.get("use_sliding_window", True) else 0


def configure(config: ml_collections.ConfigDict, path: str) -> ml_collections.ConfigDict:
    """`config` (changed in place and returned) set up to run the HF checkpoint at `path`: its model, its
    tokenizer as the run's vocabulary (data.vocab='tokenizers'), and data.seq_len checked against a
    Mistral sliding window (voltron_jax attends to the whole row)."""
    hf = read_hf_config(path)
    window = sliding_window(hf)
    if window and config.data.seq_len > window:
        raise ConfigError(
            f"data.seq_len={config.data.seq_len} is longer than the checkpoint's sliding_window={window}: "
            f"voltron_jax attends to whole rows; use --config.data.seq_len={window} or less."
        )
    config.model = model_config(hf)
    if glob.glob(os.path.join(path, "tokenizer.json")):
        config.data.vocab, config.data.tokenizer_path = "tokenizers", os.path.abspath(path)
    return config


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint folder's *.safetensors files (sharded or not) as fp32 numpy (uint8
    BitNet packed weights stay uint8)."""
    from safetensors import safe_open  # lazy: optional [interop] package

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ConfigError(
            f"{path!r} holds no *.safetensors file; save the model with safe_serialization (the default "
            "of transformers' save_pretrained)."
        )
    out = {}
    for f in files:
        with safe_open(f, framework="flax") as fh:  # flax: bf16 tensors read too
            for k in fh.keys():
                x = np.asarray(fh.get_tensor(k))
                out[k] = x if x.dtype == np.uint8 else x.astype(np.float32)
    return out


def _fused_experts(router, gate_up, down) -> dict:
    """The MoE FFN from a fused expert layout (JetMoE's and transformers 5's): router [E,D], gate_up [E,2F,D]
    with the gate rows first, down [E,D,F]."""
    f = gate_up.shape[1] // 2
    return {
        "router": router.T,
        "gate": {"kernel": gate_up[:, :f].transpose(0, 2, 1)},
        "up": {"kernel": gate_up[:, f:].transpose(0, 2, 1)},
        "down": {"kernel": down.transpose(0, 2, 1)},
    }


def _layer_tensors(t: dict, i: int, ffn: str, n_experts: int) -> dict:
    """The project params of layer i (nested dict, numpy fp32) from HF tensors `t`."""
    p = f"model.layers.{i}."
    if f"{p}self_attn.attn_sub_norm.weight" in t:
        return hf_bitnet.layer_params(t, p)
    attn = None
    if f"{p}self_attn.q_proj.weight" in t or f"{p}self_attention.kv_proj.weight" not in t:
        attn = {n: {"kernel": t[f"{p}self_attn.{n}_proj.weight"].T} for n in ("q", "k", "v", "o")}
    if ffn == "mlp":
        ffn_p = {n: {"kernel": t[f"{p}mlp.{n}_proj.weight"].T} for n in ("gate", "up", "down")}
    elif f"{p}block_sparse_moe.gate.weight" in t:
        moe = f"{p}block_sparse_moe.experts"
        ex = lambda w: np.stack([t[f"{moe}.{e}.{w}.weight"].T for e in range(n_experts)])
        ffn_p = {
            "router": t[f"{p}block_sparse_moe.gate.weight"].T,
            "gate": {"kernel": ex("w1")},
            "up": {"kernel": ex("w3")},
            "down": {"kernel": ex("w2")},
        }
    elif f"{p}mlp.input_linear.weight" in t:  # JetMoE
        _no_bias(t, f"{p}mlp.bias")
        router, gate_up = t[f"{p}mlp.router.layer.weight"], t[f"{p}mlp.input_linear.weight"]
        ffn_p = _fused_experts(router, gate_up, t[f"{p}mlp.output_linear.weight"])
    else:  # transformers 5's fused layout
        ffn_p = _fused_experts(
            t[f"{p}mlp.gate.weight"], t[f"{p}mlp.experts.gate_up_proj"], t[f"{p}mlp.experts.down_proj"]
        )
    return {
        "attn": attn if attn is not None else _jetmoe_attention(t, p),
        "attn_norm": {"scale": t[f"{p}input_layernorm.weight"]},
        "ffn": ffn_p,
        "ffn_norm": {"scale": t[f"{p}post_attention_layernorm.weight"]},
    }


def _no_bias(t: dict, name: str) -> None:
    if np.any(t[name] != 0):
        raise ConfigError(f"the checkpoint's {name} is not zero; voltron_jax models have no biases.")


def _jetmoe_attention(t: dict, p: str) -> dict:
    """JetMoE MoA of layer prefix p: shared K/V (kv_proj, K rows first), per-expert Q and O, a router."""
    a = f"{p}self_attention."
    _no_bias(t, a + "experts.bias")
    kv = t[a + "kv_proj.weight"]  # [2*G*K, D]
    half = kv.shape[0] // 2
    return {
        "router": t[a + "experts.router.layer.weight"].T,
        "q": {"kernel": t[a + "experts.input_linear.weight"].transpose(0, 2, 1)},  # [E,D,G*K]
        "k": {"kernel": kv[:half].T},
        "v": {"kernel": kv[half:].T},
        "o": {"kernel": t[a + "experts.output_linear.weight"].transpose(0, 2, 1)},  # [E,G*K,D]
    }


def to_params(tensors: dict[str, np.ndarray], m) -> dict:
    """Project params (nested dict of fp32 numpy) of model config `m` from HF `tensors` (see the mapping)."""

    try:
        layers = [_layer_tensors(tensors, i, m.ffn, m.moe.n_experts) for i in range(m.n_layers)]
        params = {
            "embed": {"embedding": tensors["model.embed_tokens.weight"]},
            "final_norm": {"scale": tensors["model.norm.weight"]},
        }
        if not m.tie_embeddings:
            params["lm_head"] = {"kernel": tensors["lm_head.weight"].T}
    except KeyError as e:
        raise ConfigError(
            f"the checkpoint has no tensor {e.args[0]!r} that model config (ffn={m.ffn!r}, "
            f"n_layers={m.n_layers}, tie_embeddings={m.tie_embeddings}) needs; is it a Llama/Mistral/"
            "Mixtral checkpoint whose config.json matches its weights?"
        ) from None
    if m.scan_layers:
        params["stack"] = {"blocks": {"layer_0": jax.tree.map(lambda *a: np.stack(a), *layers)}}
    else:
        params["stack"] = {f"block_{i}": {"layer_0": layer} for i, layer in enumerate(layers)}
    return params


def load(path: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(model config, params) of the HF checkpoint folder `path`."""
    m = model_config(read_hf_config(path))
    return m, to_params(read_tensors(path), m)


def load_params(path: str, m, target=None) -> dict:
    """Params of the HF checkpoint at `path` for model config `m` (a phase's), checked against `target`
    (a tree of shapes, e.g. the phase's abstract params): a mismatch names the model field to change."""
    hf_m = model_config(read_hf_config(path))
    fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "tie_embeddings", "ffn")
    fields += ("rope_theta", "norm_eps")
    for f in fields:
        if m[f] != hf_m[f]:
            raise ConfigError(
                f"model.{f}={m[f]!r} but the Hugging Face checkpoint {path!r} has {hf_m[f]!r}; set "
                f"--config.model.{f}={hf_m[f]!r} (or build the config with "
                "voltron_jax.interop.hf_import.configure)."
            )
    params = to_params(read_tensors(path), m)
    if target is not None:
        want, have = _shapes(target), _shapes(params)
        diffs = sorted(set(want) ^ set(have))
        diffs += [k for k in sorted(set(want) & set(have)) if want[k] != have[k]]
        if diffs:
            raise ConfigError(
                f"the phase's model has other parameters than the Hugging Face checkpoint {path!r} gives "
                f"({', '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}): a phase starting from it needs "
                "the checkpoint's architecture with every technique slot at its plain choice (linear "
                "'dense', or 'bitlinear' with bitlinear.norm='sub' for a BitNet; memory 'none', residual "
                "'plain', routing 'none'); build the config with "
                "voltron_jax.interop.hf_import.configure."
            )
    return params
