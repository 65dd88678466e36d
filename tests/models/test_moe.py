"""MoE FFN: reduction to the dense MLP, routing properties, aux losses, dispatch implementations."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from voltron_jax.models import dispatch, moe
from voltron_jax.models.bitlinear import BitLinear
from voltron_jax.models.layers import MLP, Dense

D, F, E = 16, 24, 4


def _x(b=2, t=8, seed=1):
    return jax.random.normal(jax.random.key(seed), (b, t, D))


MLP_INIT, MLP_APPLY = jax.jit(MLP(F).init), jax.jit(MLP(F).apply)
MLPS = [nn.unbox(MLP_INIT(jax.random.key(i), _x())["params"]) for i in range(E)]  # E distinct experts


@functools.lru_cache
def _moe(impl: str, top_k: int = 2, capacity_factor: float = E / 2):
    """Jitted MoE apply (one compile per variant for the whole file)."""
    return jax.jit(moe.MoE(F, n_experts=E, top_k=top_k, impl=impl, capacity_factor=capacity_factor).apply)


def _moe_params(mlps, router):
    return {**jax.tree.map(lambda *xs: jnp.stack(xs), *mlps), "router": router}


@pytest.mark.parametrize("impl", [pytest.param("dropless", marks=pytest.mark.slow), "capacity", "dense"])
def test_identical_experts_equal_dense_mlp_for_any_router(impl):
    x = _x()
    want = MLP_APPLY({"params": MLPS[0]}, x)
    for seed, std in [(3, 1.0), (4, 30.0)]:  # near-uniform and adversarially peaked routers
        router = std * jax.random.normal(jax.random.key(seed), (D, E))
        got = _moe(impl)({"params": _moe_params([MLPS[0]] * E, router)}, x)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["dropless", "capacity"])
def test_all_experts_zero_router_is_mean_of_experts(impl):
    x = _x()
    want = sum(MLP_APPLY({"params": p}, x) for p in MLPS) / E
    got = _moe(impl, top_k=E, capacity_factor=1.0)({"params": _moe_params(MLPS, jnp.zeros((D, E)))}, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["dropless", "capacity"])
def test_one_hot_router_reproduces_chosen_expert(impl):
    x = _x().at[..., 0].set(1.0)  # a constant feature the router can key on
    j = 2
    router = jnp.zeros((D, E)).at[0, j].set(100.0)  # logit 100 for expert j, 0 otherwise: second gate ~e^-100
    got = _moe(impl)({"params": _moe_params(MLPS, router)}, x)
    np.testing.assert_allclose(got, MLP_APPLY({"params": MLPS[j]}, x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_large_capacity_equals_dropless_values_and_grads():
    params = _moe_params(MLPS, jax.random.normal(jax.random.key(9), (D, E)))
    x = _x(b=3, t=5)

    def run(impl):
        layer = moe.MoE(F, n_experts=E, top_k=2, impl=impl, capacity_factor=E / 2)
        loss = lambda p: (lambda y: (jnp.sum(y**2), y))(layer.apply({"params": p}, x))
        (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return y, g

    (y_d, g_d), (y_c, g_c), (y_r, g_r) = run("dropless"), run("capacity"), run("dense")
    np.testing.assert_allclose(y_c, y_d, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(y_r, y_d, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_c) + jax.tree.leaves(g_r), jax.tree.leaves(g_d) * 2, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_capacity_drops_latest_positions_first():
    # 2 rows x 8 tokens all pick expert 0 (top-1 of 2): C = ceil(1.0 * 16 / 2) = 8 slots, so the 8 kept
    # assignments are positions 0..3 of both rows (priority by position, then row).
    experts = jnp.zeros((2, 8, 1), jnp.int32)
    plan = moe.make_plan(experts, 2, "capacity", 1.0)
    assert plan.capacity == 8
    kept = np.asarray(plan.to_assign < 2 * 8).reshape(2, 8)
    np.testing.assert_array_equal(kept, np.broadcast_to(np.arange(8) < 4, (2, 8)))
    # the dropped tokens get a zero expert output (they keep only the residual)
    rows = jnp.arange(16, dtype=jnp.float32)[:, None] + 1.0
    back = moe.combine(plan, moe.dispatch(plan, rows, shared=True), shared=True)
    np.testing.assert_array_equal(
        np.asarray(back)[:, 0], np.where(kept.reshape(-1), np.arange(16) + 1.0, 0.0)
    )


@pytest.mark.slow
def test_drop_rate_is_the_share_of_assignments_without_a_slot_and_the_layer_sows_it():
    experts = jnp.zeros((2, 32, 1), jnp.int32)  # all 64 to expert 0 of 2; 32 slots: half are dropped
    assert float(dispatch.drop_rate(moe.make_plan(experts, 2, "capacity", 1.0))) == 0.5
    assert float(dispatch.drop_rate(moe.make_plan(experts, 2, "capacity", 2.0))) == 0.0  # C = A
    assert float(dispatch.drop_rate(moe.make_plan(experts, 2, "dropless", 1.0))) == 0.0
    assert float(dispatch.drop_rate(moe.make_plan(experts, 2, "grouped", 1.0))) == 0.5  # per row: C = 16
    # the layer: a router that sends every token's both picks to experts 0 and 1 of 4, C = ceil(1.0*16*2/4)
    # = 8 slots each for 16 assignments each: half of all assignments are dropped
    x = _x().at[..., 0].set(1.0)
    router = jnp.zeros((D, E)).at[0, :2].set(100.0)
    params = {"params": _moe_params(MLPS, router)}
    _, cols = moe.MoE(F, n_experts=E, top_k=2, capacity_factor=1.0).apply(params, x, mutable=["stats"])
    assert float(cols["stats"]["moe_drop_rate"][0]) == pytest.approx(0.5)
    _, cols = moe.MoE(F, n_experts=E, top_k=2, capacity_factor=E / 2).apply(params, x, mutable=["stats"])
    assert float(cols["stats"]["moe_drop_rate"][0]) == 0.0  # the capacity factor that never drops


@pytest.mark.parametrize("impl", [pytest.param("capacity", marks=pytest.mark.slow), "dropless"])
def test_dispatch_and_combine_gradients_match_autodiff_with_drops(impl):
    # the custom VJP (a gather, not a scatter) equals the transpose XLA derives for the plain gather
    second = jax.random.randint(jax.random.key(0), (2, 8, 1), 1, E)
    experts = jnp.concatenate([jnp.zeros_like(second), second], axis=-1)  # every token picks expert 0
    plan = moe.make_plan(experts, E, impl, 0.5)  # capacity 8 < 16 tokens on expert 0: drops
    assert impl == "dropless" or int(jnp.sum(plan.to_assign >= plan.to_expert.size)) >= 8
    tokens = jax.random.normal(jax.random.key(1), (16, 3))
    per_assign = jax.random.normal(jax.random.key(2), (32, 3))
    ys = jax.random.normal(jax.random.key(3), (plan.to_expert.size, 3))
    plain = lambda x, idx: x.at[idx].get(mode="fill", fill_value=0)
    cases = [
        (lambda x: moe.dispatch(plan, x, True), lambda x: plain(x, plan.to_expert // 2), tokens),
        (lambda x: moe.dispatch(plan, x, False), lambda x: plain(x, plan.to_expert), per_assign),
        (lambda y: moe.combine(plan, y, True), lambda y: plain(y, plan.to_assign), ys),
    ]
    for ours, ref, x in cases:
        ct = jax.random.normal(jax.random.key(4), jnp.shape(ours(x)))
        np.testing.assert_array_equal(ours(x).reshape(-1, 3), ref(x))
        g_ours = jax.vjp(ours, x)[1](ct)[0]
        g_ref = jax.vjp(ref, x)[1](ct.reshape(-1, 3))[0]
        np.testing.assert_allclose(g_ours, g_ref, atol=1e-6)


def test_load_balance_loss_known_assignment():
    # 4 tokens, E=2, top-1: probs rows [.25, .75] x3 and [.5, .5]; choices 1, 1, 1, 0.
    probs = jnp.array([[0.25, 0.75]] * 3 + [[0.5, 0.5]])
    experts = jnp.array([[1], [1], [1], [0]])
    # f = [1/4, 3/4], p = [(0.75 + 0.5)/4, (2.25 + 0.5)/4] = [0.3125, 0.6875]; 2 * (0.078125 + 0.515625)
    assert float(moe.load_balance_loss(probs, experts, 2)) == pytest.approx(1.1875, abs=1e-6)
    uniform = jnp.full((4, 4), 0.25)
    assert float(
        moe.load_balance_loss(uniform, jnp.array([[0, 1], [2, 3], [0, 1], [2, 3]]), 4)
    ) == pytest.approx(1.0, abs=1e-6)


def test_z_loss_known_value():
    logits = jnp.log(jnp.array([[1.0, 3.0], [2.0, 2.0]]))  # logsumexp = log 4 for both rows
    assert float(moe.z_loss(logits)) == pytest.approx(np.log(4.0) ** 2, abs=1e-6)


@pytest.mark.slow
def test_params_layout_fp32_router_and_sown_aux_losses():
    layer = moe.MoE(F, linear=functools.partial(Dense, dtype=jnp.bfloat16), n_experts=E, top_k=2)
    x = _x()
    boxed = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
    specs, shapes = nn.get_partition_spec(boxed), nn.unbox(boxed)
    assert shapes["gate"]["kernel"].shape == (E, D, F) and shapes["down"]["kernel"].shape == (E, F, D)
    assert tuple(specs["gate"]["kernel"]) == ("expert", "embed", "mlp")
    assert tuple(specs["down"]["kernel"]) == ("expert", "mlp", "embed")
    assert shapes["router"].shape == (D, E) and shapes["router"].dtype == jnp.float32
    params = nn.unbox(jax.jit(layer.init)(jax.random.key(0), x)["params"])
    assert float(jnp.abs(params["router"]).max()) > 0  # never an all-zero router
    _, state = jax.jit(functools.partial(layer.apply, mutable=["aux_loss"]))({"params": params}, x)
    logits = x.reshape(-1, D) @ params["router"]  # fp32 even though the experts compute in bf16
    (lb,), (z,) = state["aux_loss"]["moe_lb"], state["aux_loss"]["moe_z"]
    _, top = jax.lax.top_k(logits, 2)
    np.testing.assert_allclose(lb, moe.load_balance_loss(jax.nn.softmax(logits), top, E), rtol=1e-6)
    np.testing.assert_allclose(z, moe.z_loss(logits), rtol=1e-6)


@pytest.mark.slow
def test_bitlinear_experts_quantise_per_expert():
    lin = functools.partial(BitLinear, norm="rms")
    x = _x().at[..., 0].set(1.0)
    mlp = nn.unbox(jax.jit(MLP(F, linear=lin).init)(jax.random.key(0), x)["params"])
    want = jax.jit(MLP(F, linear=lin).apply)({"params": mlp}, x)
    # identical BitLinear experts reproduce the BitLinear MLP for any router
    layer = jax.jit(
        moe.MoE(F, linear=lin, n_experts=E, top_k=2, impl="capacity", capacity_factor=E / 2).apply
    )
    router = jax.random.normal(jax.random.key(5), (D, E))
    np.testing.assert_allclose(
        layer({"params": _moe_params([mlp] * E, router)}, x), want, atol=1e-5, rtol=1e-5
    )
    # one scale per expert: tripling expert 0's latent kernel leaves expert 1 (forced by the router) alone;
    # a scale shared across experts would change with it
    scaled = _moe_params([mlp] * E, jnp.zeros((D, E)).at[0, 1].set(100.0))
    scaled["gate"]["kernel"] = scaled["gate"]["kernel"].at[0].multiply(3.0)
    np.testing.assert_allclose(layer({"params": scaled}, x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_dropless_with_a_linear_without_ragged_hook_fails_clearly():
    layer = moe.MoE(F, linear=BitLinear, n_experts=E, top_k=2, impl="dropless")
    with pytest.raises(NotImplementedError, match="ragged_dot"):
        layer.init(jax.random.key(0), _x())


@pytest.mark.slow
def test_expert_sharded_equals_unsharded():
    from voltron_jax import config as cfglib
    from voltron_jax import sharding

    cfg = cfglib.get_default().mesh
    cfg.data, cfg.expert = 2, 4  # experts over 4 devices, the batch over all 8
    mesh = sharding.make_mesh(cfg)
    layer = moe.MoE(F, n_experts=E, top_k=2, impl="capacity", capacity_factor=1.0)
    x = _x(b=8)
    params = _moe_params(MLPS, jax.random.normal(jax.random.key(9), (D, E)))
    loss = lambda p, x: jnp.mean(layer.apply({"params": p}, x) ** 2)
    want = jax.jit(jax.value_and_grad(loss))(params, x)
    with sharding.context(mesh):
        shard = sharding.tree_shardings(mesh, jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
        assert shard["gate"]["kernel"].spec[0] == "expert"
        got = jax.jit(jax.value_and_grad(loss), in_shardings=(shard, sharding.batch_sharding(mesh)))(
            params, x
        )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_flops_per_token_counts_active_experts():
    from configs import tiny

    m = tiny.get_config("test").model
    m.ffn = "moe"
    want = 2 * m.d_model * m.moe.n_experts + m.moe.top_k * 6 * m.d_model * m.d_ff
    assert moe.MoE.flops_per_token(m, 64) == want


def _routing(seed, b=3, t=16, p=2, e=4):
    """Random top-p expert ids [B,T,P] (distinct per token), as the router picks them."""
    return jnp.argsort(jax.random.uniform(jax.random.key(seed), (b, t, e)), axis=-1)[..., :p].astype(
        jnp.int32
    )


@pytest.mark.slow
def test_invert_equals_scatter_built_inverse_with_out_of_range_entries():
    for seed in range(4):
        n, size = 40, 32
        index = jax.random.permutation(jax.random.key(seed), 48)[:n].astype(jnp.int32)  # some >= size
        want = jnp.full((size,), n, jnp.int32).at[index].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
        np.testing.assert_array_equal(dispatch.invert(index, size), want)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 4.0])  # drops; some of each; empty slots
def test_plan_maps_equal_the_scatter_built_ones(capacity_factor, seed):
    """The sort-built maps (dispatch.invert, argsort, searchsorted) equal the scatters they replaced, on
    random routings with dropped assignments and empty slots."""
    ex = _routing(seed)
    a = jnp.arange(ex.size, dtype=jnp.int32)
    cap = dispatch.CAPACITY.plan(ex, E, capacity_factor)
    want = jnp.full((cap.to_expert.size,), ex.size, jnp.int32).at[cap.to_assign].set(a, mode="drop")
    np.testing.assert_array_equal(cap.to_expert, want)
    drops, empties = int(jnp.sum(cap.to_assign >= want.size)), int(jnp.sum(want >= ex.size))
    assert drops > 0 if capacity_factor < 1 else empties > 0
    grp = moe.IMPLS["grouped"].plan(ex, E, capacity_factor)
    r, n = grp.to_expert.shape[1], grp.to_assign.shape[1]
    scatter = jax.vmap(lambda s: jnp.full((r,), n, jnp.int32).at[s].set(jnp.arange(n), mode="drop"))
    np.testing.assert_array_equal(grp.to_expert, scatter(grp.to_assign))
    dl = dispatch.DROPLESS.plan(ex, E, capacity_factor)
    np.testing.assert_array_equal(dl.to_assign, jnp.zeros_like(a).at[dl.to_expert].set(a))
    np.testing.assert_array_equal(dl.group_sizes, jnp.bincount(ex.reshape(-1), length=E))
    empty = dispatch.DROPLESS.plan(jnp.zeros((1, 4, 1), jnp.int32), E, 1.0)  # experts 1.. get no rows
    np.testing.assert_array_equal(empty.group_sizes, [4, 0, 0, 0])


@pytest.mark.slow
def test_pick_equals_top_k_values_and_take_along_axis_gradient():
    v = jax.random.normal(jax.random.key(0), (32, E))
    top, ex = jax.lax.top_k(v, 2)
    np.testing.assert_array_equal(moe.pick(v, ex), top)
    w = jax.random.normal(jax.random.key(1), (32, 2))
    got = jax.grad(lambda v: jnp.sum(moe.pick(v, ex) * w))(v)
    want = jax.grad(lambda v: jnp.sum(jnp.take_along_axis(v, ex, axis=-1) * w))(v)
    np.testing.assert_array_equal(got, want)
