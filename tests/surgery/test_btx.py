"""c-BTX surgery (techniques-b.md 5.2, 6.4): identities, exact averages/stacks, routers, shapes, sharding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from voltron_jax import sharding, surgery
from voltron_jax.models import decoder
from voltron_jax.models.attention import Attention
from voltron_jax.models.layers import MLP
from voltron_jax.models.moa import MixtureOfAttention
from voltron_jax.models.moe import MoE
from voltron_jax.surgery import tree as T

E = 4
IDS = jax.random.randint(jax.random.key(0), (2, 16), 0, 259)


def _configs(scan=False, memory="none", n_experts=E):
    dense = tiny.get_config("test")
    m = dense.model
    m.d_model, m.d_ff, m.scan_layers, m.memory = 32, 64, scan, memory
    m.infini.segment_len = 8
    dense.data.seq_len = IDS.shape[1]
    moe = dense.copy_and_resolve_references()
    moe.model.ffn, moe.model.attention = "moe", "moa"
    for c in (moe.model.moe, moe.model.moa):
        c.n_experts, c.impl, c.capacity_factor = n_experts, "dropless", n_experts / 2
    return dense, moe


def _init(config, seeds):
    init = jax.jit(decoder.build_model(config.model).init)
    return [nn.unbox(init(jax.random.key(s), IDS)["params"]) for s in seeds]


def _logits(config, params):
    return jax.jit(decoder.build_model(config.model).apply)({"params": params}, IDS)


def _layer(params, scan):
    """The first layer's params (scanned stacks: index 0 of the layers axis)."""
    if scan:
        return jax.tree.map(lambda a: a[0], params["stack"]["blocks"]["layer_0"])
    return params["stack"]["block_0"]["layer_0"]


