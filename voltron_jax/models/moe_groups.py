"""Per-sequence capacity dispatch (`moe.impl` / `moa.impl` = 'grouped'): GShard groups = batch rows.

moe.py's 'capacity' dispatch plans over the whole batch: one cumsum over all B*T*P assignments and one
gather of any token into any slot. Under GSPMD on a pod that gather cannot stay local, so the token rows
and the expert buffers are replicated on every device (a 13B MoE step on v4-128 asks for 60 GiB per core;
docs/results.md, "Pod configs (AOT)"). Here every row (sequence) is its own group, as in GShard
(arXiv 2006.16668, section 2.2, with group = sequence):
  - capacity per row and expert C = ceil(capacity_factor * T * P / E) (rounded up to 8, at most T),
    priority by position, then pick, inside the row only: no token competes with another sequence's
    (techniques-b.md 7: batch-wide dropping leaks across sequences);
  - dispatch is a batched gather, row b's tokens into row b's [E, C] slots ([B, E*C, D], local to the
    devices holding row b), then one transpose to the expert layout [E, B*C, D], constrained to
    ('act_expert', 'act_group', None): experts over the 'expert' mesh axis, rows over data x fsdp x
    tensor. That transpose is GShard's all-to-all; combine is its inverse and a batched gather back.
Expert parallelism is explicit (`expert_parallel`): under a mesh each projection runs in a shard_map over
the expert layout, every device all-gathers the weights of its own experts over the other mesh axes (FSDP)
and multiplies its rows locally; the transpose of that all-gather is the reduce-scatter of the weight
gradient. A linear slot with an `expert_shards` hook (Dense, BitLinear) forms what its matmul consumes on
the shard before the gather (the bf16 cast; BitLinear's integer-valued operand, its per-matrix scale
reduced across the shards), so a bf16 model gathers bf16, not its fp32 master weights; the gradient is
still reduce-scattered in fp32. Without the hook the fp32 weights are gathered as they are.
Left to GSPMD, the same program gathered every expert's weights onto every device, or computed
the weight gradients from activations replicated over the whole batch (26.9 and 112 GiB of temporaries per
v4 core for the 13B MoE; docs/results.md, "Pod configs (AOT)").
The plan is dispatch.py's capacity plan with B = 1, vmapped over rows, so every property of that impl (gather-
only backward, drops, gates) holds per row; with one row 'grouped' equals 'capacity' exactly.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from voltron_jax import sharding
from voltron_jax.models.dispatch import CAPACITY, Capacity, Plan, capacity, gather_rows, stacked

# Names of the two all-to-all results (dispatch: tokens in the expert layout; combine: expert outputs back
# in the row layout), for remat policies: 'full_save_dispatch' saves them, so a rematerialised layer's
# recomputed forward does not repeat its all-to-alls (decoder.REMAT_POLICIES).
DISPATCHED, COMBINED = "expert_dispatched", "expert_combined"


class Grouped(Capacity):
    """'capacity' with one group per sequence (per-row capacity, batched gathers, an all-to-all to the
    expert layout) and explicit expert parallelism in `project`."""

    name = "grouped"

    def plan(self, experts: jax.Array, n_experts: int, capacity_factor: float) -> Plan:
        """Per-row plan for experts [B,T,P]: to_expert [B,E*C] (row-local assignment of each slot, T*P if
        empty), to_assign [B,T*P] (slot of each assignment, E*C if dropped)."""
        b, t, p = experts.shape
        c = capacity(t, p, n_experts, capacity_factor)

        def row(ex):  # [T,P] -> ([E*C], [T*P])
            plan = CAPACITY.plan(ex[None], n_experts, capacity_factor)
            return plan.to_expert, plan.to_assign

        to_expert, to_assign = jax.vmap(row)(experts)
        return Plan(
            self.name, n_experts, experts.reshape(-1), to_expert=to_expert, to_assign=to_assign, capacity=c
        )

    def dispatch(self, plan: Plan, rows: jax.Array, shared: bool) -> jax.Array:
        """rows [A,Din] (one per token, shared by its P picks) or [A*P,Din] (one per assignment) -> the
        expert layout [E,B*C,Din]."""
        b, e, c = plan.to_expert.shape[0], plan.n_experts, plan.capacity
        per_row = rows.reshape(b, -1, rows.shape[-1])  # [B,T(*P),Din]
        p = plan.to_assign.shape[1] // per_row.shape[1] if shared else 1
        gather = jax.vmap(lambda x, fwd, bwd: gather_rows(x, fwd, bwd, p))
        out = gather(per_row, plan.to_expert, plan.to_assign)  # [B,E*C,Din]
        # rows stay whole on their devices here (as in combine), so the backward's gather stays local: left
        # free, GSPMD split E*C over 'expert' in the backward and all-reduced [B/fsdp, T*P, Din] rows
        out = nn.with_logical_constraint(out, ("act_batch", None, None))
        out = out.reshape(b, e, c, -1).transpose(1, 0, 2, 3).reshape(e, b * c, -1)  # [E,B*C,Din]
        out = nn.with_logical_constraint(out, ("act_expert", "act_group", None))
        return checkpoint_name(out, DISPATCHED)  # the all-to-all's result (remat 'full_save_dispatch')

    def combine(self, plan: Plan, y: jax.Array, shared: bool) -> jax.Array:
        """Expert outputs y [E,B*C,Dout] -> [A*P,Dout] per assignment (dropped: zeros)."""
        b, e, c = plan.to_expert.shape[0], plan.n_experts, plan.capacity
        y = y.reshape(e, b, c, -1).transpose(1, 0, 2, 3).reshape(b, e * c, -1)  # [B,E*C,Dout]
        y = checkpoint_name(nn.with_logical_constraint(y, ("act_batch", None, None)), COMBINED)
        out = jax.vmap(lambda x, fwd, bwd: gather_rows(x, fwd, bwd, 1))(y, plan.to_assign, plan.to_expert)
        return out.reshape(-1, out.shape[-1])  # [A*P,Dout]

    def project(self, module, linear, n_experts, features, kernel_axes, x, plan, name):
        """The expert-parallel shard_map under a mesh (`expert_parallel`), else the vmapped experts."""
        proj = stacked(linear, n_experts)(features, kernel_axes, name=name)
        y = expert_parallel(module, linear, n_experts, features, kernel_axes, x, name)
        return proj(x) if y is None else y  # [E,R,out]


GROUPED = Grouped()


def expert_parallel(
    module: nn.Module, linear: Any, n_experts: int, features: int, kernel_axes: tuple, x: jax.Array, name: str
) -> jax.Array | None:
    """E stacked `linear` experts on x [E,R,Din] (the dispatch layout) as one shard_map over the current
    mesh: E over 'expert', rows over data x fsdp x tensor, each expert's weights all-gathered whole on
    the devices that hold it. None when there is no mesh context or while initialising (then the caller
    runs the vmapped experts directly; their parameters are the same)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or module.is_initializing():
        return None
    params = module.variables["params"][name]
    boxed = jax.eval_shape(  # logical axes of each leaf (the params in apply are unboxed)
        lambda k: stacked(linear, n_experts)(features, kernel_axes).init(k, x)["params"],
        jax.random.key(0),
    )
    specs = sharding.tree_specs(mesh, boxed)
    x_spec = sharding.fit_spec(sharding.logical_to_spec(("act_expert", "act_group", None)), x.shape, mesh)
    experts_axes = sharding.axis_names(
        jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, PartitionSpec))[0], 0
    )
    if sharding.axis_names(x_spec, 0) != experts_axes:  # expert dim of rows and weights must be split alike
        x_spec = PartitionSpec(experts_axes or None, *tuple(x_spec)[1:])
    n_local = n_experts // math.prod(mesh.shape[a] for a in experts_axes)
    state = module.variables.get("state", {}).get(name)
    extra = {} if state is None else {"state": state}
    hook = getattr(linear(features, kernel_axes, parent=None), "expert_shards", None)

    def local(p, extra, x):
        y = None if hook is None else hook({"params": p, **extra}, specs, x)
        if y is not None:  # the slot gathers what its matmul consumes (e.g. bf16, not the fp32 kernel)
            return y
        full = jax.tree.map(sharding.gather_whole, p, specs, is_leaf=lambda v: isinstance(v, PartitionSpec))
        return stacked(linear, n_local)(features, kernel_axes).apply({"params": full, **extra}, x)

    out_spec = PartitionSpec(*tuple(x_spec)[:2], None)
    extra_specs = jax.tree.map(lambda _: PartitionSpec(), extra)
    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(specs, extra_specs, x_spec), out_specs=out_spec, check_vma=False
    )
    return fn(params, extra, x)
