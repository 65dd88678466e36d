"""Dropless MoE dispatch that stays local on a pod (`moe.impl` = 'ragged'): tokens sorted by expert per
device, grouped matmuls (`jax.lax.ragged_dot`) on whole expert weights gathered by FSDP.

MegaBlocks (arXiv 2211.15841) computes a top-k MoE without capacity: the token-expert assignments are
sorted by expert and each expert multiplies exactly its rows (a grouped matmul), so nothing is dropped and
nothing is padded. dispatch.py's 'dropless' does that over the whole batch: one global argsort of all
B*T*P assignments, which GSPMD cannot keep on the devices holding the tokens (the 13B MoE asked for 112
GiB of temporaries per v5p chip; docs/results.md, issue 27). Here the sort is per device, as MaxText's
dropless MoE does under FSDP:
  - groups: the A = B*T tokens are split into G groups of A/G consecutive tokens, G = the number of
    devices of the current mesh (1 without a mesh, or when G does not divide A), laid out one group per
    device ('act_rows': every mesh axis). Each group plans alone (dispatch.py's dropless plan: a stable
    argsort of its assignments by expert, the inverse permutation, rows per expert), so the sort, the
    row gathers and their gather-only backward (dispatch.gather_rows) stay on the device;
  - project: one shard_map over the mesh. Each device all-gathers the whole weights of every expert
    (cast to the compute dtype first, so a bf16 model moves bf16 and reduce-scatters the gradient in
    bf16, as GSPMD's FSDP does for the dense layers; `gather_kernel`) and runs `ragged_dot` of its
    sorted rows with its group sizes. A linear slot other than
    Dense needs a `ragged_dot(params, x, group_sizes)` hook and gets its whole params (as 'dropless');
  - combine: the inverse gather per group, back to [A*P, Dout] in assignment order.
Which device handles a token changes nothing but the schedule: with no drops and no padding the values
equal 'dropless' and the 'dense' reference (tests/models/test_moe_ragged.py), sharded or not. The expert
weights are gathered whole on every device (E x the dense FFN's gather, as with pure FSDP in MaxText), so
the mesh for this impl is FSDP over all chips (mesh.expert = 1: every mesh axis then splits the batch; an
axis that does not, e.g. mesh.expert > 1, has its groups resharded from and back to the batch layout).
Shape letters beyond the house set: A = B*T tokens, P = top-k picks, G groups, R = rows of one group.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from voltron_jax import sharding
from voltron_jax.models.dispatch import DROPLESS, Dispatch, Plan, gather_rows, stacked
from voltron_jax.models.layers import Dense

ROWS = "act_rows"  # logical name of the group dim: every mesh axis (moe.MoE.SHARDING_RULES)


def n_groups(n_tokens: int) -> int:
    """Groups of tokens: one per device of the current mesh, 1 without a mesh or if they do not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    g = 1 if mesh.empty else math.prod(mesh.shape.values())
    return g if n_tokens % g == 0 else 1


class Ragged(Dispatch):
    """Per-device dropless dispatch: per group sort by expert, ragged_dot on gathered expert weights."""

    name = "ragged"

    def plan(self, experts: jax.Array, n_experts: int, capacity_factor: float) -> Plan:
        """experts [B,T,P] -> to_expert [G,R] (assignment of each sorted row, group-local), to_assign [G,R]
        (sorted row of each assignment), group_sizes [G,E]; capacity_factor is unused (nothing drops)."""
        del capacity_factor
        b, t, p = experts.shape
        g = n_groups(b * t)
        flat = nn.with_logical_constraint(experts.reshape(g, -1), (ROWS, None))  # [G,R]

        def one(f):  # [R] -> the group's dropless plan
            pl = DROPLESS.plan(f.reshape(1, -1, 1), n_experts, 0.0)
            return pl.to_expert, pl.to_assign, pl.group_sizes

        to_expert, to_assign, sizes = jax.vmap(one)(flat)
        return Plan(
            self.name,
            n_experts,
            experts.reshape(-1),
            to_expert=to_expert,
            to_assign=to_assign,
            group_sizes=sizes,
        )

    def dispatch(self, plan: Plan, rows: jax.Array, shared: bool) -> jax.Array:
        """rows [A,Din] (shared by a token's P picks) or [A*P,Din] -> [G,R,Din] sorted by expert per group."""
        g = plan.to_expert.shape[0]
        per = nn.with_logical_constraint(rows.reshape(g, -1, rows.shape[-1]), (ROWS, None, None))
        p = plan.to_assign.shape[1] // per.shape[1] if shared else 1
        out = jax.vmap(lambda x, fwd, bwd: gather_rows(x, fwd, bwd, p))(per, plan.to_expert, plan.to_assign)
        return nn.with_logical_constraint(out, (ROWS, None, None))  # [G,R,Din]

    def combine(self, plan: Plan, y: jax.Array, shared: bool) -> jax.Array:
        """Expert outputs y [G,R,Dout] -> [A*P,Dout] in assignment order."""
        out = jax.vmap(lambda x, fwd, bwd: gather_rows(x, fwd, bwd, 1))(y, plan.to_assign, plan.to_expert)
        return out.reshape(-1, out.shape[-1])  # [A*P,Dout]

    def project(self, module, linear, n_experts, features, kernel_axes, x, plan, name):
        """E stacked `linear` experts on x [G,R,Din] by grouped matmul; under a mesh, one shard_map in
        which each device gathers the whole expert weights and multiplies its own group."""
        stacked(linear, n_experts)(features, kernel_axes, name=name)(
            jnp.zeros((n_experts, 0, x.shape[-1]), x.dtype)
        )  # creates the params (an empty matmul)
        params = nn.unbox(module.variables["params"][name])
        inst = linear(features, kernel_axes, parent=None)  # unbound: carries the slot's fields
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or module.is_initializing() or x.shape[0] != math.prod(mesh.shape.values()):
            # no mesh, or one group for all devices (n_groups): GSPMD partitions the plain grouped matmul
            # (a shard_map over replicated rows would count each device's weight gradient once per device)
            return per_group(inst, params, x, plan.group_sizes)
        boxed = jax.eval_shape(  # logical axes of each leaf (the params in apply are unboxed)
            lambda k: stacked(linear, n_experts)(features, kernel_axes).init(
                k, jnp.zeros((n_experts, 1, x.shape[-1]), x.dtype)
            )["params"],
            jax.random.key(0),
        )
        specs = sharding.tree_specs(mesh, boxed)
        rows = PartitionSpec(tuple(a for a, n in mesh.shape.items() if n > 1) or None)  # a group per device

        def local(p, x, sizes):  # the device's groups [g,R,Din], sizes [g,E]
            whole = _gather_params(inst, p, specs)
            return per_group(inst, whole, x, sizes)

        fn = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(specs, PartitionSpec(*rows, None, None), PartitionSpec(*rows, None)),
            out_specs=PartitionSpec(*rows, None, None),
            check_vma=False,
        )
        return fn(params, x, plan.group_sizes)  # [G,R,out]


