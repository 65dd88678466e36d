"""BitLinear: ternary (BitNet b1.58) or binary (BitNet) weights with 8-bit per-token activations.

Papers: "BitNet: Scaling 1-bit Transformers for Large Language Models" (arXiv 2310.11453); "The Era of
1-bit LLMs: All Large Language Models are in 1.58 Bits" (arXiv 2402.17764) and Microsoft's "Training
Tips, Code and FAQ" for it. Spec: docs/specs/techniques-a.md section 1.

Implemented (linear slot 'bitlinear'; same call and param name 'kernel' [in, out] as layers.Dense):
  y = Q_w(W) . Q_x(norm(x)) with
  - norm inside every BitLinear, before quantisation: 'rms' (RMSNorm with a learned gain, the FAQ),
    'layer' (non-affine LayerNorm = b1's SubLN), 'none' (ablation; an exact start for warm-in), or
    'sub': BitNet b1.58 2B4T's SubLN layout, which transformers' BitNetForCausalLM implements (spec 1.2):
    an RMSNorm with a learned gain only inside the projections that read an inner activation (kernel
    axis 0 not 'embed': the attention output into o, attn_sub_norm; the FFN hidden into down,
    ffn_sub_norm) and none inside q, k, v, gate, up, whose input is the block's pre-normed residual
    stream. With model.mlp.activation='relu2' this is exactly transformers' BitNet architecture
    (voltron_jax/interop/hf_export.py exports it, hf_import.py imports it).
  - Q_x: per-token absmax to 8 bits, s_x = 127 / max(max|x|, eps), x_int = clip(round(x s_x), -128, 127).
  - Q_w 'ternary': beta = max(mean|W|, eps), W_int = clip(round(W / beta), -1, 1) (RoundClip).
    Q_w 'binary': W_int = sign(W - mean W) with sign(0) = -1, beta = max(mean|W|, eps) of the uncentred W.
  - One beta per weight matrix: statistics reduce over a kernel's last two axes, so a stacked
    [E, in, out] expert kernel gets one scale per expert (`bitlinear_apply` takes stacked kernels).
  - STE through stop_gradient on integer-valued operands: x_s = x s_x + lam sg(x_int - x s_x) and
    w_s = W / beta + lam sg(W_int - W / beta), scales stop-gradiented, y = (x_s . w_s) beta / s_x. This is
    exactly the FAQ's (x + lam sg(q(x) - x)) . (W + lam sg(q(W) - W)), so gradients are a dense layer's at
    the quantised operands; the matmul runs on integers (exact in bf16 and fp32), so the fake-quant forward
    equals the int8 x int8 -> int32 inference path up to the final fp32 rescale.
  - Scales, rounding and norms in fp32; the latent kernel is fp32; only the matmul runs in `dtype`.
  - Warm-in (converting a full-precision checkpoint): lam = clip((step - start) / steps, 0, 1). The step
    arrives in the 'state' collection: each BitLinear declares a scalar `state/step` at init; the train loop
    fills every leaf of that collection with the global step, whatever declared it. Without it (inference,
    notebooks) lam = 1: the deployed, fully quantised model.
  - Packed inference (`packed=True`): params are 2-bit codes 'packed' [ceil(in/4), out] uint8 plus 'scale'
    (beta, multiplied, never divided: the scale convention bug of microsoft/BitNet PR #616); unpacked on
    the fly to int8 and multiplied with `lax.dot_general(..., preferred_element_type=int32)`.
    voltron_jax/inference/export_bitnet.py converts trained checkpoints.

Choices and deviations:
  - The block pre-norms stay (FAQ section 3 removes them, pytorch/ao follows): routers (MoE, MoA, MoD) and
    the Infini memory read the block's normalised input and are never quantised, and a dense and a BitNet
    checkpoint keep the same tree apart from the BitLinear norm gains, so warm-in conversion is a small
    surgery. The inner norm is the one that sets the quantisation range. q, k and v are separate
    projections, so each has its own norm and its own scale (one norm on the shared input is the fused
    FAQ equivalent); the extra norms are elementwise and cheap.
  - Per-tensor statistics, not b1's per-shard groups: under jit/GSPMD mean|W| over a sharded kernel and the
    per-token absmax / RMS over a sharded feature axis are global reductions (one small all-reduce each), so
    a sharded BitLinear equals the unsharded one and training and inference use the same granularity.
  - Activations are per token in training as well as inference (b1.58); b1's per-tensor training
    statistics and its zero-point shift before non-linearities are not implemented.
  - Warm-in applies the norm fully from the first step (the HF blog's recipe); norm='none' makes lam = 0
    reproduce the dense layer exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from voltron_jax import sharding
from voltron_jax.errors import ConfigError
from voltron_jax.models.layers import RMSNorm, param_with_axes

Dtype = Any
WEIGHTS = ("ternary", "binary")
NORMS = ("rms", "layer", "none", "sub")
STATE = "state"  # collection the train loop fills with the global step


# --------------------------------------------------------------------------------------------- quantisers


def _matrix_mean(v: jax.Array) -> jax.Array:
    return jnp.mean(v, axis=(-2, -1), keepdims=True)


def quantize_weight(
    w: jax.Array, kind: str = "ternary", eps: float = 1e-5, mean: Callable = _matrix_mean
) -> tuple[jax.Array, jax.Array]:
    """(W_int, beta): W_int in {-1, 0, +1} ({-1, +1} for 'binary') as fp32, beta [..., 1, 1] fp32.

    Statistics reduce over the last two axes: one scale per [in, out] matrix, one per expert for a
    stacked [E, in, out] kernel. The quantised weight is W_int * beta. `mean` takes those statistics (a
    shard's: `sharding.shard_mean`, which reduces over the whole matrix across devices)."""
    w = w.astype(jnp.float32)
    beta = jnp.maximum(mean(jnp.abs(w)), eps)
    if kind == "ternary":
        return jnp.clip(jnp.round(w / beta), -1.0, 1.0), beta
    if kind == "binary":
        alpha = mean(w)
        return jnp.where(w - alpha > 0, 1.0, -1.0), beta  # sign(0) = -1
    raise ValueError(f"BitLinear weights={kind!r} is unknown; choose one of {WEIGHTS}.")


def quantize_act(x: jax.Array, eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
    """(x_int, s_x): per-token absmax quantisation over the last axis; x_int integer-valued fp32 in
    [-128, 127] with max |x_int| = 127 per token, s_x [..., 1] fp32; x ~ x_int / s_x."""
    x = x.astype(jnp.float32)
    s_x = 127.0 / jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), eps)
    return jnp.clip(jnp.round(x * s_x), -128.0, 127.0), s_x


