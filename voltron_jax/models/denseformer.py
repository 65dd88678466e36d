"""DenseFormer: "DenseFormer: Enhancing Information Flow in Transformers via Depth Weighted Averaging"
(Pagliardini et al., arXiv 2402.02622). Residual slot 'denseformer'.

X_0 is the embedding output; block i reads Y_{i-1} and writes X_i = B_i(Y_{i-1}) (B_i includes its own
residual connections). A Depth-Weighted Average (DWA) follows block i when p | i (period p):

    Y_i = sum_{j in S_i} alpha_ij X_j,   S_i = {0 <= j <= i : j = i (mod k)}   (dilation k)

and Y_i = X_i otherwise. The accumulator holds the raw block outputs X_j, never the averages Y_j (the
paper's equations and its `DWAModules` package; the repository's experiments code stores only every
p-th output and cannot express 4x5). alpha is fp32, initialised to the identity (alpha_ii = 1, the rest
0), so a fresh DenseFormer is exactly the plain transformer. All weights live in one flat fp32 param
`dwa_weights/alpha` of n_alpha entries (DWAs by depth, sources by ascending j), the paper's count
(d(d+3)/2 for 1x1); `alpha_matrix` unpacks it. Weight decay on alpha is `optim.decay_alpha`.

Two code paths compute the same thing:
  - unrolled (scan_layers=False): a fused Python sum of alpha_ij * X_j over the kept outputs (no per-step
    stacking; XLA fuses it into one elementwise kernel and frees X_j after its last reader);
  - scanned (scan_layers=True): `nn.scan` over super-blocks of P = lcm(p, routing period) layers. A
    [B,T,D] x L buffer in the carry would be saved at every step for the backward pass (O(L^2)
    activations), so the carry instead holds one fp32 *pending sum* per DWA, acc [Q,B,T,D] (Q = L // p):
    each new X_j is pushed into every later DWA of its residue class, acc_q += alpha_{i_q j} X_j. The
    push is linear in acc, so the backward pass saves only the X_j (O(L) activations); it costs Q
    elementwise multiply-adds per layer instead of the unrolled path's |S_i| per DWA (on a CPU at d=64,
    24 blocks, 1x1: +61% step time scanned vs +5% unrolled; docs/results.md).
Deviations: with remat, each layer (not each super-block) is rematerialised, so a super-block's saved
inputs never include the accumulators. In the scan the remat covers the layer AND its push product, so
the backward pass recomputes X_j for alpha's gradient (<d acc_q, X_j>) instead of saving it beside the
layer's input: one [B,T,D] per layer instead of two (1.6 GiB per v4 chip for the 13B MoE). The DWA sums
are computed in fp32 (or `acc_dtype`) and cast to the compute dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from voltron_jax import registry
from voltron_jax.errors import ConfigError
from voltron_jax.models.decoder import REMAT_POLICIES, SCANNED_COLLECTIONS

# ----------------------------------------------------------------------------------- layout of alpha


def dwa_depths(n_layers: int, period: int) -> list[int]:
    """Depths i in 1..L followed by a DWA (p | i)."""
    return list(range(period, n_layers + 1, period))


def dwa_sources(depth: int, dilation: int) -> list[int]:
    """S_i: the outputs j <= i with j = i (mod k), ascending."""
    return list(range(depth % dilation, depth + 1, dilation))


def alpha_offset(depth: int, dilation: int, period: int) -> int:
    """Flat index of the first weight of the DWA at `depth`."""
    return sum(i // dilation + 1 for i in range(period, depth, period))


def alpha_index(depth: int, source: int, dilation: int, period: int) -> int:
    """Flat index of alpha_{depth, source} (source in S_depth)."""
    return alpha_offset(depth, dilation, period) + source // dilation


def n_alpha(n_layers: int, dilation: int, period: int) -> int:
    """Number of DWA weights: sum over DWA depths i of |S_i| = i // k + 1 (d(d+3)/2 for 1x1)."""
    return sum(i // dilation + 1 for i in dwa_depths(n_layers, period))


def alpha_identity(n_layers: int, dilation: int, period: int) -> np.ndarray:
    """The init: alpha_ii = 1, every other weight 0."""
    out = np.zeros((n_alpha(n_layers, dilation, period),), np.float32)
    for i in dwa_depths(n_layers, period):
        out[alpha_index(i, i, dilation, period)] = 1.0
    return out


def alpha_matrix(alpha: jax.Array, n_layers: int, dilation: int, period: int) -> jax.Array:
    """[L+1, L+1] matrix A with A[i, j] = alpha_ij (0 where absent; rows without a DWA are e_i)."""
    a = np.eye(n_layers + 1, dtype=np.float32)
    rows, cols, flat = [], [], []
    for i in dwa_depths(n_layers, period):
        a[i, i] = 0.0
        for j in dwa_sources(i, dilation):
            rows.append(i), cols.append(j), flat.append(alpha_index(i, j, dilation, period))
    return jnp.asarray(a).at[np.array(rows), np.array(cols)].set(alpha[np.array(flat)])


class DWAWeights(nn.Module):
    """The flat fp32 alpha vector (replicated, identity init)."""

    n_layers: int
    dilation: int
    period: int

    @nn.compact
    def __call__(self) -> jax.Array:
        init = alpha_identity(self.n_layers, self.dilation, self.period)
        init_fn = nn.with_logical_partitioning(lambda key, shape: jnp.asarray(init), ("dwa",))
        return self.param("alpha", init_fn, init.shape)


# ----------------------------------------------------------------------------------- super-blocks


def remat_layer(make, policy: str, prevent_cse: bool):
    """The layer factory `make` (a Module class or a functools.partial of one), rematerialised."""
    if policy == "none":
        return make
    kw = dict(policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse)
    if isinstance(make, functools.partial):
        return functools.partial(nn.remat(make.func, **kw), *make.args, **make.keywords)
    return nn.remat(make, **kw)


def dwa_sum(alpha: jax.Array, outs: tuple, depth: int, dilation: int, period: int) -> jax.Array:
    """Y_depth = sum_j alpha_{depth,j} X_j as one fused Python sum (fp32), cast to X's dtype."""
    y = sum(
        alpha[alpha_index(depth, j, dilation, period)] * outs[j].astype(jnp.float32)
        for j in dwa_sources(depth, dilation)
    )
    return y.astype(outs[depth].dtype)


class PullSuperBlock(nn.Module):
    """Unrolled: consecutive layers from depth `first`; the DWAs read the kept outputs X_0..X_i."""

    layers: tuple
    first: int
    dilation: int
    dwa_period: int
    remat: str = "none"

    @nn.compact
    def __call__(self, outs: tuple, h, alpha, positions, segment_ids=None, valid=None):
        for j, make in enumerate(self.layers):
            x = remat_layer(make, self.remat, True)(name=f"layer_{j}")(h, positions, segment_ids, valid)
            outs, depth = outs + (x,), self.first + j + 1
            if depth % self.dwa_period == 0:
                x = dwa_sum(alpha, outs, depth, self.dilation, self.dwa_period)
            h = x
        return outs, h


def constrain_acc(acc: jax.Array) -> jax.Array:
    """Pin the pending DWA sums [Q,B,T,D] to the activations' batch sharding. Unpinned, GSPMD gave the
    scan carry the embed sharding of the weights on a pod (batch replicated, D over fsdp) and rebuilt it
    every layer from a full-batch all-reduce: 10 GiB buffers per v4 core for the 13B MoE."""
    return nn.with_logical_constraint(acc, (None, "act_batch", "act_seq", "act_embed"))


class PushSuperBlock(nn.Module):
    """Scan body: P layers; each output is pushed into the pending DWA sums acc [Q,B,T,D] (in acc_dtype)."""

    layers: tuple
    dwa_period: int
    remat: str = "none"
    acc_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, tables, alpha, positions, segment_ids=None, valid=None):
        h, acc = carry
        acc = constrain_acc(acc)
        step, push = tables  # step: super-block index; push [P,Q]: flat alpha index or -1
        per_super = len(self.layers) // self.dwa_period
        acc_dtype = self.acc_dtype

        def layer_and_push(layer, h, w, *rest):
            x = layer(h, *rest)
            # the [Q,B,T,D] product in the accumulators' dtype: an fp32 one costs as much as fp32 sums
            return x, w.astype(acc_dtype)[:, None, None, None] * x.astype(acc_dtype)[None]

        if self.remat != "none":  # one remat for the layer and its push: see the module docstring
            kw = dict(policy=REMAT_POLICIES[self.remat], prevent_cse=False)
            layer_and_push = nn.checkpoint(layer_and_push, **kw)
        for j, make in enumerate(self.layers):
            w = jnp.where(push[j] >= 0, alpha[jnp.maximum(push[j], 0)], 0.0)  # [Q]
            x, upd = layer_and_push(make(name=f"layer_{j}"), h, w, positions, segment_ids, valid)
            acc = constrain_acc(acc + upd)  # [Q,B,T,D]
            if (j + 1) % self.dwa_period == 0:
                slot = step * per_super + (j + 1) // self.dwa_period - 1
                h = jax.lax.dynamic_index_in_dim(acc, slot, 0, keepdims=False).astype(x.dtype)
            else:
                h = x
        return (h, acc), None


