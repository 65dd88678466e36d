"""Infini-attention: segment-local causal attention plus a compressive memory per layer.

Paper: "Leave No Context Behind: Efficient Infinite Context Transformers with Infini-attention",
Munkhdalai, Faruqui, Gopal, arXiv 2404.07143 (spec: docs/specs/techniques-a.md section 2).

What is implemented (memory slot 'infini', the same core signature as attention.CausalCore):
  - the row is split into S segments of N tokens; inside a segment, causal dot-product attention with
    RoPE (document mask too when segment_ids are given);
  - across segments, one memory M [K,V] and normaliser z [K] per KV head (GQA: every query head of a
    group reads its KV head's memory), built from PRE-RoPE sigma(q), sigma(k), sigma = ELU + 1;
  - retrieve with the previous state, A_mem = sigma(q) M / (sigma(q) z), then update: 'linear'
    M += sigma(k)^T v, or 'delta' M += sigma(k)^T (v - sigma(k) M / (sigma(k) z)); z += sum sigma(k);
  - A = sigmoid(beta_h) A_mem + (1 - sigmoid(beta_h)) A_dot, one fp32 gate 'beta' per query head (the
    optimizer gives params named 'beta' optim.gate_lr and no weight decay);
  - 'linear' without a scan: per-segment updates and an exclusive prefix sum over segments; 'delta'
    with lax.scan over segments and jax.checkpoint per segment; gradients flow through the memory
    across all segments of the row (full BPTT within a row);
  - streaming decode: the 'cache' collection holds the current segment's pre-RoPE keys, values and
    positions (at most N tokens) and the folded (M, z); a segment is folded into memory when it fills.

Choices and deviations:
  - First segment (M = z = 0, A_mem = 0/0; unspecified in the paper): first_segment='skip' (default,
    convention (a)) returns A_dot unchanged while a row has written nothing; 'eps' (convention (b))
    divides by sigma(q) z + 1e-6, giving (1 - sigmoid(beta)) A_dot on the first segment.
  - Memory resets per packed row, not per document (In-Context Pretraining packs related documents
    on purpose); segment_ids only mask the local attention. Padded (valid=False) tokens write nothing
    and are never keys. In the full forward, segment phase is the position in the row (T % N == 0);
    while streaming, only valid tokens advance it, so right-padded rows stream identically.
  - rule='none' keeps everything except the memory (no read, no write, no beta): the segment-local
    twin used as the passkey baseline.
  - The softmax scale is 1/sqrt(d_head) (the paper writes d_model).
  - sigma(q), sigma(k), M, z, the division and the gate mix are fp32 whatever the compute dtype, and the
    memory einsums ask for Precision.HIGHEST (z grows with every token; bf16 overflows, Beomi #21).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from voltron_jax.errors import ConfigError
from voltron_jax.models.attention import causal_attention, head_dim
from voltron_jax.models.layers import param_with_axes, rope

RULES = ("linear", "delta", "none")
FIRST_SEGMENT = ("skip", "eps")
EPS = 1e-6  # convention (b) only
# Memory einsums run at full fp32 (TPUs default to bf16 passes for fp32 matmuls, GPUs to TF32).
fp32_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def sigma(x: jax.Array) -> jax.Array:
    """The positive feature map ELU(x) + 1, in fp32."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def segment_update(sk: jax.Array, v: jax.Array, mem: jax.Array, norm: jax.Array, rule: str):
    """One segment's memory increment. sk [...,N,G,K], v [...,N,G,V], state mem [...,G,K,V], norm [...,G,K].

    Returns (dM [...,G,K,V], dz [...,G,K]). Rows with sk = 0 (padding) add nothing."""
    if rule == "delta":
        num = fp32_einsum("...ngk,...gkv->...ngv", sk, mem)
        den = fp32_einsum("...ngk,...gk->...ng", sk, norm)[..., None]
        v = v - num / jnp.where(den > 0, den, 1.0)  # empty memory or padding: retrieved value 0
    return fp32_einsum("...ngk,...ngv->...gkv", sk, v), jnp.sum(sk, axis=-3)