def _gather_params(inst: Any, params: dict, specs: dict) -> dict:
    """Inside the shard_map: the whole stacked params from the local shards. A Dense kernel goes through
    `gather_kernel`; other slots' leaves are gathered as they are (fp32)."""
    is_spec = lambda v: isinstance(v, PartitionSpec)
    if isinstance(inst, Dense) and set(params) == {"kernel"}:
        return {"kernel": gather_kernel(params["kernel"], specs["kernel"], inst.dtype)}
    return jax.tree.map(lambda v, s: sharding.gather_whole(v, s, first=0), params, specs, is_leaf=is_spec)


def gather_kernel(k: jax.Array, spec: PartitionSpec, dtype) -> jax.Array:
    """Inside the shard_map: the whole Dense expert kernel [E,in,out] from its local shard.

    Two choices, both for the TPU's layouts, neither changing a value. The shard is cast to the compute
    dtype and gathered by a plain all-gather, whose transpose reduce-scatters the gradient in that dtype
    and casts it to fp32 after, as GSPMD does for the dense layers' FSDP gather (and MaxText): the
    gradient all-reduce of the 13B MoE layer moved 6.6 GiB in fp32 per chip. And a kernel whose shards
    split its out dim but not its in dim (FSDP splits 'embed': the down projection [E,F,D]) is first
    re-split along in by an all-to-all of the (bf16) shard, then gathered along in: gathered along the
    minor dim, XLA copied the whole [8,13824,5120] kernel into ragged_dot's layout in the forward, the
    recomputed forward and the backward (6.5M cycles each per layer on v5p), and the kernel's gradient
    once more before its reduce-scatter (docs/results.md, issue 27)."""
    split = {d: tuple(n for n in sharding.axis_names(spec, d) if jax.lax.axis_size(n) > 1) for d in range(3)}
    w = k.astype(dtype)
    names = split[2]
    if names and not split[1] and w.shape[1] % math.prod(jax.lax.axis_size(n) for n in names) == 0:
        w = jax.lax.all_to_all(w, names, split_axis=1, concat_axis=2, tiled=True)  # [E,in/s,out]
        split = {0: split[0], 1: names, 2: ()}
    for d, names in split.items():
        if names:
            w = jax.lax.all_gather(w, names, axis=d, tiled=True)
    return w  # [E,in,out]


def per_group(inst: Any, params: dict, x: jax.Array, sizes: jax.Array) -> jax.Array:
    """x [g,R,in], sizes [g,E] -> [g,R,out], group by group (g is 1 here: one group per device, or one in
    all; ragged_dot's batching rule is not implemented for every dim its backward needs)."""
    return jnp.stack([grouped_matmul(inst, params, x[i], sizes[i]) for i in range(x.shape[0])])


def grouped_matmul(inst: Any, params: dict, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [R,in] sorted by expert, group_sizes [E] -> [R,out]: each expert's rows times its weights."""
    hook = getattr(inst, "ragged_dot", None)
    if hook is not None:
        return hook(params, x, group_sizes)
    if not isinstance(inst, Dense):
        raise NotImplementedError(
            f"impl='ragged' needs {type(inst).__name__}.ragged_dot(params, x, group_sizes) (stacked "
            f"params {sorted(params)}); add it to that linear class or use impl='grouped'."
        )
    k = params["kernel"].astype(inst.dtype)  # [E,in,out]
    return jax.lax.ragged_dot(x.astype(inst.dtype), k, group_sizes)  # [R,out]


RAGGED = Ragged()
