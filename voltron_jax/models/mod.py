"""Mixture-of-Depths: "Mixture-of-Depths: Dynamically allocating compute in transformer-based language
models" (Raposo et al., arXiv 2404.02258). Routing slot 'mod'.

What is implemented (spec: docs/specs/techniques-a.md section 4):
  - Expert-choice routing on every `mod.every`-th block (layers i with i % every == every - 1, so the
    first block always sees every token): a linear fp32 router r = w^T x scores each token; per sequence
    the top k = int(c * T) tokens are selected (exact capacity, static shapes), their indices sorted to
    keep causal order. The block runs only on those k tokens, with their original positions (RoPE),
    gathered segment ids (document mask) and a plain causal mask among them (valid because sorted).
  - x_new = x + w(r) * (block(x_sel) - x_sel) at selected positions: the router weight multiplies the
    block's update, not the residual (the OLMo fork's scatter_add double-counts x), which is the
    router's only gradient path. w = sigmoid(r) (default, bounded) or the raw logit r (the paper).
    Unselected positions are returned bit-identical.
  - Dispatch: gathers through the selection and its inverse map ('gather'; no scatter in either
    direction) or one-hot einsums with precision HIGHEST ('onehot', the TPU-friendly form under
    sharding). Integer metadata is always gathered.
  - Causal sampling (top-k over the sequence is non-causal), both fixes of paper section 3.5:
    causal='aux_loss': BCE on the router logits with top-k membership targets (sown as 'mod_router');
    causal='predictor': a small fp32 MLP on stop_gradient(x) trained with BCE (sown as 'mod_predictor';
    no gradient reaches the backbone). Targets are built per row (the OLMo fork flattens [B*T] and
    sends every row's selection to row 0). Routing accuracy vs top-k is sown as
    intermediates/'mod_route_acc' and 'mod_route_recall' (share of top-k tokens the causal rule keeps);
    when routing causally, the routed fraction as 'mod_routed_frac'.
  - route_by='causal' (and always at decode): a token is routed when the predictor logit (or the
    router logit, for 'aux_loss') is > 0, i.e. sigmoid > 0.5. The block then runs on all tokens with
    valid = routed, so unrouted tokens are neither keys nor cache entries (attention.CausalCore's
    `valid`), and jnp.where keeps unrouted positions unchanged: decoding token by token equals this
    full forward.
  - With Infini-attention the top-k is taken per segment of model.infini.segment_len tokens, and the
    routed block's core runs with segment_len = k per segment, so gathered segment s holds exactly the
    routed tokens of segment s and only they write the memory.

Deviations: the predictor normalises its input (parameter-free RMS) before its ReLU MLP, for a
well-conditioned tiny classifier; the paper gives no predictor architecture. Routing decode with
Infini-attention is refused: the streaming InfiniCore folds every N *valid* tokens while MoD training
segments by position.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from voltron_jax import registry
from voltron_jax.errors import ConfigError
from voltron_jax.models import dispatch
from voltron_jax.models.layers import param_with_axes

ROUTER_WEIGHTS = ("sigmoid", "logit")
CAUSAL = ("aux_loss", "predictor")
ROUTE_BY = ("topk", "causal")
DISPATCH = ("gather", "onehot")
HIGHEST = jax.lax.Precision.HIGHEST


def select_topk(logits: jax.Array, k: int, segment_len: int = 0, valid: jax.Array | None = None):
    """Top-k per row (or per segment of `segment_len`) of logits [B,T].

    Returns (idx [B,C] ascending, C = k * segments; targets [B,T] fp32, 1 at selected positions).
    Invalid tokens are chosen last."""
    b, t = logits.shape
    if valid is not None:
        logits = jnp.where(valid, logits, -jnp.inf)
    n = segment_len or t
    _, idx = jax.lax.top_k(logits.reshape(b, t // n, n), k)  # [B,S,k]
    idx = jnp.sort(idx, axis=-1) + (jnp.arange(t // n, dtype=idx.dtype) * n)[None, :, None]
    idx = idx.reshape(b, -1)  # [B,C]
    return idx, membership(idx, t)


def inverse(idx: jax.Array, t: int) -> jax.Array:
    """Per-row inverse of a selection idx [B,C] (unique per row) -> [B,T]: c where idx[b,c] == t, C where
    token t is not selected. A sort and a binary search per row (dispatch.invert), no scatter."""
    return jax.vmap(lambda i: dispatch.invert(i, t))(idx)


def membership(idx: jax.Array, t: int) -> jax.Array:
    """[B,T] fp32 top-k targets from per-row indices [B,C]."""
    return (inverse(idx, t) < idx.shape[1]).astype(jnp.float32)


def _rows(x: jax.Array, fwd: jax.Array, bwd: jax.Array) -> jax.Array:
    """out[b,m] = x[b,fwd[b,m]] (0 where out of range) for x [B,N,...], fwd [B,M], bwd [B,N] the inverse
    map of fwd: dispatch.gather_rows per row, whose backward is a gather too."""
    b, n = x.shape[:2]
    out = jax.vmap(lambda v, f, g: dispatch.gather_rows(v, f, g, 1))(x.reshape(b, n, -1), fwd, bwd)
    return out.reshape(fwd.shape + x.shape[2:])  # [B,M,...]


def gather_rows(x: jax.Array, idx: jax.Array, onehot: bool) -> jax.Array:
    """x [B,T,...] at idx [B,C] -> [B,C,...]. Float rows move by a gather whose backward gathers as well
    (take_along_axis's backward is a scatter-add: serialised on TPU/GPU, and libtpu's cost model prices it
    at a -2 s sentinel; docs/results.md, issue 18); integer metadata has no gradient and is taken."""
    if onehot:
        d = jax.nn.one_hot(idx, x.shape[1], dtype=x.dtype)  # [B,C,T]
        return jnp.einsum("bct,bt...->bc...", d, x, precision=HIGHEST)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
    return _rows(x, idx, inverse(idx, x.shape[1]))


def scatter_rows(x: jax.Array, idx: jax.Array, values: jax.Array, onehot: bool) -> jax.Array:
    """x [B,T,D] with rows idx [B,C] replaced by values [B,C,D]; other rows untouched (bit-exact). Both
    forms are scatter-free: a gather of values through the inverse map, or one-hot einsums."""
    if onehot:
        d = jax.nn.one_hot(idx, x.shape[1], dtype=values.dtype)  # [B,C,T]
        upd = jnp.einsum("bct,bcd->btd", d, values, precision=HIGHEST)  # [B,T,D]
        hit = jnp.sum(d, axis=1) > 0  # [B,T]
        return jnp.where(hit[..., None], upd.astype(x.dtype), x)
    inv = inverse(idx, x.shape[1])  # [B,T]
    upd = _rows(values, inv, idx)  # [B,T,D]
    return jnp.where((inv < idx.shape[1])[..., None], upd.astype(x.dtype), x)


def bce(logits: jax.Array, targets: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Mean binary cross-entropy over valid tokens."""
    loss = optax.sigmoid_binary_cross_entropy(logits, targets)
    w = jnp.ones_like(loss) if valid is None else valid.astype(loss.dtype)
    return jnp.sum(loss * w) / jnp.maximum(jnp.sum(w), 1.0)


