"""transformers' packed BitNet format, both ways (hf_export.py writes it, hf_import.py reads it).

transformers' BitNetForCausalLM (BitNet b1.58 2B4T) is the project's BitLinear with bitlinear.norm='sub'
(an RMSNorm gain inside o and down only: attn_sub_norm, ffn_sub_norm) and mlp.activation = hidden_act
(relu2 in 2B4T). A packed checkpoint (quantization_config bitnet / bitlinear / offline, what
microsoft/bitnet-b1.58-2B-4T ships) stores per projection `weight` uint8 [out/4, in]: the ternary values
+ 1, 2 bits each, output row j * out/4 + i in bits 2j..2j+1 of packed row i (transformers' `pack_weights`;
`bitlinear.pack_ternary` along the output axis), and `weight_scale` [1] = 1 / beta, since transformers'
BitLinear divides: y = (x_int . W_int) / (s_x * weight_scale), s_x = 127 * (1 / max|x|) per token.

Out: W_int from the project's forward quantiser, beta the exact mean|W| (float64 sum; the forward's fp32
reduction is ~1e-7 relative off on trained weights); a folded residual scale divides weight_scale.
In: `latent_kernel` makes trainable latent weights that quantise back to W_int and beta, chosen so that
the export writes weight_scale back bit for bit. docs/interop.md ("BitNet both ways") says how exact the
forwards agree and why.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

from voltron_jax.errors import ConfigError
from voltron_jax.models import bitlinear

HF_BITNET_EPS = 1e-5  # transformers' BitLinear floors the per-token absmax at 1e-5 (fixed)
BITNET_QUANTIZATION = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}
_quantize_weight = jax.jit(bitlinear.quantize_weight, static_argnums=(1, 2))  # the forward's own quantiser


def check_bitnet(m) -> None:
    """Raise ConfigError unless BitLinear model `m` is transformers' BitNetForCausalLM exactly."""
    b = m.bitlinear
    if b.norm != "sub":
        raise ConfigError(
            f"model.bitlinear.norm={b.norm!r}: a norm inside every BitLinear has no transformers BitNet "
            "equivalent (its BitNetForCausalLM normalises only before o_proj and down_proj, SubLN); the "
            "nearest exportable setting is model.bitlinear.norm='sub' (with model.mlp.activation='relu2' "
            "for BitNet b1.58 2B4T's FFN)."
        )
    if b.weights != "ternary":
        raise ConfigError(
            f"model.bitlinear.weights={b.weights!r}: transformers' BitNet stores ternary weights; set "
            "model.bitlinear.weights='ternary'."
        )
    if m.ffn != "mlp" or m.attention != "mha":
        field = "ffn" if m.ffn != "mlp" else "attention"
        raise ConfigError(
            f"model.{field}={m[field]!r} with BitLinear: transformers' BitNet is a dense model; the nearest "
            f"exportable setting is model.{field}={'mlp' if field == 'ffn' else 'mha'!r}."
        )
    if b.eps != HF_BITNET_EPS:
        raise ConfigError(
            f"model.bitlinear.eps={b.eps}: transformers' BitLinear floors the activation absmax at "
            f"{HF_BITNET_EPS}; set model.bitlinear.eps={HF_BITNET_EPS}."
        )
    if head_dim(m) * m.n_heads != m.d_model:
        raise ConfigError(
            f"model.head_dim={m.head_dim}: transformers' BitNet attn_sub_norm has d_model features, so "
            "n_heads * head_dim must equal d_model; set model.head_dim=0."
        )
    sizes = dict(d_model=m.d_model, d_ff=m.d_ff, n_kv_heads=m.n_kv_heads * head_dim(m))
    for name, n in sizes.items():
        if n % 4:
            raise ConfigError(
                f"model.{name}: a projection with {n} outputs cannot be packed 4 per byte as "
                "transformers' BitLinear needs (its packed rows are out // 4); use a multiple of 4."
            )


def head_dim(m) -> int:
    return m.head_dim or m.d_model // m.n_heads


def ternary(proj: dict, eps: float, n_in: int) -> tuple[np.ndarray, float]:
    """(W_int [in, out] int8, beta) of one BitLinear's params. A latent kernel: W_int from the project's
    forward quantiser, beta = max(mean|W|, eps) summed exactly (float64; the forward's fp32 reduction
    differs from it by its rounding, ~1e-6 relative); packed inference params (inference/export_bitnet.py,
    `n_in` input features): their codes and scale."""
    if "packed" in proj:
        w_int = bitlinear.unpack_ternary(np.asarray(proj["packed"]), n_in)
        return np.asarray(w_int, np.int8), float(np.asarray(proj["scale"], np.float32).reshape(()))
    kernel = np.asarray(proj["kernel"], np.float32)
    w_int, _ = _quantize_weight(kernel, "ternary", eps)
    return np.asarray(w_int, np.int8), max(float(np.mean(np.abs(kernel), dtype=np.float64)), eps)


def weight_scale(beta: float, rs: float = 1.0) -> np.ndarray:
    """transformers' `weight_scale` [1] fp32 of scale beta (times a folded residual scale rs): 1 / (beta
    rs), since its BitLinear divides by it."""
    return np.array([1.0 / (beta * rs)], np.float32)


