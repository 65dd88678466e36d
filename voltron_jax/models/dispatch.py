"""Token -> expert dispatch shared by the MoE FFN (moe.py) and MoA attention (moa.py): the plan, the
gather-only row movement, stacked experts, and one object per dispatch implementation.

A dispatch implementation (`moe.impl` / `moa.impl`) is chosen once, by name, from `moe.IMPLS`; the
object then does the four steps a layer needs (docs/design.md, "Slots"):

    plan = impl.plan(experts [B,T,P], n_experts, capacity_factor)       where each assignment goes
    h = impl.dispatch(plan, rows, shared)                               rows -> the expert layout
    y = impl.project(module, linear, n_experts, features, axes, h, plan, name)   E stacked experts on h
    out = impl.combine(plan, y, shared)                                 expert layout -> [A*P, Dout]

Implementations here: 'capacity' (GShard dispatch, arXiv 2006.16668), 'dropless' (MegaBlocks-style
grouped matmul, arXiv 2211.15841, via `jax.lax.ragged_dot`) and 'dense' (every expert on every token, the
test reference); 'grouped' (per-sequence capacity with explicit expert parallelism) is moe_groups.py,
built on `Capacity`. The behaviour of each is documented in moe.py's module docstring.
Shape letters beyond the house set: A = B*T tokens, P = top-k picks, R = rows of a dispatched layout.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from voltron_jax.models.layers import Dense


class Plan(NamedTuple):
    """Where each assignment a = token * P + pick goes. Rows of the expert layout: capacity slots e*C+c
    ([E*C]) or assignments sorted by expert (dropless, [A*P]); `to_expert` and `to_assign` are inverse
    maps between the two (out-of-range entries: an empty slot, a dropped assignment)."""

    impl: str
    n_experts: int
    experts: jax.Array  # [A*P] expert of each assignment
    to_expert: jax.Array | None = None  # [R] assignment held by each expert-layout row, >= A*P if empty
    to_assign: jax.Array | None = None  # [A*P] expert-layout row of each assignment, >= R if dropped
    capacity: int = 0
    group_sizes: jax.Array | None = None  # dropless: [E] rows per expert


def drop_rate(plan: Plan) -> jax.Array:
    """Share of (token, pick) assignments that found no expert slot: 0 for dropless and dense plans; a
    capacity plan drops an assignment whose slot index is out of range (>= E*C)."""
    if not plan.capacity:
        return jnp.zeros((), jnp.float32)
    return jnp.mean((plan.to_assign >= plan.n_experts * plan.capacity).astype(jnp.float32))


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(cf * A * P / E) rounded up to a multiple of 8, at most A (never needed)."""
    c = math.ceil(capacity_factor * n_tokens * top_k / n_experts)
    return max(1, min(n_tokens, -(-c // 8) * 8))


def invert(index: jax.Array, size: int) -> jax.Array:
    """Inverse of an injective map without a scatter: out[j] = i where index[i] == j, else index.size, for
    j < size (entries of index outside [0, size) are ignored). One sort of the (index, i) pairs and a
    binary search, O((N + size) log N): XLA serialises a scatter on TPU/GPU, and libtpu's cost model
    prices the scatters of a layer's backward at a -2 s sentinel (docs/results.md, issue 18)."""
    n = index.size
    keys, vals = jax.lax.sort((index, jnp.arange(n, dtype=index.dtype)), num_keys=1)  # [N] by index
    j = jnp.arange(size, dtype=index.dtype)  # [size]
    pos = jnp.minimum(jnp.searchsorted(keys, j), n - 1)  # [size] first pair with index >= j
    return jnp.where(keys[pos] == j, vals[pos], n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_rows(x: jax.Array, fwd: jax.Array, bwd: jax.Array, p: int) -> jax.Array:
    """out[i] = x[fwd[i] // p] (0 where out of range), with a gather as its transpose too:
    grad_x[j] = sum_{s<p} g[bwd[j*p + s]], for bwd the inverse map of fwd. Dispatch and combine never
    scatter (atomics on GPU, slow on TPU) in either direction."""
    return x.at[fwd // p].get(mode="fill", fill_value=0)


def _gather_rows_fwd(x, fwd, bwd, p):
    return gather_rows(x, fwd, bwd, p), (fwd, bwd, x.shape[0])


def _gather_rows_bwd(p, res, g):
    fwd, bwd, n = res
    gx = g.at[bwd].get(mode="fill", fill_value=0).reshape(n, p, g.shape[-1])  # [N,P,Din]
    return (jnp.sum(gx, axis=1) if p > 1 else gx[:, 0]), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def stacked(linear: Any, n_experts: int):
    """The linear slot vmapped over a leading expert axis: params [E,...], logical axis 'expert'."""
    return nn.vmap(
        linear,
        variable_axes={"params": 0, "state": None},
        split_rngs={"params": True},
        in_axes=0,
        out_axes=0,
        axis_size=n_experts,
        metadata_params={nn.PARTITION_NAME: "expert"},
    )


class Dispatch:
    """One dispatch implementation. Subclasses set `name` and define `plan`, `dispatch`, `combine`;
    `project` defaults to the E vmapped experts on the expert layout [E,R,Din]."""

    name = ""

    def plan(self, experts: jax.Array, n_experts: int, capacity_factor: float) -> Plan:
        """Dispatch plan for experts [B,T,P] (chosen expert ids)."""
        raise NotImplementedError

    def dispatch(self, plan: Plan, rows: jax.Array, shared: bool) -> jax.Array:
        """Expert layout of rows: [A,Din] shared by the P picks of a token (shared=True) or [A*P,Din] one
        per assignment."""
        raise NotImplementedError

    def combine(self, plan: Plan, y: jax.Array, shared: bool) -> jax.Array:
        """Inverse of `dispatch` for expert outputs y: [A*P,Dout] per assignment (dropped: zeros)."""
        raise NotImplementedError

    def project(
        self,
        module: nn.Module,
        linear: Any,
        n_experts: int,
        features: int,
        kernel_axes: tuple,
        x: jax.Array,
        plan: Plan,
        name: str,
    ) -> jax.Array:
        """E stacked `linear(features, kernel_axes)` experts applied to x in `plan`'s layout; call it from
        `module`'s compact method (it creates the submodule `name` there)."""
        return stacked(linear, n_experts)(features, kernel_axes, name=name)(x)  # [E,R,out]


class Capacity(Dispatch):
    """GShard dispatch: a row gather into a [E,C,D] buffer, batched matmuls, a gather back. Priority by
    position in the sequence, then pick, then batch row; overflow is dropped."""

    name = "capacity"

    def plan(self, experts, n_experts, capacity_factor):
        b, t, p = experts.shape
        flat = experts.reshape(-1)  # [A*P]
        c = capacity(b * t, p, n_experts, capacity_factor)
        onehot = jax.nn.one_hot(experts, n_experts, dtype=jnp.int32)  # [B,T,P,E]
        ordered = onehot.transpose(1, 2, 0, 3).reshape(-1, n_experts)  # [T*P*B,E] position, pick, row
        pos = jnp.sum((jnp.cumsum(ordered, axis=0) - 1) * ordered, axis=-1)  # [T*P*B]
        pos = pos.reshape(t, p, b).transpose(2, 0, 1).reshape(-1)  # [A*P]
        slot = jnp.where(pos < c, flat * c + pos, n_experts * c)  # [A*P] dropped: out of range
        table = invert(slot, n_experts * c)  # [E*C] assignment of each slot, A*P if empty
        return Plan(self.name, n_experts, flat, to_expert=table, to_assign=slot, capacity=c)

    def dispatch(self, plan, rows, shared):
        out = _gather_in(plan, rows, shared)  # [E*C,Din]; empty capacity slots: 0
        out = out.reshape(plan.n_experts, plan.capacity, rows.shape[-1])  # [E,C,Din]
        return nn.with_logical_constraint(out, ("act_expert", "act_capacity", None))

    def combine(self, plan, y, shared):
        return gather_rows(y.reshape(-1, y.shape[-1]), plan.to_assign, plan.to_expert, 1)  # [A*P,Dout]


class Dropless(Capacity):
    """Assignments sorted by expert and `jax.lax.ragged_dot` over the raw stacked params (the TPU path)."""

    name = "dropless"

    def plan(self, experts, n_experts, capacity_factor):
        flat = experts.reshape(-1)  # [A*P]
        order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # [A*P] assignment of each sorted row
        inverse = jnp.argsort(order).astype(jnp.int32)  # [A*P] the inverse permutation
        # rows per expert from the sorted ids: bincount is a scatter-add (see `invert`)
        bounds = jnp.searchsorted(flat[order], jnp.arange(n_experts + 1, dtype=flat.dtype))  # [E+1]
        sizes = jnp.diff(bounds).astype(jnp.int32)  # [E]
        return Plan(self.name, n_experts, flat, to_expert=order, to_assign=inverse, group_sizes=sizes)

    def dispatch(self, plan, rows, shared):
        return _gather_in(plan, rows, shared)  # [A*P,Din] sorted by expert

    def project(self, module, linear, n_experts, features, kernel_axes, x, plan, name):
        proj = stacked(linear, n_experts)(features, kernel_axes, name=name)
        proj(jnp.zeros((n_experts, 0, x.shape[-1]), x.dtype))  # creates the params; an empty matmul
        params = nn.unbox(module.variables["params"][name])
        inst = linear(features, kernel_axes, parent=None)  # unbound: carries the slot's fields
        hook = getattr(inst, "ragged_dot", None)
        if hook is not None:
            return hook(params, x, plan.group_sizes)
        if not isinstance(inst, Dense):
            raise NotImplementedError(
                f"impl='dropless' needs {type(inst).__name__}.ragged_dot(params, x, group_sizes) (stacked "
                f"params {sorted(params)}); add it to that linear class or use impl='capacity'."
            )
        k = params["kernel"].astype(inst.dtype)
        return jax.lax.ragged_dot(x.astype(inst.dtype), k, plan.group_sizes)  # [A*P,out]


class DenseAll(Dispatch):
    """Every expert on every token, masked by the gates afterwards (the reference for tests)."""

    name = "dense"

    def plan(self, experts, n_experts, capacity_factor):
        return Plan(self.name, n_experts, experts.reshape(-1))

    def dispatch(self, plan, rows, shared):
        return jnp.broadcast_to(rows, (plan.n_experts,) + rows.shape)  # [E,R,Din]

    def combine(self, plan, y, shared):
        r = jnp.arange(plan.experts.size)  # [A*P]
        if shared:
            r = r // (plan.experts.size // y.shape[1])
        return y[plan.experts, r]  # [A*P,Dout]


def _gather_in(plan: Plan, rows: jax.Array, shared: bool) -> jax.Array:
    """rows [A,Din] (shared by a token's P picks) or [A*P,Din] -> [R,Din] in `plan.to_expert` order."""
    p = plan.experts.size // rows.shape[0] if shared else 1
    return gather_rows(rows, plan.to_expert, plan.to_assign, p)  # [R,Din]


CAPACITY, DROPLESS, DENSE = Capacity(), Dropless(), DenseAll()