def normalize(x: jax.Array, kind: str, gain: jax.Array | None = None, eps: float = 1e-6) -> jax.Array:
    """The norm inside BitLinear over the last axis, in fp32: 'rms' (times `gain`), 'layer'
    (non-affine, SubLN) or 'none' (a 'sub' BitLinear applies 'rms' or 'none': `BitLinear.inner_norm`)."""
    x = x.astype(jnp.float32)
    if kind == "rms":
        y = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
        return y if gain is None else y * gain
    if kind == "layer":
        mu = jnp.mean(x, axis=-1, keepdims=True)
        return (x - mu) * lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + eps)
    if kind == "none":
        return x
    raise ValueError(f"BitLinear norm={kind!r} is unknown; choose one of {NORMS}.")


def _matmul(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """x [*b, ..., in] . w [*b, in, out] -> [*b, ..., out], the leading axes of w batched with x's."""
    nb = w.ndim - 2
    dims = (((x.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
    return lax.dot_general(x, w, dims, preferred_element_type=out_dtype)


def _out_scale(beta: jax.Array, s_x: jax.Array, y_ndim: int) -> jax.Array:
    """beta / s_x broadcast to y: beta [*b, 1, 1] -> [*b, 1, ..., 1]; s_x [..., 1] already matches."""
    nb = beta.ndim - 2
    return beta.reshape(beta.shape[:nb] + (1,) * (y_ndim - nb)) / s_x


def bitlinear_apply(
    x: jax.Array,
    w: jax.Array,
    *,
    weights: str = "ternary",
    eps: float = 1e-5,
    lam: float | jax.Array = 1.0,
    dtype: Dtype = jnp.float32,
) -> jax.Array:
    """Fake-quant BitLinear matmul with the STE, for an already normalised x.

    x [*b, ..., in], w [*b, in, out] (the leading *b axes of w, e.g. experts E, are batch axes shared
    with x) -> y [*b, ..., out] fp32. One weight scale per matrix of w; activations per token. `lam` in
    [0, 1] is the warm-in mix (1 = fully quantised). The matmul runs in `dtype` on integer-valued
    operands with fp32 accumulation; gradients w.r.t. w and x are a dense layer's at the quantised
    operands (x_int / s_x and W_int * beta)."""
    w_s, beta = weight_operand(w, weights=weights, eps=eps, lam=lam)
    return operand_apply(x, w_s, beta, eps=eps, lam=lam, dtype=dtype)


def weight_operand(
    w: jax.Array, *, weights: str, eps: float, lam: float | jax.Array, mean: Callable = _matrix_mean
) -> tuple[jax.Array, jax.Array]:
    """(w_s, beta): the weight operand of the matmul, fp32 (integer-valued at lam = 1; its gradient is the
    STE's identity / beta), and the per-matrix scale beta (no gradient). Elementwise given beta, so a
    shard's operand, with `mean` over the whole matrix, is the whole operand's shard."""
    w_int, beta = quantize_weight(w, weights, eps, mean)
    beta = lax.stop_gradient(beta)
    w_s = w.astype(jnp.float32) / beta
    return w_s + lam * lax.stop_gradient(w_int - w_s), beta


def operand_apply(
    x: jax.Array, w_s: jax.Array, beta: jax.Array, *, eps: float, lam: float | jax.Array, dtype: Dtype
) -> jax.Array:
    """The rest of `bitlinear_apply`, from the weight operand (`weight_operand`, whole, any dtype)."""
    x_int, s_x = quantize_act(x, eps)
    s_x = lax.stop_gradient(s_x)
    x_s = x.astype(jnp.float32) * s_x
    x_s = x_s + lam * lax.stop_gradient(x_int - x_s)
    y = _matmul(x_s.astype(dtype), w_s.astype(dtype), jnp.float32)
    return y * _out_scale(beta, s_x, y.ndim)


def warmin_lambda(warmin: tuple[int, int], step: jax.Array | None) -> float | jax.Array:
    """lam = clip((step - start) / steps, 0, 1); 1 without warm-in (steps 0) or without a step."""
    start, steps = warmin
    if steps <= 0 or step is None:
        return 1.0
    return jnp.clip((step.astype(jnp.float32) - start) / steps, 0.0, 1.0)


# --------------------------------------------------------------------------------------------- packing


def packed_rows(n_in: int) -> int:
    """Rows of the packed [ceil(in/4), out] uint8 array for `n_in` input features."""
    return -(-n_in // 4)


def pack_ternary(w_int: jax.Array) -> jax.Array:
    """Pack ternary values [..., in, out] into uint8 [..., ceil(in/4), out], 2 bits each (value + 1 in
    {0, 1, 2}). Row r = j * P + i of the (zero-padded) input axis sits in bits 2j..2j+1 of packed row i,
    P = ceil(in/4), so unpacking is four shifts and a concatenation."""
    n_in, p = w_int.shape[-2], packed_rows(w_int.shape[-2])
    pad = [(0, 0)] * (w_int.ndim - 2) + [(0, 4 * p - n_in), (0, 0)]
    codes = (jnp.pad(w_int, pad) + 1).astype(jnp.uint8)  # [..., 4P, out]
    codes = codes.reshape(codes.shape[:-2] + (4, p, codes.shape[-1]))  # [..., 4, P, out]
    shifts = (2 * jnp.arange(4, dtype=jnp.uint8)).reshape((4, 1, 1))
    return jnp.sum(codes << shifts, axis=-3, dtype=jnp.uint8)  # disjoint bit fields: sum == OR


def unpack_ternary(packed: jax.Array, n_in: int) -> jax.Array:
    """Inverse of `pack_ternary`: uint8 [..., ceil(in/4), out] -> int8 [..., in, out] in {-1, 0, +1}."""
    parts = [(packed >> (2 * j)) & 3 for j in range(4)]
    codes = jnp.concatenate(parts, axis=-2)[..., :n_in, :]  # [..., in, out]
    return codes.astype(jnp.int8) - 1


def packed_apply(x: jax.Array, packed: jax.Array, scale: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Inference BitLinear for an already normalised x [*b, ..., in] and packed weights [*b, P, out] with
    scales beta [*b]: int8 activations x int8 ternary weights, int32 accumulation, fp32 rescale."""
    w_int = unpack_ternary(packed, x.shape[-1])  # [*b, in, out] int8
    x_int, s_x = quantize_act(x, eps)
    y = _matmul(x_int.astype(jnp.int8), w_int, jnp.int32)
    beta = scale.astype(jnp.float32).reshape(scale.shape + (1, 1))
    return y.astype(jnp.float32) * _out_scale(beta, s_x, y.ndim)


# --------------------------------------------------------------------------------------------- module


class BitLinear(nn.Module):
    """Linear slot 'bitlinear': norm -> 8-bit activations x ternary/binary weights (see module doc)."""

    # config.model.bitlinear: weights ternary | binary; norm inside each BitLinear rms | layer | none |
    # sub (rms inside o and down only: transformers' BitNet);
    # warm-in lam ramps 0 -> 1 over warmin_steps global steps from warmin_start (0 steps: off); eps floors
    # mean|W| and the token absmax; packed: inference params written by inference/export_bitnet.py.
    CONFIG_KEY = "bitlinear"
    DEFAULTS = dict(weights="ternary", norm="rms", warmin_steps=0, warmin_start=0, eps=1e-5, packed=False)

    features: int
    kernel_axes: tuple[str, str] = ("embed", "mlp")
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    weights: str = "ternary"
    norm: str = "rms"
    eps: float = 1e-5  # floor of mean|W| and of the per-token absmax
    norm_eps: float = 1e-6
    warmin: tuple[int, int] = (0, 0)  # (start step, ramp steps); ramp 0: quantised from the start
    packed: bool = False  # inference params from voltron_jax/inference/export_bitnet.py

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = x.shape[-1]
        if self.inner_norm == "rms":
            h = RMSNorm(self.norm_eps, jnp.float32, name="norm")(x)  # [..., in] fp32
        else:
            h = normalize(x, self.inner_norm, eps=self.norm_eps)
        if self.packed:
            shape = (packed_rows(n_in), self.features)  # [ceil(in/4), out]
            zeros = nn.initializers.zeros
            packed = param_with_axes(self, "packed", zeros, shape, self.kernel_axes, jnp.uint8)
            scale = param_with_axes(self, "scale", nn.initializers.ones, (), ())
            return packed_apply(h, packed, scale, self.eps).astype(self.dtype)
        w = param_with_axes(
            self, "kernel", nn.initializers.normal(self.init_std), (n_in, self.features), self.kernel_axes
        )
        y = bitlinear_apply(h, w, weights=self.weights, eps=self.eps, lam=self._lambda(), dtype=self.dtype)
        return y.astype(self.dtype)

    @property
    def inner_norm(self) -> str:
        """The norm this projection applies: `norm`; for 'sub', 'rms' where the input is an inner
        activation (kernel_axes[0] != 'embed': o, down) and 'none' where it is the block's normed input."""
        if self.norm != "sub":
            return self.norm
        return "rms" if self.kernel_axes[0] != "embed" else "none"

    def _lambda(self) -> float | jax.Array:
        """Warm-in mix from the global step in the 'state' collection; 1 without warm-in or step."""
        if self.warmin[1] <= 0:
            return 1.0
        if self.is_initializing() and not self.has_variable(STATE, "step"):
            self.variable(STATE, "step", jnp.zeros, (), jnp.int32)
        return warmin_lambda(self.warmin, self.get_variable(STATE, "step"))

    def expert_shards(self, variables: dict, specs: dict, x: jax.Array) -> jax.Array | None:
        """E stacked experts on x [E,R,in] inside the expert-parallel shard_map (moe_groups), from the
        local shards `variables` laid out by `specs`: the weight operand is formed on the shard (beta
        from `sharding.shard_mean` over the whole matrix) and all-gathered in `dtype`, integer-valued
        bf16 rather than the fp32 latent kernel. Equals the stacked layer on the whole kernels. None for
        packed inference params (the caller gathers those uint8 codes whole)."""
        if self.packed:
            return None
        p, lam = variables["params"], warmin_lambda(self.warmin, variables.get(STATE, {}).get("step"))
        if self.inner_norm == "rms":
            gain = sharding.gather_whole(p["norm"]["scale"], specs["norm"]["scale"], jnp.float32)  # [E,in]
            h = normalize(x, "rms", gain[:, None, :], self.norm_eps)
        else:
            h = normalize(x, self.inner_norm, eps=self.norm_eps)
        spec = specs["kernel"]
        mean = lambda v: sharding.shard_mean(v, spec, (-2, -1))  # noqa: E731
        w_s, beta = weight_operand(p["kernel"], weights=self.weights, eps=self.eps, lam=lam, mean=mean)
        w_s = sharding.gather_whole(w_s, spec, self.dtype)  # [E,in,out]
        return operand_apply(h, w_s, beta, eps=self.eps, lam=lam, dtype=self.dtype).astype(self.dtype)

    @staticmethod
    def from_config(m) -> dict:
        """Module fields from config.model (and its `bitlinear` sub-dict)."""
        b = m.bitlinear
        return dict(
            weights=b.weights,
            norm=b.norm,
            eps=b.eps,
            norm_eps=m.norm_eps,
            warmin=(b.warmin_start, b.warmin_steps),
            packed=b.packed,
        )

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        """As Dense, nothing beyond the matmuls: quantisation and the norm are elementwise."""
        return 0.0

    @staticmethod
    def validate(config) -> None:
        """Reject unknown quantiser / norm names and impossible warm-in or eps values."""

        b = config.model.bitlinear
        if b.weights not in WEIGHTS:
            raise ConfigError(f"model.bitlinear.weights={b.weights!r} is not valid; choose one of {WEIGHTS}.")
        if b.norm not in NORMS:
            raise ConfigError(f"model.bitlinear.norm={b.norm!r} is not valid; choose one of {NORMS}.")
        if b.warmin_steps < 0 or b.warmin_start < 0:
            raise ConfigError("model.bitlinear.warmin_steps and warmin_start must be >= 0 (0 steps: off).")
        if not (b.eps > 0 and math.isfinite(b.eps)):
            raise ConfigError(f"model.bitlinear.eps={b.eps} must be a small positive number such as 1e-5.")
