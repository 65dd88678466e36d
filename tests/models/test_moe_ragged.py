"""'ragged' MoE dispatch (moe_ragged.py): dropless, per device; equal to the dense reference (every expert on
every token) in values and gradients, with and without a mesh, and its sort stays on the device."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from voltron_jax import config as cfglib
from voltron_jax import sharding
from voltron_jax.errors import ConfigError
from voltron_jax.models import moe, moe_ragged

D, F, E = 16, 24, 4


def _setup(b=8, t=16, top_k=2):
    x = jax.random.normal(jax.random.key(1), (b, t, D))
    layer = lambda impl: moe.MoE(F, n_experts=E, top_k=top_k, impl=impl, capacity_factor=0.5)
    params = nn.unbox(jax.jit(layer("dense").init)(jax.random.key(0), x)["params"])
    params["router"] = 3.0 * params["router"] / jnp.std(params["router"])  # peaked: uneven expert loads
    return x, layer, params


def _loss(layer):
    return lambda p, x: jnp.mean(jnp.sin(layer.apply({"params": p}, x)) ** 2)


def _close(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_ragged_equals_the_dense_reference_values_and_grads(top_k):
    """No mesh: one group; every assignment kept (drop rate 0 where capacity 0.5 would drop), the same
    outputs and gradients (params and input) as every expert on every token, fp32."""
    x, layer, params = _setup(top_k=top_k)
    want = jax.jit(jax.value_and_grad(_loss(layer("dense")), argnums=(0, 1)))(params, x)
    got = jax.jit(jax.value_and_grad(_loss(layer("ragged")), argnums=(0, 1)))(params, x)
    _close(got, want)
    _, stats = layer("ragged").apply({"params": params}, x, mutable="stats")
    assert float(stats["stats"]["moe_drop_rate"][0]) == 0.0
    _, stats = layer("capacity").apply({"params": params}, x, mutable="stats")
    assert float(stats["stats"]["moe_drop_rate"][0]) > 0.0  # the same routing overflows capacity 0.5


def test_plan_sorts_each_group_by_expert_and_counts_its_rows():
    experts = jax.random.randint(jax.random.key(3), (4, 6, 2), 0, E)
    plan = moe.make_plan(experts, E, "ragged", 1.0)  # no mesh: one group
    flat = np.asarray(experts).reshape(-1)
    order = np.asarray(plan.to_expert[0])
    assert sorted(order) == list(range(flat.size))  # a permutation of the assignments
    assert list(flat[order]) == sorted(flat)  # ... sorted by expert
    np.testing.assert_array_equal(np.asarray(plan.to_assign[0])[order], np.arange(flat.size))  # inverse
    np.testing.assert_array_equal(plan.group_sizes[0], np.bincount(flat, minlength=E))


@pytest.mark.parametrize("axes", [(1, 8, 1, 1), (2, 4, 1, 1), (1, 2, 1, 4), (2, 2, 2, 1)])
def test_ragged_sharded_equals_unsharded_dense_reference(axes):
    """Under a mesh (data, fsdp, tensor, expert): one group of tokens per device, each device's grouped
    matmul on the gathered experts in a shard_map; loss and gradients equal the unsharded dense reference,
    with experts split over 'expert' and rows over mesh axes that do not split the batch (tensor)."""
    x, layer, params = _setup()
    want = jax.jit(jax.value_and_grad(_loss(layer("dense"))))(params, x)
    cfg = cfglib.get_default().mesh
    cfg.data, cfg.fsdp, cfg.tensor, cfg.expert = axes
    mesh = sharding.make_mesh(cfg)
    with sharding.context(mesh):
        boxed = jax.eval_shape(layer("ragged").init, jax.random.key(0), x)["params"]
        shard = sharding.tree_shardings(mesh, boxed)
        step = jax.jit(jax.value_and_grad(_loss(layer("ragged"))), in_shardings=(shard, None))
        assert "shard_map" in str(jax.make_jaxpr(step)(params, x))  # the per-device path ran
        got = step(params, x)
        to_expert = jax.jit(lambda e: moe.make_plan(e, E, "ragged", 1.0).to_expert)(
            jnp.zeros((8, 16, 2), int)
        )
    assert to_expert.shape == (8, 8 * 16 * 2 // 8)  # 8 groups (devices) of 32 assignments
    _close(got, want)


def test_the_sort_stays_on_each_device():
    """Compiled on fsdp=8, the program sorts each device's 32 assignments (no sort of all 256) and moves no
    token rows between devices (no all-to-all): each gathers the whole experts' weights."""
    x, layer, params = _setup()
    cfg = cfglib.get_default().mesh
    cfg.data, cfg.fsdp = 1, 8
    mesh = sharding.make_mesh(cfg)
    with sharding.context(mesh):
        boxed = jax.eval_shape(layer("ragged").init, jax.random.key(0), x)["params"]
        shard = sharding.tree_shardings(mesh, boxed)
        step = jax.jit(jax.grad(_loss(layer("ragged"))), in_shardings=(shard, sharding.batch_sharding(mesh)))
        hlo = step.lower(params, x).compile().as_text()
    sorts = [re.search(r"\[([\d,]+)\]", line).group(1) for line in hlo.splitlines() if " sort(" in line]
    assert sorts and all(s == "1,32" for s in sorts), sorts  # one group of 16 tokens x 2 picks a device
    assert "collective-permute" not in hlo
    moved = re.findall(r"= \(?f32\[([\d,]+)\].* all-to-all\(", hlo)
    assert moved and all(m.count(",") == 2 and m.startswith("4,") for m in moved), moved  # kernels only
    gathered = re.findall(r"= f32\[([\d,]+)\][^ ]* all-gather\(", hlo)
    # the whole experts' weights on every device, each gathered along its in dim: gate/up [E,D,F] and
    # down [E,F,D] after its shard is re-split along F (moe_ragged.gather_kernel)
    kernels = sorted(g for g in gathered if g.count(",") == 2)
    assert kernels == ["4,16,24", "4,16,24", "4,24,16"], gathered


def test_ragged_config_needs_a_grouped_matmul_for_non_dense_linears():
    c = cfglib.get_default()
    c.model.ffn, c.model.moe.impl, c.model.linear = "moe", "ragged", "bitlinear"
    with pytest.raises(ConfigError, match="impl='ragged' needs BitLinear.ragged_dot"):
        moe.MoE.validate(c)
    assert moe_ragged.n_groups(12) == 1  # no mesh: one group
