"""Dense building blocks: Dense, RMSNorm, Embed, RoPE and the gated MLP (SwiGLU, or ReLU^2 as BitNet's).

Every projection in the model is built through the *linear slot*: a callable `linear(features,
kernel_axes, name=...)` that returns a module mapping [..., in] -> [..., features]. `Dense` is the
default; `bitlinear.BitLinear` has the same signature. Kernels are 2-D [in, out] with logical axis names
for the sharding rules (voltron_jax/sharding.py). Params are fp32; `dtype` is the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from voltron_jax import sharding
from voltron_jax.errors import ConfigError

Dtype = Any
MLP_ACTIVATIONS = ("silu", "relu2")


def param_with_axes(module: nn.Module, name: str, init, shape, axes, dtype=jnp.float32):
    """A param annotated with logical axis names (boxed for nn.get_partition_spec)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Dense(nn.Module):
    """y = x @ W, W: [in, features] fp32, computed in `dtype`. No bias (LLaMA style).

    Head-shaped projections (attention): `heads_out=H` returns [..., H, features / H] and `heads_in=H`
    takes x [..., H, in / H], each one contraction with the kernel viewed as [in, H, K] or [H, K, out].
    The parameter is the same [in, features] matrix and the values are the reshaped plain product's, but
    the TPU matmul then writes (or reads) the head layout itself: as x @ W plus a reshape, the 13B step
    relaid [B,T,H,K] q/k/v out of [B,T,H*K] in three copies per layer (docs/results.md, issue 27)."""

    features: int
    kernel_axes: tuple[str, str] = ("embed", "mlp")
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    heads_out: int = 0
    heads_in: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = x.shape[-1] * max(self.heads_in, 1)
        w = param_with_axes(
            self, "kernel", nn.initializers.normal(self.init_std), (n_in, self.features), self.kernel_axes
        )
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        if self.heads_out:
            w = w.reshape(n_in, self.heads_out, self.features // self.heads_out)  # [D,H,K]
            return jnp.einsum("...d,dhk->...hk", x, w)  # [...,H,K]
        if self.heads_in:
            w = w.reshape(self.heads_in, x.shape[-1], self.features)  # [H,K,D]
            return jnp.einsum("...hk,hkd->...d", x, w)  # [...,D]
        return jnp.dot(x, w)

    def expert_shards(self, variables: dict, specs: dict, x: jax.Array) -> jax.Array:
        """E stacked experts on x [E,R,in] inside the expert-parallel shard_map (moe_groups), from the local
        kernel shard laid out by `specs`: cast to `dtype` before the all-gather (a bf16 model moves half
        the bytes of its fp32 master weights). The same values as the stacked layer on the whole kernel."""
        w = sharding.gather_whole(variables["params"]["kernel"], specs["kernel"], self.dtype)  # [E,in,out]
        return jax.vmap(jnp.dot)(x.astype(self.dtype), w)

    # ------------------------------------------------------------------ linear slot (registry.LinearSlot)

    @staticmethod
    def from_config(m) -> dict:
        return {}

    @staticmethod
    def validate(config) -> None:
        del config

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        """Nothing beyond the matmuls (2 * in * out each), which the attention and ffn slots count."""
        return 0.0


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain (ones), statistics in fp32."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding [V, D] (fp32); `attend` reuses it as a tied LM head."""

    vocab_size: int
    features: int
    init_std: float = 0.02
    dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = param_with_axes(
            self,
            "embedding",
            nn.initializers.normal(self.init_std),
            (self.vocab_size, self.features),
            ("vocab", "embed"),
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Cast the table before the lookup (as MaxText does): in a bf16 model the lookup's cotangent, and
        # the all-to-all that brings it to the 'embed'-sharded table, are bf16 instead of fp32 [B,T,D].
        return jnp.take(self.embedding.astype(self.dtype), ids, axis=0)  # [B,T,D]

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.embedding.T.astype(self.dtype))  # [B,T,V]


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary embedding (rotate-half form) of x [B,T,H,K] at integer positions [B,T]. The angles and their
    sin/cos are fp32; the rotation runs in x's dtype (as MaxText's), so a bf16 model keeps no fp32 copies
    of q and k (13 of 160 MiB each per v4 chip in the 13B step, docs/results.md); fp32 models unchanged."""
    k = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))  # [K/2]
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B,T,K/2]
    sin = jnp.sin(ang)[:, :, None, :].astype(x.dtype)  # [B,T,1,K/2]
    cos = jnp.cos(ang)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., : k // 2], x[..., k // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [B,T,H,K]


class MLP(nn.Module):
    """Gated FFN: down(act(gate(x)) * up(x)), act SiLU (SwiGLU, the default) or ReLU^2 (relu(x)^2: the FFN
    of BitNet b1.58 2B4T and of transformers' BitNetForCausalLM). The `linear` slot builds all three
    projections."""

    # config.model.mlp: activation silu | relu2
    CONFIG_KEY = "mlp"
    DEFAULTS = dict(activation="silu")

    d_ff: int
    linear: Any = Dense  # callable(features, kernel_axes, name=...) -> module
    activation: str = "silu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        gate = self.linear(self.d_ff, ("embed", "mlp"), name="gate")(x)  # [B,T,F]
        up = self.linear(self.d_ff, ("embed", "mlp"), name="up")(x)  # [B,T,F]
        act = jnp.square(jax.nn.relu(gate)) if self.activation == "relu2" else jax.nn.silu(gate)
        h = nn.with_logical_constraint(act * up, ("act_batch", "act_seq", "act_mlp"))
        return self.linear(d, ("mlp", "embed"), name="down")(h)  # [B,T,D]

    # ------------------------------------------------------------------ ffn slot (registry.FFNSlot)

    @staticmethod
    def from_config(m) -> dict:
        return dict(activation=m.mlp.activation)

    @staticmethod
    def validate(config) -> None:
        """Reject an unknown activation name."""
        act = config.model.mlp.activation
        if act not in MLP_ACTIVATIONS:
            raise ConfigError(f"model.mlp.activation={act!r} is not valid; choose one of {MLP_ACTIVATIONS}.")

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        """Forward FLOPs per token: three D x F matmuls."""
        return 3 * 2.0 * m.d_model * m.d_ff
