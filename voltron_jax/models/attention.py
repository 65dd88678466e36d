"""Multi-head / grouped-query causal self-attention and the plain attention core.

An attention *module* (this `Attention`, or `moa.MixtureOfAttention`) owns the projections; an attention
*core* (the memory slot: `CausalCore` here, `infini_attention.InfiniCore`) turns pre-RoPE q, k, v into
the per-head output. Cores share one signature:

    core(q [B,T,H,K], k [B,T,G,K], v [B,T,G,K], positions [B,T], segment_ids [B,T] | None,
         valid [B,T] | None) -> [B,T,H,K]

`positions` are the tokens' original positions (RoPE), `segment_ids` the document ids in a packed row
(only used when documents are masked from each other), `valid` marks real tokens: invalid ones are
never keys (padding; tokens a routed layer skipped at decode time). With `decode=True` the core keeps a
KV cache in the 'cache' collection, created by an `init` call at the maximum length.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from voltron_jax.models import splash
from voltron_jax.models.layers import Dense, rope

Dtype = Any
# CausalCore's q and k after RoPE: remat 'dots_no_batch_rotated' keeps them (decoder.REMAT_POLICIES), so the
# backward does not redo the rotation from the projections' saved outputs (as MaxText's 'minimal', which
# names query_proj/key_proj after RoPE).
ROTATED = "rotated_qk"


def causal_mask(segment_ids: jax.Array | None, t: int) -> jax.Array | None:
    """[B,1,T,T] causal & same-document mask, or None (pure causal) when segment_ids is None."""
    if segment_ids is None:
        return None
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B,T,T]
    return (same & jnp.tril(jnp.ones((t, t), bool)))[:, None]


def attend(q, k, v, mask=None, is_causal=False, impl: str = "xla") -> jax.Array:
    """jax.nn.dot_product_attention with grouped KV heads; 'auto' lets JAX pick (cuDNN on GPU)."""
    implementation = None if impl in ("auto", "splash") else impl  # splash: see causal_attention
    if implementation == "cudnn" and (mask is not None or q.dtype == jnp.float32):
        implementation = None  # cuDNN wants bf16 and no explicit mask; fall back rather than fail
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal and mask is None, implementation=implementation
    )


def causal_attention(q, k, v, segment_ids=None, valid=None, impl: str = "xla") -> jax.Array:
    """Causal attention over whole rows, the one entry of every core's training-time attention:
    q [B,T,H,K], k/v [B,T,G,K]; segment_ids [B,T] keep documents apart; invalid keys are never seen.
    On TPU ('auto') or with impl='splash' it runs the Pallas splash kernel (models/splash.py)."""

    if splash.selected(impl, q.shape[1]):
        return splash.causal_attention(q, k, v, segment_ids, valid)
    mask = causal_mask(segment_ids, q.shape[1])
    if valid is not None:
        causal = jnp.tril(jnp.ones((q.shape[1],) * 2, bool))[None, None]
        mask = (causal if mask is None else mask) & valid[:, None, None, :]
    return attend(q, k, v, mask=mask, is_causal=True, impl=impl)


class CausalCore(nn.Module):
    """RoPE then causal softmax attention over the whole row (memory slot 'none')."""

    rope_theta: float = 10000.0
    impl: str = "xla"
    decode: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q, k, v, positions, segment_ids=None, valid=None):
        q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        q, k = checkpoint_name(q, ROTATED), checkpoint_name(k, ROTATED)
        if self.decode:
            return self._cached(q, k, v, valid)
        return causal_attention(q, k, v, segment_ids, valid, self.impl)

    def _cached(self, q, k, v, valid):
        """KV cache of fixed length L; per row, valid tokens are appended in order."""
        b, t = q.shape[:2]
        filled = self.has_variable("cache", "k")
        ck = self.variable("cache", "k", jnp.zeros, k.shape, k.dtype)  # [B,L,G,K]
        cv = self.variable("cache", "v", jnp.zeros, v.shape, v.dtype)
        idx = self.variable("cache", "index", lambda: jnp.zeros((b,), jnp.int32))
        if not filled:  # the init call only shapes the cache
            return attend(q, k, v, is_causal=True, impl=self.impl)
        valid = jnp.ones((b, t), bool) if valid is None else valid
        slot = idx.value[:, None] + jnp.cumsum(valid, axis=1) - 1  # [B,T] cache slot of each token
        length = ck.value.shape[1]
        write = jax.nn.one_hot(jnp.where(valid, slot, -1), length, dtype=k.dtype)  # [B,T,L]
        keep = 1 - jnp.sum(write, axis=1)[..., None, None]  # [B,L,1,1]
        ck.value = ck.value * keep + jnp.einsum("btl,btgk->blgk", write, k)
        cv.value = cv.value * keep + jnp.einsum("btl,btgk->blgk", write, v)
        visible = jnp.arange(length)[None, None, :] <= slot[:, :, None]  # [B,T,L]
        idx.value = idx.value + jnp.sum(valid, axis=1).astype(jnp.int32)
        return attend(q, ck.value, cv.value, mask=visible[:, None], impl=self.impl)

    # ------------------------------------------------------------------ memory slot (registry.MemorySlot)

    @staticmethod
    def from_config(m) -> dict:
        return {}

    @staticmethod
    def validate(config) -> None:
        del config

    @staticmethod
    def segment_len_of(m) -> int:
        """Attention over the whole row: no segments."""
        return 0

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        """QK^T and AV over a causal window: 2 * 2 * T * H * K per token, halved for causality."""
        return 2.0 * seq_len * m.n_heads * head_dim(m)


def head_dim(m) -> int:
    return m.head_dim or m.d_model // m.n_heads


class Attention(nn.Module):
    """q, k, v projections (GQA when n_kv_heads < n_heads), an attention core, and the output projection."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    core: Any = CausalCore  # callable(name=...) -> core module
    linear: Any = Dense

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, valid=None):
        b, t, d = x.shape
        h, g, k = self.n_heads, self.n_kv_heads, self.head_dim
        if getattr(self.linear, "func", self.linear) is Dense:  # head-shaped matmuls, no relayout copies
            q = self.linear(h * k, ("embed", "heads"), name="q", heads_out=h)(x)  # [B,T,H,K]
            kk = self.linear(g * k, ("embed", "kv_heads"), name="k", heads_out=g)(x)  # [B,T,G,K]
            v = self.linear(g * k, ("embed", "kv_heads"), name="v", heads_out=g)(x)  # [B,T,G,K]
            out = lambda o: self.linear(d, ("heads", "embed"), name="o", heads_in=h)(o)  # [B,T,D]
        else:  # other linear slots (BitLinear) take and give [..., features]
            q = self.linear(h * k, ("embed", "heads"), name="q")(x).reshape(b, t, h, k)  # [B,T,H,K]
            kk = self.linear(g * k, ("embed", "kv_heads"), name="k")(x).reshape(b, t, g, k)  # [B,T,G,K]
            v = self.linear(g * k, ("embed", "kv_heads"), name="v")(x).reshape(b, t, g, k)  # [B,T,G,K]
            out = lambda o: self.linear(d, ("heads", "embed"), name="o")(o.reshape(b, t, h * k))  # [B,T,D]
        q = nn.with_logical_constraint(q, ("act_batch", "act_seq", "act_heads", None))
        return out(self.core(name="core")(q, kk, v, positions, segment_ids, valid))  # [B,T,H,K] -> [B,T,D]

    # ----------------------------------------------------------- attention slot (registry.AttentionSlot)

    @staticmethod
    def from_config(m) -> dict:
        return {}

    @staticmethod
    def validate(config) -> None:
        del config

    @staticmethod
    def core_head_factor(m) -> int:
        """The core sees the n_heads query heads."""
        return 1

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        """Projection FLOPs per token (the core's own FLOPs come from the memory slot)."""
        k = head_dim(m)
        return 2.0 * m.d_model * k * (2 * m.n_heads + 2 * m.n_kv_heads)