def push_table(n_layers: int, size: int, dilation: int, period: int) -> np.ndarray:
    """[L/P, P, Q] int32: flat alpha index of (DWA q, output of layer s*P+j), -1 where not a source."""
    depths = dwa_depths(n_layers, period)
    out = -np.ones((n_layers // size, size, len(depths)), np.int32)
    for layer in range(n_layers):
        src = layer + 1
        for q, i in enumerate(depths):
            if src <= i and (i - src) % dilation == 0:
                out[layer // size, layer % size, q] = alpha_index(i, src, dilation, period)
    return out


# ----------------------------------------------------------------------------------- the slot


class DenseFormerResidual(nn.Module):
    """Residual slot 'denseformer': returns Y_L (then the Decoder's final norm and head)."""

    # config.model.denseformer: DWA after every `period`-th block over outputs j = i (mod dilation); the
    # paper's 1x1 / 4x5. acc_dtype: the scanned DWA's pending sums [L/period, B, T, D] (float32 | bfloat16).
    # The DWA weights are their own optimizer group 'alpha' (decayed iff optim.decay_alpha).
    CONFIG_KEY = "denseformer"
    DEFAULTS = dict(dilation=1, period=1, acc_dtype="float32")
    PARAM_GROUPS = ((("dwa_weights",), "alpha"),)
    SHARDING_RULES = (("dwa", None),)

    layers: tuple
    period: int = 1  # super-block size: lcm(dwa_period, routing period)
    scan: bool = False
    remat: str = "none"
    dilation: int = 1
    dwa_period: int = 1
    acc_dtype: str = "float32"

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, valid=None):
        x = jnp.asarray(x)  # NumPy inputs outside jit (the scan carry and accumulators need jax arrays)
        n, k, p = len(self.layers), self.dilation, self.dwa_period
        alpha = DWAWeights(n, k, p, name="dwa_weights")()
        if not self.scan:
            outs, h = (x,), x
            for s in range(math.ceil(n / self.period)):
                chunk = tuple(self.layers[s * self.period : (s + 1) * self.period])
                outs, h = PullSuperBlock(chunk, s * self.period, k, p, self.remat, name=f"block_{s}")(
                    outs, h, alpha, positions, segment_ids, valid
                )
            return h
        if n % self.period or self.period % p:
            raise ValueError(
                f"DenseFormer scan needs n_layers={n} to be a multiple of the super-block size "
                f"{self.period}, itself a multiple of denseformer.period={p}."
            )
        push = push_table(n, self.period, k, p)  # [S,P,Q]
        first = [alpha_index(i, 0, k, p) if i % k == 0 else -1 for i in dwa_depths(n, p)]
        w0 = jnp.where(jnp.array(first) >= 0, alpha[jnp.maximum(jnp.array(first), 0)], 0.0)  # [Q]
        acc_dtype = jnp.dtype(self.acc_dtype)
        acc = constrain_acc((w0[:, None, None, None] * x.astype(jnp.float32)[None]).astype(acc_dtype))
        scanned = nn.scan(
            PushSuperBlock,
            variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=n // self.period,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        tables = (jnp.arange(n // self.period), jnp.asarray(push))
        (h, _), _ = scanned(tuple(self.layers[: self.period]), p, self.remat, acc_dtype, name="blocks")(
            (x, acc), tables, alpha, positions, segment_ids, valid
        )
        return h

    @staticmethod
    def from_config(m) -> dict:
        return dict(
            dilation=m.denseformer.dilation,
            dwa_period=m.denseformer.period,
            acc_dtype=m.denseformer.acc_dtype,
        )

    @staticmethod
    def period_of(m) -> int:
        return m.denseformer.period

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        """One multiply-add per weight per model dimension: 2 * D * n_alpha (elementwise, bandwidth-bound)."""
        del seq_len
        return 2.0 * m.d_model * n_alpha(m.n_layers, m.denseformer.dilation, m.denseformer.period)

    @staticmethod
    def validate(config) -> None:
        """Reject DWA layouts this implementation cannot serve."""

        m, df = config.model, config.model.denseformer
        if df.acc_dtype not in ("float32", "bfloat16"):
            raise ConfigError(
                f"model.denseformer.acc_dtype={df.acc_dtype!r} is not valid; choose float32 or bfloat16."
            )
        if df.dilation < 1 or df.period < 1:
            raise ConfigError(
                f"model.denseformer.dilation={df.dilation} and .period={df.period} must be "
                ">= 1 (1x1 is the full DenseFormer; the paper's sparse choice is 4x5)."
            )
        if df.period > m.n_layers:
            raise ConfigError(
                f"model.denseformer.period={df.period} > model.n_layers={m.n_layers}: no DWA "
                "would exist; lower the period or use model.residual='plain'."
            )
        routing = registry.get("routing", m.routing)
        rp = routing.period_of(m)
        size = math.lcm(df.period, rp)
        if m.scan_layers and m.n_layers % size:
            raise ConfigError(
                f"model.scan_layers=True scans super-blocks of lcm(denseformer.period={df.period}, routing "
                f"period={rp}) = {size} layers, which must divide model.n_layers={m.n_layers}; change "
                "n_layers or the period, or set model.scan_layers=False."
            )