@pytest.mark.slow
@pytest.mark.parametrize("scan,memory", [(False, "none"), (True, "infini")])
def test_upcycled_logits_equal_dense_for_any_router(scan, memory):
    dense_cfg, moe_cfg = _configs(scan, memory)
    (dense,) = _init(dense_cfg, [1])
    shapes = surgery.target_shapes(moe_cfg)
    merged = surgery.upcycle(dense, shapes, key=jax.random.key(2), router_std=5.0)  # peaked routers
    assert jax.tree.map(np.shape, merged) == jax.tree.map(np.shape, nn.unbox(shapes))
    np.testing.assert_allclose(_logits(moe_cfg, merged), _logits(dense_cfg, dense), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_upcycled_equals_dense_with_every_technique_on():
    # BitLinear (warm-in state), Infini memory, DenseFormer, MoD, scanned layers; capacity dispatch that
    # cannot drop (capacity factor E / top_k)
    dense_cfg, moe_cfg = _configs(scan=True, memory="infini")
    for c in (dense_cfg, moe_cfg):
        m = c.model
        m.linear, m.residual, m.routing, m.bitlinear.warmin_steps = "bitlinear", "denseformer", "mod", 5
    for c in (moe_cfg.model.moe, moe_cfg.model.moa):
        c.impl, c.capacity_factor = "capacity", E / 2
    variables = nn.unbox(jax.jit(decoder.build_model(dense_cfg.model).init)(jax.random.key(1), IDS))
    dense, state = variables["params"], {"state": variables["state"]}
    merged = surgery.upcycle(dense, surgery.target_shapes(moe_cfg), key=jax.random.key(2), router_std=5.0)
    want = jax.jit(decoder.build_model(dense_cfg.model).apply)({"params": dense, **state}, IDS)
    got = jax.jit(decoder.build_model(moe_cfg.model).apply)({"params": merged, **state}, IDS)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@functools.lru_cache
def _merge_setup(seed_expert=False):
    """Shared by several tests (do not mutate): configs, branches, seed, target shapes, merged tree."""
    dense_cfg, moe_cfg = _configs()
    n = E - int(seed_expert)
    *branches, seed = _init(dense_cfg, [10 + i for i in range(n)] + [99])  # distinct "trained" branches
    seed = seed if seed_expert else None
    shapes = surgery.target_shapes(moe_cfg)
    merged = surgery.btx_merge(branches, shapes, seed_params=seed, key=jax.random.key(0))
    return dense_cfg, moe_cfg, branches, seed, shapes, merged


@pytest.mark.parametrize("seed_expert", [False, True])
def test_merge_stacks_bitwise_and_averages_in_fp32(seed_expert):
    dense_cfg, moe_cfg, branches, seed, shapes, merged = _merge_setup(seed_expert)
    experts = branches + ([seed] if seed_expert else [])
    src = [T.flatten(b) for b in experts]
    out, boxed = T.flatten(merged), T.flatten(shapes)
    stacked, averaged, routers = [], [], []
    for path, val in out.items():
        assert val.shape == T.shape_of(boxed[path]) and val.dtype == T.dtype_of(boxed[path])
        if path[-1] == "router":
            routers.append(path)
            assert np.abs(val).max() > 0 and val.shape[-1] == E
        elif val.shape != src[0][path].shape:
            stacked.append(path)
            axis = boxed[path].names.index("expert")
            for i, s in enumerate(src):  # expert i is source i, bit for bit (the seed last)
                np.testing.assert_array_equal(np.take(val, i, axis=axis), np.asarray(s[path]))
        else:
            averaged.append(path)  # over every expert tree, the seed expert included (spec 5.1, BTX)
            want = np.mean([np.asarray(s[path], np.float64) for s in src], axis=0)
            np.testing.assert_allclose(val, want.astype(np.float32), rtol=1e-6, atol=1e-7)
    names = {p[-2] for p in stacked}
    assert names == {"gate", "up", "down", "q", "o"}, names
    assert {p[-2] for p in routers} == {"ffn", "attn"} and len(routers) == 2 * dense_cfg.model.n_layers
    assert any(p[-2] in ("k", "v") for p in averaged) and any("embed" in p for p in averaged)
    # parameter count: dense + (E-1) * (FFN + Q + O) + one [D,E] router per MoE and per MoA layer
    m = dense_cfg.model
    per_layer = 3 * m.d_model * m.d_ff + 2 * m.d_model * m.n_heads * (m.d_model // m.n_heads)
    want = T.count(branches[0]) + (E - 1) * m.n_layers * per_layer + 2 * m.n_layers * m.d_model * E
    assert T.count(merged) == want


@pytest.mark.slow
def test_full_routing_zero_router_is_mean_of_branch_ffns_and_attentions():
    dense_cfg, moe_cfg, branches, _, _, merged = _merge_setup()
    layer = _layer(merged, scan=False)
    m = moe_cfg.model
    x = jax.random.normal(jax.random.key(3), (2, 16, m.d_model))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    moe = MoE(m.d_ff, n_experts=E, top_k=E, impl="dropless")
    got = jax.jit(moe.apply)({"params": {**layer["ffn"], "router": jnp.zeros((m.d_model, E))}}, x)
    mlp = jax.jit(MLP(m.d_ff).apply)
    want = sum(mlp({"params": _layer(b, False)["ffn"]}, x) for b in branches) / E
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    hd = m.d_model // m.n_heads
    moa = MixtureOfAttention(m.n_heads, m.n_kv_heads, hd, n_experts=E, top_k=E, impl="dropless")
    got = jax.jit(moa.apply)({"params": {**layer["attn"], "router": jnp.zeros((m.d_model, E))}}, x, pos)
    shared = {n: layer["attn"][n] for n in ("k", "v")}  # the averaged K/V
    att = jax.jit(Attention(m.n_heads, m.n_kv_heads, hd).apply)
    want = sum(att({"params": {**_layer(b, False)["attn"], **shared}}, x, pos) for b in branches) / E
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_one_hot_router_reproduces_that_branch_ffn():
    _, moe_cfg, branches, _, _, merged = _merge_setup()
    m, j = moe_cfg.model, 1
    x = jax.random.normal(jax.random.key(4), (2, 16, m.d_model)).at[..., 0].set(1.0)
    router = jnp.zeros((m.d_model, E)).at[0, j].set(100.0)
    moe = MoE(m.d_ff, n_experts=E, top_k=2, impl="capacity", capacity_factor=E / 2)
    got = jax.jit(moe.apply)({"params": {**_layer(merged, False)["ffn"], "router": router}}, x)
    want = jax.jit(MLP(m.d_ff).apply)({"params": _layer(branches[j], False)["ffn"]}, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_extract_expert_round_trip():
    dense_cfg, _, branches, _, shapes, merged = _merge_setup()
    dense_shapes = surgery.target_shapes(dense_cfg)
    sliced = [surgery.extract_expert(merged, shapes, dense_shapes, j) for j in range(E)]
    assert jax.tree.map(np.shape, sliced[0]) == jax.tree.map(np.shape, nn.unbox(dense_shapes))
    ffn = _layer(sliced[2], False)["ffn"]["gate"]["kernel"]
    np.testing.assert_array_equal(ffn, _layer(branches[2], False)["ffn"]["gate"]["kernel"])
    again = surgery.btx_merge(sliced, shapes, key=jax.random.key(0))
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(merged), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_apply_by_name_with_plain_target_shapes():
    # the train loop passes plain ShapeDtypeStructs; the expert axes come from the config's boxed shapes
    dense_cfg, moe_cfg, branches, _, shapes, merged = _merge_setup()
    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nn.unbox(shapes))
    got = surgery.apply("btx_merge", branches, plain, config=moe_cfg, key=jax.random.key(0))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(a, b)
    up = surgery.apply("upcycle", branches[:1], plain, config=moe_cfg, key=jax.random.key(0))
    gate = _layer(up, False)["ffn"]["gate"]["kernel"]  # [E,D,F]: every expert the dense FFN
    np.testing.assert_array_equal(
        gate, np.broadcast_to(_layer(branches[0], False)["ffn"]["gate"]["kernel"], gate.shape)
    )
    with pytest.raises(surgery.SurgeryError, match="unknown"):
        surgery.apply("nope", branches, plain, config=moe_cfg)


def test_expert_count_is_validated_with_a_clear_error():
    dense_cfg, moe_cfg = _configs()
    branches = _merge_setup()[2][: E - 1]
    with pytest.raises(surgery.SurgeryError, match="4 experts but 3 branches give 3"):
        surgery.btx_merge(branches, surgery.target_shapes(moe_cfg))
    surgery.validate(3, 4, seed_expert=True)
    with pytest.raises(surgery.SurgeryError, match="n_experts"):
        surgery.validate(8, 8, seed_expert=True)
    with pytest.raises(surgery.SurgeryError, match="differs from source 0"):
        surgery.btx_merge(
            [branches[0], {**branches[1], "extra": np.zeros(3)}], surgery.target_shapes(moe_cfg)
        )


@pytest.mark.slow
def test_centroid_router_init_uses_per_cluster_mean_router_inputs():
    dense_cfg, moe_cfg, branches, _, shapes, merged = _merge_setup()
    model = decoder.build_model(moe_cfg.model)
    clusters = [[IDS + i] for i in range(E)]  # one batch per cluster
    cents = surgery.centroid_router_init(model, merged, clusters)
    path = ("stack", "block_1", "layer_0", "ffn", "router")
    assert cents[path].shape == (E, moe_cfg.model.d_model)
    # independent reference: the block's normalised FFN input, captured from the model for cluster 2
    _, st = model.apply(
        {"params": merged}, IDS + 2, capture_intermediates=lambda mdl, _: mdl.name == "ffn_norm"
    )
    h = st["intermediates"]["stack"]["block_1"]["layer_0"]["ffn_norm"]["__call__"][0]
    np.testing.assert_allclose(cents[path][2], np.mean(np.asarray(h).reshape(-1, h.shape[-1]), 0), atol=1e-5)
    routed = surgery.btx_merge(branches, shapes, router_init="centroid", centroids=cents, router_scale=2.0)
    w = T.flatten(routed)[path]  # [D,E]: column i = 2 (mu_i - mean mu) / |mu_i - mean mu|
    d = cents[path] - cents[path].mean(0)
    np.testing.assert_allclose(w.T, 2.0 * d / np.linalg.norm(d, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sharded_target_and_orbax_round_trip(tmp_path):
    from voltron_jax.run import checkpoint

    _, moe_cfg, _, _, shapes, merged = _merge_setup()
    moe_cfg = moe_cfg.copy_and_resolve_references()
    moe_cfg.mesh.data, moe_cfg.mesh.expert = 2, E
    mesh = sharding.make_mesh(moe_cfg.mesh)
    shard = sharding.tree_shardings(mesh, shapes)
    gate = T.flatten(shard)[("stack", "block_0", "layer_0", "ffn", "gate", "kernel")]
    assert gate.spec[0] == "expert"
    placed = jax.device_put(merged, shard)
    with checkpoint.Checkpointer(tmp_path / "ck", async_save=False) as ck:
        ck.save(0, {"params": placed}, {}, {})
    target = {
        "params": jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(shapes), shard
        )
    }
    with checkpoint.Checkpointer(tmp_path / "ck") as ck:
        restored, _, _ = ck.restore(target=target)
    for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(placed), strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_merge_matches_btx_merge(tmp_path):
    from voltron_jax.run import checkpoint
    from voltron_jax.surgery.__main__ import main

    dense_cfg, moe_cfg, branches, _, shapes, _ = _merge_setup()
    dirs = []
    for i, b in enumerate(branches):
        with checkpoint.Checkpointer(tmp_path / f"b{i}", async_save=False) as ck:
            ck.save(3, {"params": b, "step": 3}, {}, {})
        dirs.append(str(tmp_path / f"b{i}"))
    out = tmp_path / "merged"
    main(
        [
            "surgery",
            "merge",
            f"--branches={','.join(dirs)}",
            "--config=configs/tiny.py:test",
            f"--out={out}",
            "--config.model.d_model=32",
            "--config.model.d_ff=64",
            "--config.data.seq_len=16",
            "--config.model.ffn=moe",
            "--config.model.attention=moa",
            f"--config.model.moe.n_experts={E}",
            f"--config.model.moa.n_experts={E}",
        ]
    )
    with checkpoint.Checkpointer(out) as ck:
        state, _, meta = ck.restore()
    want = surgery.btx_merge(
        branches, shapes, key=jax.random.key(0), router_std=moe_cfg.model.moe.router_init_std
    )
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert meta["surgery"]["command"] == "merge"