def pack_hf(w_int: np.ndarray) -> np.ndarray:
    """transformers' packed BitLinear weight [out/4, in] uint8 of ternary W_int [in, out]: its
    `pack_weights` layout, which is `bitlinear.pack_ternary`'s along the output axis."""
    return np.asarray(bitlinear.pack_ternary(np.ascontiguousarray(w_int.T)))


def layer_tensors(at: dict, ff: dict, p: str, rs: float, m) -> dict[str, np.ndarray]:
    """One BitNet layer's HF tensors: packed weights + weight_scale per projection, the two sub-norms."""
    t = {
        p + "self_attn.attn_sub_norm.weight": np.asarray(at["o"]["norm"]["scale"], np.float32),
        p + "mlp.ffn_sub_norm.weight": np.asarray(ff["down"]["norm"]["scale"], np.float32),
    }
    projs = [(f"self_attn.{n}_proj", at[n], n == "o", m.d_model) for n in ("q", "k", "v", "o")]
    projs += [
        (f"mlp.{n}_proj", ff[n], n == "down", m.d_ff if n == "down" else m.d_model)
        for n in ("gate", "up", "down")
    ]
    for name, proj, residual, n_in in projs:
        w_int, beta = ternary(proj, m.bitlinear.eps, n_in)
        t[f"{p}{name}.weight"] = pack_hf(w_int)
        t[f"{p}{name}.weight_scale"] = weight_scale(beta, rs if residual else 1.0)
    return t


# --------------------------------------------------------------------------------------------- import


def check_quantization(hf: dict) -> None:
    """Only transformers' packed offline BitLinear format imports (what BitNet b1.58 2B4T ships)."""
    q = hf.get("quantization_config") or {}
    got = (q.get("quant_method"), q.get("linear_class", "bitlinear"), q.get("quantization_mode", "offline"))
    if got != ("bitnet", "bitlinear", "offline") or q.get("use_rms_norm"):
        raise ConfigError(
            f"BitNetForCausalLM with quantization_config={q or None}: only the packed ternary format imports "
            "(quant_method 'bitnet', linear_class 'bitlinear', quantization_mode 'offline', no use_rms_norm, "
            "as microsoft/bitnet-b1.58-2B-4T ships); a full-precision BitNet has no ternary weights."
        )


def layer_params(t: dict, p: str) -> dict:
    """A BitNet layer: latent kernels from the packed weights (see the key mapping), the sub-norms inside
    o and down."""
    attn = {n: {"kernel": latent_kernel(t, f"{p}self_attn.{n}_proj")} for n in ("q", "k", "v", "o")}
    ffn = {n: {"kernel": latent_kernel(t, f"{p}mlp.{n}_proj")} for n in ("gate", "up", "down")}
    attn["o"]["norm"] = {"scale": t[f"{p}self_attn.attn_sub_norm.weight"]}
    ffn["down"]["norm"] = {"scale": t[f"{p}mlp.ffn_sub_norm.weight"]}
    return {
        "attn": attn,
        "attn_norm": {"scale": t[f"{p}input_layernorm.weight"]},
        "ffn": ffn,
        "ffn_norm": {"scale": t[f"{p}post_attention_layernorm.weight"]},
    }


def latent_kernel(t: dict, name: str, max_ulps: int = 16) -> np.ndarray:
    """[in, out] fp32 latent kernel of packed BitLinear `name` (`name.weight` uint8 [out/4, in] and
    `name.weight_scale`): W_int * u * c, with magnitudes u spread uniformly over [0.75, 1.25] (seeded by
    the name: reproducible) and c = beta / mean|W_int u|, moved by single ulps until hf_export's scale
    (1 / exact mean|kernel|, monotone in c) is weight_scale bit for bit. Every |kernel| / beta >= 0.75 /
    mean|W_int| >= 0.75, so RoundClip gives W_int back. The spread keeps the forward's fp32 mean|kernel|
    within ~1e-7 of beta: a sum of equal magnitudes rounds with a bias (~5e-6 relative on a 48 x 32 matrix),
    which would move every activation scale after it and make int8 roundings differ from transformers'."""
    packed, ws = t[f"{name}.weight"], np.float32(np.asarray(t[f"{name}.weight_scale"]).reshape(-1)[0])
    w_int = np.asarray(bitlinear.unpack_ternary(packed, 4 * packed.shape[0])).T.astype(np.float32)  # [in,out]
    spread = np.random.default_rng(zlib.crc32(name.encode())).uniform(0.75, 1.25, w_int.shape)
    base = (w_int * spread).astype(np.float32)
    frac = float(np.mean(np.abs(base), dtype=np.float64))
    if frac == 0.0:
        return np.zeros_like(w_int)
    c = np.float32(1.0 / (float(ws) * frac))
    for _ in range(max_ulps):
        got = weight_scale(float(np.mean(np.abs(base * c), dtype=np.float64)))[0]
        if got == ws:
            break
        c = np.nextafter(c, np.float32(np.inf) if got > ws else np.float32(0.0))  # larger c: smaller scale
    kernel = base * c
    got_int, _ = ternary({"kernel": kernel}, HF_BITNET_EPS, w_int.shape[0])
    assert np.array_equal(got_int, w_int), name
    return kernel