class Predictor(nn.Module):
    """Small fp32 MLP: RMS-normalised x [B,T,D] -> routing logit [B,T]."""

    hidden: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        w_in = param_with_axes(
            self, "w_in", nn.initializers.normal(d**-0.5), (d, self.hidden), ("router", None)
        )
        b_in = param_with_axes(self, "b_in", nn.initializers.zeros, (self.hidden,), (None,))
        w_out = param_with_axes(
            self, "w_out", nn.initializers.normal(self.hidden**-0.5), (self.hidden,), (None,)
        )
        return jax.nn.relu(jnp.dot(x, w_in, precision=HIGHEST) + b_in) @ w_out  # [B,T]


class MoDRouting(nn.Module):
    """A routed layer: (x [B,T,D], positions, segment_ids, valid) -> x_new [B,T,D]. Also the slot API."""

    # config.model.mod: layers i % every == every - 1 route the top int(capacity * T) tokens per sequence;
    # router_weight sigmoid | logit; causal aux_loss | predictor (MLP of predictor_hidden units); route_by
    # topk (training) | causal (predictor / router sign, as at decode); dispatch gather | onehot. The
    # router and predictor ride the width-scaled lr without decay (optimizer group 'router').
    CONFIG_KEY = "mod"
    DEFAULTS = dict(
        capacity=0.125,
        every=2,
        router_weight="sigmoid",
        causal="predictor",
        route_by="topk",
        dispatch="gather",
        predictor_hidden=64,
    )
    AUX_LOSSES = dict(mod_router=0.01, mod_predictor=1.0)
    PARAM_GROUPS = ((("router",), "router"), (("predictor",), "router"))
    SHARDING_RULES = (("router", None),)

    make_block: Any  # registry.BlockFactory: make_block(**core_overrides) -> callable(name=...) -> Block
    capacity: float = 0.125
    router_weight: str = "sigmoid"
    causal: str = "predictor"
    route_by: str = "topk"
    dispatch: str = "gather"
    segment_len: int = 0  # > 0: top-k per segment (Infini-attention)
    predictor_hidden: int = 64

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, valid=None, selection=None):
        """`selection` [B,C] (sorted indices) overrides the top-k (tests fix the routing with it)."""
        x = jnp.asarray(x)  # NumPy inputs outside jit (the scatter uses jax.Array.at)
        x32 = x.astype(jnp.float32)
        w = param_with_axes(
            self, "router", nn.initializers.normal(x.shape[-1] ** -0.5), (x.shape[-1],), ("router",)
        )
        logits = jnp.dot(x32, w, precision=HIGHEST)  # [B,T]
        pred = None
        if self.causal == "predictor":
            pred = Predictor(self.predictor_hidden, name="predictor")(jax.lax.stop_gradient(x32))  # [B,T]
        decide = logits if pred is None else pred
        if self.route_by == "causal":
            route = decide > 0 if valid is None else (decide > 0) & valid  # [B,T]
            self.sow("intermediates", "mod_routed_frac", jnp.mean(route.astype(jnp.float32)))
            out = self.make_block()(name="block")(x, positions, segment_ids, route)
            new = x + self.weight(logits)[..., None].astype(x.dtype) * (out - x)
            return jnp.where(route[..., None], new, x)
        n = self.segment_len or x.shape[1]
        k = int(self.capacity * n)
        if k < 1:
            raise ValueError(
                f"MoD capacity {self.capacity} x {n} tokens selects none; raise model.mod.capacity."
            )
        if selection is None:
            idx, targets = select_topk(logits, k, self.segment_len, valid)
        else:
            idx, targets = selection, membership(selection, x.shape[1])
        self.sow_losses(logits, decide, targets, valid)
        block = self.make_block(segment_len=k) if self.segment_len else self.make_block()
        return self.routed_update(block(name="block"), x, idx, logits, positions, segment_ids, valid)

    def routed_update(self, block, x, idx, logits, positions, segment_ids, valid):
        """Run `block` on the selected tokens and write x_sel + w(r) * delta back at idx."""
        onehot = self.dispatch == "onehot"
        x_sel = nn.with_logical_constraint(gather_rows(x, idx, onehot), ("act_batch", "act_seq", "act_embed"))
        take = lambda a: None if a is None else gather_rows(a, idx, False)  # [B,C]
        delta = block(x_sel, take(positions), take(segment_ids), take(valid)) - x_sel  # [B,C,D]
        r = self.weight(take(logits))[..., None].astype(x.dtype)  # [B,C,1]
        return scatter_rows(x, idx, x_sel + r * delta, onehot)

    def weight(self, logits: jax.Array) -> jax.Array:
        """The router weight that multiplies the block's update."""
        return jax.nn.sigmoid(logits) if self.router_weight == "sigmoid" else logits

    def sow_losses(self, logits, decide, targets, valid):
        """Aux BCE on the router ('aux_loss') or on the predictor ('predictor'); routing accuracy."""
        name = "mod_router" if self.causal == "aux_loss" else "mod_predictor"
        self.sow("aux_loss", name, bce(decide, targets, valid))
        hit = ((decide > 0) == (targets > 0.5)).astype(jnp.float32)
        w = jnp.ones_like(hit) if valid is None else valid.astype(jnp.float32)
        self.sow("intermediates", "mod_route_acc", jnp.sum(hit * w) / jnp.maximum(jnp.sum(w), 1.0))
        recall = jnp.sum(hit * targets * w) / jnp.maximum(jnp.sum(targets * w), 1.0)  # top-k tokens kept
        self.sow("intermediates", "mod_route_recall", recall)

    # ------------------------------------------------------------------------------- routing slot API
    # (registry.RoutingSlot)

    @staticmethod
    def period_of(m) -> int:
        return m.mod.every

    @staticmethod
    def is_routed(m, index: int) -> bool:
        return index % m.mod.every == m.mod.every - 1

    @staticmethod
    def wrap(make_block, index: int, m, decode: bool = False):
        """Layer `index`: the plain block, or the block routed through MoDRouting. With a segmented memory
        core (Infini-attention) the top-k is per segment and the routed block's core gets segment_len=k
        through the block factory."""
        if not MoDRouting.is_routed(m, index):
            return make_block()
        seg = registry.get("memory", m.memory).segment_len_of(m)
        if decode and seg:
            raise NotImplementedError(
                f"decoding a MoD model with model.memory={m.memory!r} (segments of {seg}) is not supported: "
                "the streaming core folds a segment every N valid tokens while MoD training segments by "
                "position."
            )
        fields = MoDRouting.from_config(m)
        if decode:
            fields["route_by"] = "causal"
        return functools.partial(MoDRouting, make_block=make_block, segment_len=seg, **fields)

    @staticmethod
    def from_config(m) -> dict:
        """MoDRouting fields from config.model.mod (the block factory and segment length come from wrap)."""
        mod = m.mod
        return dict(
            capacity=mod.capacity,
            router_weight=mod.router_weight,
            causal=mod.causal,
            route_by=mod.route_by,
            dispatch=mod.dispatch,
            predictor_hidden=mod.predictor_hidden,
        )

    @staticmethod
    def layer_fraction(m, index: int) -> float:
        """Fraction of tokens layer `index` computes (capacity on routed layers)."""
        return m.mod.capacity if MoDRouting.is_routed(m, index) else 1.0

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        """Router (and predictor) FLOPs per token over all routed layers."""
        d, h = m.d_model, m.mod.predictor_hidden
        per = 2.0 * d + (2.0 * d * h + 2.0 * h if m.mod.causal == "predictor" else 0.0)
        return per * sum(MoDRouting.is_routed(m, i) for i in range(m.n_layers))

    @staticmethod
    def validate(config) -> None:

        m, mod = config.model, config.model.mod
        for name, value, choices in (
            ("router_weight", mod.router_weight, ROUTER_WEIGHTS),
            ("causal", mod.causal, CAUSAL),
            ("route_by", mod.route_by, ROUTE_BY),
            ("dispatch", mod.dispatch, DISPATCH),
        ):
            if value not in choices:
                raise ConfigError(f"model.mod.{name}={value!r} is not valid; choose one of {choices}.")
        if not 0.0 < mod.capacity <= 1.0 or mod.every < 1 or mod.predictor_hidden < 1:
            raise ConfigError(
                f"model.mod needs 0 < capacity <= 1 (got {mod.capacity}), every >= 1 (got "
                f"{mod.every}) and predictor_hidden >= 1 (got {mod.predictor_hidden})."
            )
        n = registry.get("memory", m.memory).segment_len_of(m) or config.data.seq_len
        if int(mod.capacity * n) < 1:
            raise ConfigError(
                f"model.mod.capacity={mod.capacity} selects no token of {n} (per sequence, or "
                "per Infini segment); raise the capacity or the length."
            )
        residual = registry.get("residual", m.residual)
        size = math.lcm(mod.every, residual.period_of(m))
        if m.scan_layers and m.n_layers % size:
            raise ConfigError(
                f"model.scan_layers=True scans super-blocks of {size} layers (lcm of mod.every="
                f"{mod.every} and the residual period), which must divide model.n_layers="
                f"{m.n_layers}; change n_layers or mod.every, or set model.scan_layers=False."
            )
