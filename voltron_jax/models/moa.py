"""Mixture of Attention heads, JetMoE style (attention slot 'moa').

Papers: JetMoE (arXiv 2404.07413, section 2.3; normative here), Mixture of Attention Heads (Zhang et
al., arXiv 2210.05144). Spec: techniques-b.md section 6 (6.2 head layout, 6.4 BTX-style upcycling).

Implemented: K and V projections shared by all experts (the dense attention's `k`, `v`: G KV heads); E
attention experts, each with its own query projection q [E,D,H*K] and output projection o [E,H*K,D] (H
query heads per expert over the G shared KV heads: GQA inside an expert, JetMoE's H = G as a special
case); an fp32 router [D,E] picks the top-k experts per token, gates are renormalised over them (softmax
of the chosen logits, so identical experts give the dense attention for any router); aux losses
`aux_loss/moa_lb` and `aux_loss/moa_z` and the drop rate `stats/moa_drop_rate` as in moe.py. The k chosen
experts' queries form one call of the attention core (the memory slot) with P*H query heads, so RoPE, the
KV cache (G shared heads) and Infini-attention (one compressive memory per KV head) compose unchanged. Q
and O experts are the linear slot vmapped over the expert axis and use the dispatch implementations of
dispatch.py (moe.IMPLS).

Head layout (spec 6.2 pitfall): cores group query head j with KV head j // (P*H/G) (interleaved GQA).
Expert-slot s head h = g*(H/G) + r must meet KV head g, so core heads are ordered [G, P, H/G]:
j = g*(P*H/G) + s*(H/G) + r, not JetMoE's slot-major s*H + h (which pairs with `repeat`, not interleave).
Deviations: with capacity dispatch an overflowing (token, expert) pick is dropped (its query is zero and
its output is not added); use impl='dropless' or a capacity factor >= E/top_k to avoid it, and for
decoding (drops depend on how many tokens a call sees). A core's per-query-head params (Infini's gate
beta) get P*H entries, one per (pick, head), not one per expert head: the core cannot see which expert
a pick holds; surgery tiles the dense values. No attention output bias (the codebase has no biases).
Shape letters beyond the house set: A = B*T tokens, P = top-k picks.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from voltron_jax.models import moe
from voltron_jax.models.attention import CausalCore, head_dim
from voltron_jax.models.dispatch import drop_rate
from voltron_jax.models.layers import Dense


def to_core_heads(q: jax.Array, n_kv_heads: int) -> jax.Array:
    """[B,T,P,H,K] per-pick query heads -> [B,T,P*H,K] ordered (kv head, pick, head in group)."""
    b, t, p, h, k = q.shape
    q = q.reshape(b, t, p, n_kv_heads, h // n_kv_heads, k).transpose(0, 1, 3, 2, 4, 5)  # [B,T,G,P,H/G,K]
    return q.reshape(b, t, p * h, k)


def from_core_heads(o: jax.Array, top_k: int, n_kv_heads: int) -> jax.Array:
    """Inverse of `to_core_heads`: [B,T,P*H,K] -> [B,T,P,H,K]."""
    b, t, ph, k = o.shape
    o = o.reshape(b, t, n_kv_heads, top_k, ph // (top_k * n_kv_heads), k).transpose(0, 1, 3, 2, 4, 5)
    return o.reshape(b, t, top_k, ph // top_k, k)


class MixtureOfAttention(nn.Module):
    """x [B,T,D] -> [B,T,D]: shared K/V, top-k of E query/output experts per token."""

    # config.model.moa: as config.model.moe (the same dispatch implementations and router), for the
    # query/output experts (capacity_factor 2.0 by default).
    CONFIG_KEY = "moa"
    DEFAULTS = dict(n_experts=8, top_k=2, impl="capacity", capacity_factor=2.0, router_init_std=0.02)
    AUX_LOSSES = dict(moa_lb=0.01, moa_z=1e-3)
    RUNTIME_FIELDS = ("impl", "capacity_factor")
    METRICS = dict(moa_drop_rate="MoA")
    PARAM_GROUPS = ((("router",), "router"),)
    SHARDING_RULES = moe.MoE.SHARDING_RULES

    n_heads: int  # query heads per expert
    n_kv_heads: int
    head_dim: int
    core: Any = CausalCore  # callable(name=...) -> core module (the memory slot)
    linear: Any = Dense
    n_experts: int = 8
    top_k: int = 2
    impl: str = "capacity"
    capacity_factor: float = 1.25
    router_init_std: float = 0.02

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, valid=None):
        x = jnp.asarray(x)  # NumPy inputs outside jit
        b, t, d = x.shape
        h, g, k, p, e = self.n_heads, self.n_kv_heads, self.head_dim, self.top_k, self.n_experts
        impl = moe.get_impl(self.impl)
        rows = x.reshape(b * t, d)  # [A,D]
        r = moe.route(self, rows, e, p, self.router_init_std, "moa")
        plan = impl.plan(r.experts.reshape(b, t, p), e, self.capacity_factor)
        self.sow("stats", "moa_drop_rate", drop_rate(plan))
        q = impl.project(
            self, self.linear, e, h * k, ("embed", "heads"), impl.dispatch(plan, rows, True), plan, "q"
        )
        q = impl.combine(plan, q, shared=True).reshape(b, t, p, h, k)  # [B,T,P,H,K]
        kk = self.linear(g * k, ("embed", "kv_heads"), name="k")(x).reshape(b, t, g, k)  # [B,T,G,K]
        v = self.linear(g * k, ("embed", "kv_heads"), name="v")(x).reshape(b, t, g, k)  # [B,T,G,K]
        q = nn.with_logical_constraint(to_core_heads(q, g), ("act_batch", "act_seq", "act_heads", None))
        o = self.core(name="core")(q, kk, v, positions, segment_ids, valid)  # [B,T,P*H,K]
        o = from_core_heads(o, p, g).reshape(b * t * p, h * k)  # [A*P,H*K]
        y = impl.project(
            self, self.linear, e, d, ("heads", "embed"), impl.dispatch(plan, o, False), plan, "o"
        )
        return moe.weighted_sum(r.gates, impl.combine(plan, y, shared=False)).reshape(b, t, d)

    @staticmethod
    def from_config(m) -> dict:
        c = m.moa
        return dict(
            n_experts=c.n_experts,
            top_k=c.top_k,
            impl=c.impl,
            capacity_factor=c.capacity_factor,
            router_init_std=c.router_init_std,
        )

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        """ACTIVE projection FLOPs per token: router, shared K/V, top_k experts' Q and O."""
        k = head_dim(m)
        kv = 2 * 2.0 * m.d_model * m.n_kv_heads * k
        return 2.0 * m.d_model * m.moa.n_experts + kv + m.moa.top_k * 2 * 2.0 * m.d_model * m.n_heads * k

    @staticmethod
    def core_head_factor(m) -> int:
        """The core attends with top_k * n_heads query heads (decoder.flops_per_token scales by this)."""
        return m.moa.top_k

    @staticmethod
    def validate(config) -> None:
        moe.check_routing(config, "moa")