def read(sq: jax.Array, mem: jax.Array, norm: jax.Array, first_segment: str):
    """A_mem = sigma(q) M / (sigma(q) z). sq [...,N,G,R,K] -> ([...,N,G,R,V], has [...,G]).

    `has` marks states that hold something; under 'skip' the caller ignores A_mem where it is False."""
    num = fp32_einsum("...ngrk,...gkv->...ngrv", sq, mem)
    den = fp32_einsum("...ngrk,...gk->...ngr", sq, norm)[..., None]
    has = jnp.sum(norm, axis=-1) > 0
    if first_segment == "eps":
        return num / (den + EPS), jnp.ones_like(has)
    return num / jnp.where(has[..., None, :, None, None], den, 1.0), has


def memory_prefix(sq, sk, v, state, fold, first_segment: str):
    """Linear rule without a recurrence: exclusive prefix sum of per-segment updates.

    sq [B,S,N,G,R,K], sk [B,S,N,G,K], v [B,S,N,G,V]; state (M [B,G,K,V], z [B,G,K]) before segment 0;
    fold [B,S]: segments folded into the returned state (a streaming row's open segment is not).
    Returns A_mem [B,S,N,G,R,V], has [B,S,G], (M, z) after the folded segments."""
    mem0, norm0 = state
    dm, dz = segment_update(sk, v, None, None, "linear")  # [B,S,G,K,V], [B,S,G,K]
    dm, dz = dm * fold[..., None, None, None], dz * fold[..., None, None]
    cm, cz = jnp.cumsum(dm, axis=1), jnp.cumsum(dz, axis=1)
    shift = lambda c: jnp.concatenate([jnp.zeros_like(c[:, :1]), c[:, :-1]], axis=1)
    mem = mem0[:, None] + shift(cm)  # [B,S,G,K,V] state before each segment
    norm = norm0[:, None] + shift(cz)
    a, has = read(sq, mem, norm, first_segment)
    return a, has, (mem0 + cm[:, -1], norm0 + cz[:, -1])


def memory_scan(sq, sk, v, state, fold, first_segment: str, rule: str):
    """Either rule as a lax.scan over segments (rematerialised per segment); same contract as
    memory_prefix. Only the per-segment reads are stacked, never the S memory states."""

    @jax.checkpoint
    def step(carry, xs):
        mem, norm = carry
        sq_s, sk_s, v_s, f = xs
        a, has = read(sq_s, mem, norm, first_segment)
        dm, dz = segment_update(sk_s, v_s, mem, norm, rule)
        return (mem + dm * f[:, None, None, None], norm + dz * f[:, None, None]), (a, has)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (sq, sk, v, fold))
    state, (a, has) = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(a, 0, 1), jnp.moveaxis(has, 0, 1), state


