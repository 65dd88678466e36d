"""Grouped (per-sequence) MoE dispatch: each row is 'capacity' dispatch on its own, drops included; it is
exact under expert x fsdp x data sharding; MoA composes with it."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from voltron_jax import config as cfglib
from voltron_jax import registry, sharding
from voltron_jax.models import decoder, moa, moe

D, F, E = 16, 24, 4


def _setup(b=4, t=16):
    x = jax.random.normal(jax.random.key(1), (b, t, D))
    layer = lambda impl: moe.MoE(F, n_experts=E, top_k=2, impl=impl, capacity_factor=0.5)  # drops
    params = jax.jit(layer("capacity").init)(jax.random.key(0), x)["params"]
    return x, layer, nn.unbox(params)


@pytest.mark.slow
def test_grouped_is_capacity_dispatch_row_by_row_with_drops():
    x, layer, params = _setup(b=2)
    loss = lambda impl: lambda p, x: jnp.sum(jnp.sin(layer(impl).apply({"params": p}, x)))
    got = jax.jit(jax.value_and_grad(loss("grouped"), argnums=(0, 1)))(params, x)
    rows = [
        jax.jit(jax.value_and_grad(loss("capacity"), argnums=(0, 1)))(params, x[i : i + 1])
        for i in range(x.shape[0])
    ]
    np.testing.assert_allclose(got[0], sum(r[0] for r in rows), rtol=1e-5)
    jax.tree.map(
        lambda a, *bs: np.testing.assert_allclose(a, sum(bs), atol=1e-5), got[1][0], *[r[1][0] for r in rows]
    )  # param grads add up over rows
    np.testing.assert_allclose(got[1][1], jnp.concatenate([r[1][1] for r in rows]), atol=1e-6)
    plan = moe.make_plan(jnp.zeros((4, 16, 2), jnp.int32), E, "grouped", 0.5)  # every pick on expert 0
    assert plan.capacity == 8 and int(jnp.sum(plan.to_assign < E * 8)) == 4 * 8  # expert 0 full per row


@pytest.mark.slow
@pytest.mark.parametrize("linear", ["dense", "bitlinear", "bitlinear_warmin"])
@pytest.mark.parametrize("axes", [(2, 2, 2, 1), (1, 2, 1, 4), (1, 4, 2, 1)])
def test_grouped_sharded_equals_unsharded(linear, axes):
    """The expert-parallel shard_map (each device forms what its experts' matmuls consume from its weight
    shards, gathers it, multiplies its rows) gives the unsharded loss and gradients, for BitLinear experts
    too (their scale is per whole expert matrix: the shards' statistics are reduced across devices), mid
    warm-in (lam from the 'state' step) and with tensor > 1 (gathered as well)."""
    x = jax.random.normal(jax.random.key(1), (8, 16, D))
    lin = registry.get("linear", linear.removesuffix("_warmin"))
    if linear.endswith("_warmin"):
        lin = functools.partial(lin, warmin=(0, 8))
    layer = lambda: moe.MoE(F, linear=lin, n_experts=E, top_k=2, impl="grouped", capacity_factor=0.5)
    variables = jax.jit(layer().init)(jax.random.key(0), x)
    params = nn.unbox(variables["params"])
    state = jax.tree.map(lambda v: jnp.full_like(v, 3), variables.get("state", {}))  # lam = 3/8
    assert bool(state) == linear.endswith("_warmin")
    loss = lambda p, x: jnp.mean(layer().apply({"params": p, "state": state}, x) ** 2)
    want = jax.jit(jax.value_and_grad(loss))(params, x)
    cfg = cfglib.get_default().mesh
    cfg.data, cfg.fsdp, cfg.tensor, cfg.expert = axes
    mesh = sharding.make_mesh(cfg)
    with sharding.context(mesh):
        boxed = jax.eval_shape(layer().init, jax.random.key(0), x)["params"]
        shard = sharding.tree_shardings(mesh, boxed)
        step = jax.jit(jax.value_and_grad(loss), in_shardings=(shard, sharding.batch_sharding(mesh)))
        assert "shard_map" in str(jax.make_jaxpr(step)(params, x))  # the expert-parallel path ran
        got = step(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def _compiled_grad_hlo(b: int, t: int, argnums, linear="dense", dtype=jnp.float32, compile=True) -> str:
    """Compiled HLO (or, compile=False, the StableHLO handed to XLA) of the grouped MoE's gradient (w.r.t.
    `argnums` of (params, x)) for x [b,t,D] on an fsdp=2 x expert=4 mesh."""
    x = jax.random.normal(jax.random.key(1), (b, t, D))
    lin = functools.partial(registry.get("linear", linear), dtype=dtype)
    layer = moe.MoE(F, linear=lin, n_experts=E, top_k=2, impl="grouped", capacity_factor=1.0)
    params = nn.unbox(jax.jit(layer.init)(jax.random.key(0), x)["params"])
    loss = lambda p, x: jnp.mean(layer.apply({"params": p}, x) ** 2)
    cfg = cfglib.get_default().mesh
    cfg.data, cfg.fsdp, cfg.expert = 1, 2, 4
    mesh = sharding.make_mesh(cfg)
    with sharding.context(mesh):
        shard = sharding.tree_shardings(mesh, jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
        step = jax.jit(jax.grad(loss, argnums=argnums), in_shardings=(shard, sharding.batch_sharding(mesh)))
        lowered = step.lower(params, x)
        return lowered.compile().as_text() if compile else lowered.as_text()


@pytest.mark.slow
def test_expert_parallel_keeps_weights_local():
    """Each device holds only its own experts' weights in the compiled step: no buffer in the program has
    all E experts of a gate kernel [E,D,F] (GSPMD alone gathered every expert onto every device)."""
    hlo = _compiled_grad_hlo(8, 16, 0)
    assert f"f32[1,{D},{F}]" in hlo  # one expert, whole (gathered over fsdp)
    assert f"[{E},{D},{F}]" not in hlo and f"[{E},{F},{D}]" not in hlo


@pytest.mark.parametrize("linear", ["dense", "bitlinear"])
def test_bf16_experts_gather_bf16_weights_and_reduce_scatter_fp32_gradients(linear):
    """In a bf16 model each device all-gathers its experts' kernels as bf16 (what the matmul consumes:
    the cast, or BitLinear's integer-valued operand, is formed on the shard first), half the bytes of the
    fp32 master weights, and the weight gradients are still summed over fsdp in fp32."""
    ir = _compiled_grad_hlo(8, 16, 0, linear, jnp.bfloat16, compile=False)  # what XLA is handed (the CPU
    # backend upcasts bf16 collectives to f32 when it compiles; TPU keeps them: docs/results.md)
    gathers = re.findall(r'"stablehlo\.all_gather".*-> tensor<([\dx]+)x(\w+)>', ir)
    kernels = {f"1x{D}x{F}", f"1x{F}x{D}"}  # one expert's whole gate/up [D,F] or down [F,D] kernel
    assert {shape for shape, _ in gathers} >= kernels
    assert {dt for shape, dt in gathers if shape in kernels} == {"bf16"}
    scatters = re.findall(r'"stablehlo\.reduce_scatter".*?\) -> tensor<[\dx]+x(\w+)>', ir, re.S)
    assert set(scatters) == {"f32"}


@pytest.mark.slow
def test_dispatch_backward_keeps_rows_on_their_devices():
    """The dispatch gather's backward runs on each device's own rows: with 8 rows over fsdp=2 x expert=4
    every device holds one, and no buffer holds the T*P assignments of a row group [B/fsdp,T*P,D] (left
    to GSPMD, the backward split E*C over 'expert' and all-reduced those: 640 MiB per v4 chip for the 13B
    MoE, docs/results.md)."""
    b, t = 8, 16
    hlo = _compiled_grad_hlo(b, t, (0, 1))
    assert f"f32[1,{t * 2},{D}]" in hlo  # one row's assignments
    assert f"[{b // 2},{t * 2},{D}]" not in hlo


@pytest.mark.slow
def test_moa_grouped_equals_moa_capacity_per_row():
    b, t = 2, 8
    x = jax.random.normal(jax.random.key(2), (b, t, D))
    make = lambda impl: moa.MixtureOfAttention(2, 2, 8, n_experts=E, top_k=2, impl=impl, capacity_factor=0.5)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    params = jax.jit(make("capacity").init)(jax.random.key(0), x, pos)["params"]
    got = jax.jit(make("grouped").apply)({"params": params}, x, pos)
    row = jax.jit(make("capacity").apply)
    want = jnp.concatenate([row({"params": params}, x[i : i + 1], pos[:1]) for i in range(b)])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_remat_full_save_dispatch_keeps_the_all_to_all_results():
    """Remat 'full_save_dispatch' saves what the dispatch's and combine's all-to-alls return, so the
    recomputed forward repeats neither: 4 all-to-alls in the compiled gradient of one MoE layer (forward
    and backward, dispatch and combine) instead of 'full''s 6, with the same loss and gradients."""
    x = jax.random.normal(jax.random.key(1), (8, 16, D))
    layer = moe.MoE(F, n_experts=E, top_k=2, impl="grouped", capacity_factor=1.0)
    params = nn.unbox(jax.jit(layer.init)(jax.random.key(0), x)["params"])
    cfg = cfglib.get_default().mesh
    cfg.data, cfg.fsdp, cfg.expert = 1, 2, 4
    mesh = sharding.make_mesh(cfg)
    got = {}
    with sharding.context(mesh):
        shard = sharding.tree_shardings(mesh, jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
        for policy in ("full", "full_save_dispatch"):
            m = nn.remat(moe.MoE, policy=decoder.REMAT_POLICIES[policy])
            m = m(F, n_experts=E, top_k=2, impl="grouped", capacity_factor=1.0)
            loss = lambda p, x, m=m: jnp.mean(m.apply({"params": p}, x) ** 2)
            grad = jax.value_and_grad(loss, argnums=(0, 1))  # x's too, as inside a model
            step = jax.jit(grad, in_shardings=(shard, sharding.batch_sharding(mesh)))
            hlo = step.lower(params, x).compile().as_text()
            got[policy] = (len(re.findall(r" all-to-all\(", hlo)), step(params, x))
    assert got["full"][0] == 6 and got["full_save_dispatch"][0] == 4
    full, saved = (jax.tree.leaves(got[k][1]) for k in ("full", "full_save_dispatch"))
    for a, b in zip(full, saved, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