def local_attention(qr, kr, v, key_ok, segment_ids, n: int, impl: str) -> jax.Array:
    """Causal attention inside each segment of n tokens: the rows are folded to [B*S,N] and go through
    attention.causal_attention (XLA, or the splash kernel on TPU). qr [B,T,H,K], kr/v [B,T,G,K] post-RoPE;
    key_ok [B,T] bool or None; segment_ids [B,T] or None (document mask). Returns [B,T,H,K]."""
    b, t = qr.shape[:2]
    seg = lambda x: None if x is None else x.reshape(b * (t // n), n, *x.shape[2:])  # [B*S,N,...]
    return causal_attention(seg(qr), seg(kr), seg(v), seg(segment_ids), seg(key_ok), impl).reshape(qr.shape)


def stream_buffer(old, new, slot, off, width: int) -> jax.Array:
    """The segment-aligned [B,W,...] row of one streaming call: the first `off` [B] cached entries of
    `old` [B,N,...] (None: nothing cached) at [0, off), then `new` [B,T,...] at `slot` [B,T] (slots
    >= W are dropped)."""
    b = slot.shape[0]
    base = jnp.zeros((b, width) + new.shape[2:], new.dtype)
    if old is not None:
        n = old.shape[1]
        keep = (jnp.arange(n)[None] < off[:, None]).reshape((b, n) + (1,) * (old.ndim - 2))
        base = base.at[:, :n].set(jnp.where(keep, old, jnp.zeros_like(old)))
    return base.at[jnp.arange(b)[:, None], slot].set(new, mode="drop")


class InfiniCore(nn.Module):
    """Memory slot 'infini': (q [B,T,H,K], k, v [B,T,G,K] pre-RoPE, positions, segment_ids, valid) ->
    [B,T,H,K]. With decode=True it streams: any number of tokens per call, state in 'cache'."""

    # config.model.infini: rule linear | delta | none (segment-local twin, no memory); gate_init = beta at
    # init (0 from scratch, about -5 for continual training); first_segment skip (memory term off while
    # empty) | eps (divide by sigma(q) z + eps). The gate beta has its own lr (optim.gate_lr), no decay.
    CONFIG_KEY = "infini"
    DEFAULTS = dict(segment_len=64, rule="linear", gate_init=0.0, first_segment="skip")
    PARAM_GROUPS = ((("core", "beta"), "gate"),)
    SHARDING_RULES = (("gate", None),)

    rope_theta: float = 10000.0
    impl: str = "xla"
    decode: bool = False
    dtype: Any = jnp.float32
    segment_len: int = 64
    rule: str = "linear"  # linear | delta | none (segment-local twin: no memory)
    gate_init: float = 0.0  # beta at init; sigmoid(0) = 0.5 from scratch, about -5 for continual training
    first_segment: str = "skip"  # skip (convention (a)) | eps (convention (b))

    @nn.compact
    def __call__(self, q, k, v, positions, segment_ids=None, valid=None):
        if self.rule not in RULES or self.first_segment not in FIRST_SEGMENT:
            raise ValueError(
                f"InfiniCore: rule={self.rule!r} must be one of {RULES} and "
                f"first_segment={self.first_segment!r} one of {FIRST_SEGMENT}."
            )
        if self.decode:
            return self._stream(q, k, v, positions, valid)
        b, t = q.shape[:2]
        if t % self.segment_len:
            raise ValueError(
                f"InfiniCore: sequence length {t} is not a multiple of model.infini.segment_len="
                f"{self.segment_len}; pad the input or change data.seq_len / segment_len."
            )
        state = self._zero_state(b, k.shape[2], q.shape[3], v.shape[3])
        fold = jnp.ones((b, t // self.segment_len), bool)
        out, _ = self._segments(q, k, v, positions, valid, segment_ids, state, fold)
        return out

    def _zero_state(self, b: int, g: int, kd: int, vd: int):
        return jnp.zeros((b, g, kd, vd), jnp.float32), jnp.zeros((b, g, kd), jnp.float32)

    def _segments(self, q, k, v, positions, ok, segment_ids, state, fold):
        """Segment-aligned rows (T = S N): local attention + memory from `state`; fold [B,S] marks the
        segments folded into the returned state. Returns ([B,T,H,K], state)."""
        b, t, h, kd = q.shape
        g, vd, n = k.shape[2], v.shape[3], self.segment_len
        s, r = t // n, h // g
        qr, kr = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        a_dot = local_attention(qr, kr, v, ok, segment_ids, n, self.impl)  # [B,T,H,K]
        if self.rule == "none":
            return a_dot, state
        beta = param_with_axes(self, "beta", nn.initializers.constant(self.gate_init), (h,), ("gate",))
        sq = sigma(q).reshape(b, s, n, g, r, kd)  # [B,S,N,G,R,K]
        sk = sigma(k) if ok is None else sigma(k) * ok[:, :, None, None]  # padding writes nothing
        sk = sk.reshape(b, s, n, g, kd)  # [B,S,N,G,K]
        v32 = v.astype(jnp.float32).reshape(b, s, n, g, vd)
        if self.rule == "linear":
            a_mem, has, state = memory_prefix(sq, sk, v32, state, fold, self.first_segment)
        else:
            a_mem, has, state = memory_scan(sq, sk, v32, state, fold, self.first_segment, self.rule)
        gate = jax.nn.sigmoid(beta.astype(jnp.float32)).reshape(g, r, 1)  # [G,R,1]
        a_dot = a_dot.astype(jnp.float32).reshape(a_mem.shape)
        mixed = gate * a_mem + (1.0 - gate) * a_dot  # [B,S,N,G,R,V]
        out = jnp.where(has[:, :, None, :, None, None], mixed, a_dot)
        return out.reshape(b, t, h, vd).astype(self.dtype), state

    def _stream(self, q, k, v, positions, valid):
        """Decode: the cached open segment and the new tokens are laid out in a segment-aligned buffer
        (cached tokens first), run through `_segments` from the folded state, and the segments that
        fill up are folded into (M, z); the still-open segment becomes the new cache."""
        b, t, h, kd = q.shape
        g, vd, n = k.shape[2], v.shape[3], self.segment_len
        filled = self.has_variable("cache", "k")
        ck = self.variable("cache", "k", jnp.zeros, (b, n, g, kd), k.dtype)  # pre-RoPE
        cv = self.variable("cache", "v", jnp.zeros, (b, n, g, vd), v.dtype)
        cpos = self.variable("cache", "positions", jnp.zeros, (b, n), jnp.int32)
        idx = self.variable("cache", "index", jnp.zeros, (b,), jnp.int32)  # valid tokens consumed
        state = self._zero_state(b, g, kd, vd)
        if self.rule != "none":
            mem = self.variable("cache", "mem", lambda: state[0])
            norm = self.variable("cache", "norm", lambda: state[1])
            state = (mem.value, norm.value)
        valid = jnp.ones((b, t), bool) if valid is None else valid
        off = idx.value % n  # [B] tokens of the open segment in the cache
        count = jnp.sum(valid, axis=1).astype(jnp.int32)
        s = (n + t - 2) // n + 1  # buffer segments: room for off + t tokens
        slot = jnp.where(valid, off[:, None] + jnp.cumsum(valid, axis=1) - 1, s * n)  # [B,T]; -> dropped
        buffer = lambda old, new: stream_buffer(old, new, slot, off, s * n)
        ok = buffer(jnp.ones((b, n), bool), valid)  # [B,S*N] cached or new valid token
        pos = buffer(cpos.value, positions.astype(jnp.int32))
        kb, vb, qb = buffer(ck.value, k), buffer(cv.value, v), buffer(None, q)
        end = (off + count) // n  # [B] index of the open segment after this call
        fold = jnp.arange(s)[None] < end[:, None]  # [B,S]
        out, state = self._segments(qb, kb, vb, pos, ok, None, state, fold)
        y = jnp.take_along_axis(out, jnp.minimum(slot, s * n - 1)[:, :, None, None], axis=1)  # [B,T,H,K]
        if filled:  # the init call only shapes the cache
            take = jnp.minimum(end[:, None] * n + jnp.arange(n), s * n - 1)  # [B,N] the open segment
            ck.value = jnp.take_along_axis(kb, take[:, :, None, None], axis=1)
            cv.value = jnp.take_along_axis(vb, take[:, :, None, None], axis=1)
            cpos.value = jnp.take_along_axis(pos, take, axis=1)
            idx.value = idx.value + count
            if self.rule != "none":
                mem.value, norm.value = state
        return y

    # ------------------------------------------------------------------ slot hooks

    @staticmethod
    def from_config(m) -> dict:
        """Module fields taken from config.model.infini."""
        i = m.infini
        return dict(
            segment_len=i.segment_len, rule=i.rule, gate_init=i.gate_init, first_segment=i.first_segment
        )

    @staticmethod
    def validate(config) -> None:
        """Reject infini configs that cannot run (raised before any compile)."""

        i, n = config.model.infini, config.model.infini.segment_len
        if i.rule not in RULES:
            raise ConfigError(f"model.infini.rule={i.rule!r} is not valid; choose one of {RULES}.")
        if i.first_segment not in FIRST_SEGMENT:
            raise ConfigError(
                f"model.infini.first_segment={i.first_segment!r} is not valid; choose one of {FIRST_SEGMENT}."
            )
        if n <= 0 or config.data.seq_len % n:
            raise ConfigError(
                f"data.seq_len={config.data.seq_len} must be a positive multiple of "
                f"model.infini.segment_len={n}; change one of them."
            )

    @staticmethod
    def segment_len_of(m) -> int:
        """Tokens per segment: local attention and one memory update each."""
        return m.infini.segment_len

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        """Forward FLOPs per token of one layer's core: causal local attention within a segment
        (2 * N * H * K, i.e. QK^T + AV at half for causality), the memory read (sigma(q) M and
        sigma(q) z per query head) and the update (sigma(k)^T v and z per KV head; delta adds a read)."""
        i, k, h, g = m.infini, head_dim(m), m.n_heads, m.n_kv_heads
        local = 2.0 * min(i.segment_len, seq_len) * h * k
        if i.rule == "none":
            return local
        mem_read = h * (2.0 * k * k + 2.0 * k)
        mem_write = g * (2.0 * k * k + k) + (g * (2.0 * k * k + 2.0 * k) if i.rule == "delta" else 0.0)
        return local + mem_read + mem_write

    @staticmethod
    def memory_floats(m) -> int:
        """Compressive-memory floats per layer and sequence: d_k (d_v + 1) G (paper Table 1)."""
        k = head_dim(m)
        return k * (k + 1) * m.n_kv_heads
