"""c-BTX merge options (config.surgery): centroid routers and the seed as an extra expert, from the pure
functions through surgery.apply to the train loop's merge phase (techniques-b.md 4.1, 5, 5.1)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_btx import E, _configs, _init, _merge_setup

from configs import recipe_tiny, tiny
from voltron_jax import config as cfglib
from voltron_jax import surgery, train
from voltron_jax.data import corpus, pipeline, tasks
from voltron_jax.models import decoder
from voltron_jax.run import checkpoint
from voltron_jax.surgery import tree as T

NORMS = {"attn_norm": "attn", "ffn_norm": "ffn"}  # block norm -> the MoA / MoE that reads its output


def _cluster(i: int, seed: int, n: int = 2) -> list:
    """n batches [4,16] of 'cluster i': token ids from its own 57-id slice of the vocabulary."""
    return [
        jax.random.randint(jax.random.key(100 * seed + j), (4, 16), 60 * i + 3, 60 * i + 60) for j in range(n)
    ]


def _top1_hits(model, params, batches: list, *args) -> float:
    """Mean over routers and clusters of the fraction of cluster-i tokens whose top-1 expert is i.

    batches[i]: the inputs of cluster i (ids, plus positions for the loop's model)."""
    apply = jax.jit(
        lambda p, *a: model.apply({"params": p}, *a, capture_intermediates=lambda m, _: m.name in NORMS)[1]
    )
    routers, hits = T.flatten(params), []
    for i, inputs in enumerate(batches):
        for path, h in T.flatten(apply(params, *inputs)["intermediates"]).items():
            if "__call__" not in path:  # sown values share the collection
                continue
            w = routers[path[:-3] + (NORMS[path[-3]], "router")]  # [D,E]
            top = np.argmax(np.asarray(h, np.float32).reshape(-1, h.shape[-1]) @ np.asarray(w), axis=-1)
            hits.append(np.mean(top == i))
    return float(np.mean(hits))


@pytest.mark.slow
def test_centroid_routers_send_each_cluster_to_its_expert():
    _, moe_cfg, branches, _, shapes, merged = _merge_setup()  # random routers
    model = decoder.build_model(moe_cfg.model)
    cents = surgery.centroid_router_init(model, merged, [_cluster(i, 1) for i in range(E)])
    routed = surgery.btx_merge(
        branches, shapes, router_init="centroid", centroids=cents, key=jax.random.key(0)
    )
    held_out = [(_cluster(i, 2, 1)[0],) for i in range(E)]  # new batches of the same clusters
    random_hits = _top1_hits(model, merged, held_out)
    centroid_hits = _top1_hits(model, routed, held_out)
    assert random_hits < 1 / E + 0.1, random_hits  # chance
    assert centroid_hits > 0.4 and centroid_hits > random_hits + 0.15, (centroid_hits, random_hits)


def _probe(model, n_batches_seen: list):
    """A Probe like the loop's, on the host: token-id batches of _cluster(i, seed=1)."""
    run = jax.jit(
        lambda p, ids: model.apply({"params": p}, ids, mutable=["intermediates"])[1]["intermediates"]
    )

    def batches(i):
        for j, ids in enumerate(_cluster(i, 1, n=5)):
            n_batches_seen[i] = j + 1
            yield ids

    return surgery.Probe(forward=lambda params: functools.partial(run, params), batches=batches)


@pytest.mark.slow
def test_apply_centroid_routers_with_the_seed_expert():
    dense_cfg, moe_cfg, branches, seed, shapes, _ = _merge_setup(seed_expert=True)  # 3 branches + seed
    cfg = moe_cfg.copy_and_resolve_references()
    cfg.surgery.router_init, cfg.surgery.centroid_batches, cfg.surgery.seed_expert = "centroid", 2, True
    cfg.surgery.router_scale = 3.0
    model, seen = decoder.build_model(cfg.model), [0] * (E - 1)
    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nn.unbox(shapes))
    got = surgery.apply(
        "btx_merge",
        branches,
        plain,
        config=cfg,
        key=jax.random.key(5),
        seed_params=seed,
        probe=_probe(model, seen),
    )
    assert seen == [2] * (E - 1)  # centroid_batches per cluster, no more
    std = cfg.model.moe.router_init_std
    rand = surgery.btx_merge(branches, shapes, seed_params=seed, key=jax.random.key(5), router_std=std)
    cents = surgery.centroid_router_init(model, rand, [_cluster(i, 1) for i in range(E - 1)])
    out, r, experts = T.flatten(got), T.flatten(rand), [T.flatten(b) for b in (*branches, seed)]
    for path, val in out.items():
        if path[-1] == "router":  # [D,E]: clusters 0..2 -> centred, normalised centroids; the seed: random
            d = cents[path] - cents[path].mean(0)
            want = 3.0 * d / np.linalg.norm(d, axis=-1, keepdims=True)
            np.testing.assert_allclose(val[:, : E - 1].T, want, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(val[:, E - 1], r[path][:, E - 1])
        elif val.shape != experts[0][path].shape:  # expert axis first (not scanned): the seed is expert E-1
            for k, src in enumerate(experts):
                np.testing.assert_array_equal(val[k], src[path])
        else:  # shared leaves: the fp32 mean over every expert tree, the seed included
            want = np.mean([np.asarray(s[path], np.float64) for s in experts], axis=0)
            np.testing.assert_allclose(val, want.astype(np.float32), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_apply_checks_the_seed_expert_and_expert_counts():
    dense_cfg, moe_cfg = _configs()  # E experts
    branches = _merge_setup()[2]  # E branches
    (seed,) = _init(dense_cfg, [99])
    plain = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nn.unbox(surgery.target_shapes(moe_cfg))
    )
    cfg = moe_cfg.copy_and_resolve_references()
    cfg.surgery.seed_expert = True
    with pytest.raises(surgery.SurgeryError, match="4 experts but 4 branches \\+ 1 seed expert give 5"):
        surgery.apply("btx_merge", branches, plain, config=cfg, seed_params=seed)
    with pytest.raises(surgery.SurgeryError, match="seed_expert=True but seed params were not given"):
        surgery.apply("btx_merge", branches[:3], plain, config=cfg)
    cfg.surgery.seed_expert, cfg.surgery.router_init = False, "centroid"
    with pytest.raises(surgery.SurgeryError, match="Probe"):
        surgery.apply("btx_merge", branches, plain, config=cfg)
    with pytest.raises(surgery.SurgeryError, match="random routers"):
        surgery.apply("upcycle", branches[:1], plain, config=cfg)


def test_config_validation_names_the_fix():
    c = recipe_tiny.get_config("seed_expert")
    assert c.model.moe.n_experts == c.model.moa.n_experts == 9
    cfglib.validate(c)
    c.model.moe.n_experts = 8
    with pytest.raises(
        cfglib.ConfigError, match="8 branches \\+ 1 seed expert .* make 9 experts.*n_experts=8"
    ):
        cfglib.validate(c)
    c = recipe_tiny.get_config("")
    c.surgery.router_init = "kmeans"
    with pytest.raises(cfglib.ConfigError, match="surgery.router_init='kmeans'.*'random', 'centroid'"):
        cfglib.validate(c)
    c = tiny.get_config("test")  # a merge of two plain (not fan-out) phases: no cluster for centroids
    c.recipe.other = cfglib.phase(4)
    c.recipe.decay = cfglib.phase(
        4, stage="decay", init_from=["stable", "other"], surgery="btx_merge", keep_optimizer=False,
        overrides={"model.ffn": "moe", "model.moe.n_experts": 2, "surgery.router_init": "centroid"},
    )  # fmt: skip
    with pytest.raises(cfglib.ConfigError, match="needs every parent to be a fan-out phase"):
        cfglib.validate(c)
    c.recipe.decay.overrides = cfglib.nest(
        {"model.ffn": "moe", "model.moe.n_experts": 3, "surgery.seed_expert": True}
    )
    with pytest.raises(cfglib.ConfigError, match="one seed phase, but they start from scratch"):
        cfglib.validate(c)
    c.recipe.decay.overrides = cfglib.nest({"model.ffn": "moe", "model.moe.n_experts": 2})
    cfglib.validate(c)
    with pytest.raises(ValueError, match="unknown variant"):
        recipe_tiny.get_config("continue,seed_expert")


# --------------------------------------------------------------------------------------------- the loop

ALPHABETS = ("abcdefghijklmnopqrstuvwxyz ", "0123456789 +-*/=", "ABCDEFGHIJKLMNOPQRSTUVWXYZ_.")


@pytest.mark.slow
def test_loop_merge_phase_centroid_routers_and_seed_expert_on_an_expert_mesh(tmp_path, monkeypatch):
    n = len(ALPHABETS)  # clusters = branches; + the seed = 4 experts, sharded over mesh.expert=4
    rng = np.random.default_rng(0)
    for i, abc in enumerate(ALPHABETS):  # cluster i: documents over its own alphabet
        docs = ["".join(rng.choice(list(abc), 300)) for _ in range(12)]
        source = corpus.DocumentSource({"train": docs, "validation": docs[:2]})
        monkeypatch.setitem(tasks._SOURCES, tasks.task_name(f"cluster_{i}"), source)
    c = tiny.get_config("test")
    c.data.n_clusters, c.mesh.data, c.mesh.expert = n, 2, n + 1
    c.model.moe.n_experts = c.model.moa.n_experts = n + 1
    c.surgery.router_init, c.surgery.centroid_batches, c.surgery.seed_expert = "centroid", 2, True
    c.recipe = ml_collections.ConfigDict()
    c.recipe.stable = cfglib.phase(2)
    c.recipe.branch = cfglib.phase(1, mixture="cluster", init_from=["stable"], fan_out=n)
    c.recipe.mix = cfglib.phase(
        0, init_from=["branch"], surgery="btx_merge", keep_optimizer=False,
        overrides={"model.ffn": "moe", "model.attention": "moa"},
    )  # fmt: skip
    cfglib.validate(c, n_devices=jax.device_count())
    phases = train.phases(c, tmp_path)
    dense = {}  # finished parents: distinct random params per phase / member, saved as the loop would
    for k, p in enumerate(phases[:-1]):
        rt = train.Runtime(p)
        dense[p.label] = nn.unbox(
            rt.model.init(jax.random.key(10 + k), jnp.zeros((1, 8), jnp.int32))["params"]
        )
        with checkpoint.Checkpointer(p.directory / "ckpt", async_save=False) as ck:
            ck.save(p.start + p.steps, rt.place(dense[p.label]), {}, {}, force=True)
    mix = phases[-1]
    rt = train.Runtime(mix)
    state = train.init_from_parents(rt, c, phases, mix)
    gate = state.params["stack"]["block_0"]["layer_0"]["ffn"]["gate"]["kernel"]  # [E,D,F]
    assert gate.sharding.spec[0] == "expert"
    experts = [dense[f"branch/{i}"] for i in range(n)] + [dense["stable"]]  # branch i -> expert i; seed last
    for k, src in enumerate(experts):
        np.testing.assert_array_equal(
            np.asarray(gate)[k], src["stack"]["block_0"]["layer_0"]["ffn"]["gate"]["kernel"]
        )
    # cluster i's training tokens now pick expert i far more often than under the random-router merge
    batches = []
    for i in range(n):
        b = next(pipeline.make_train_iterator(mix.config, "cluster", seed=123, cluster=i))
        batches.append((b["inputs"], b["positions"]))
    cfg = cfglib.apply_overrides(mix.config, {"surgery.router_init": "random"})
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), rt.abstract.params)
    sources = [dense[f"branch/{i}"] for i in range(n)]
    rand = surgery.apply(
        "btx_merge", sources, shapes, config=cfg, key=jax.random.key(0), seed_params=dense["stable"]
    )
    random_hits = _top1_hits(rt.model, rand, batches)
    centroid_hits = _top1_hits(rt.model, jax.device_get(state.params), batches)
    assert centroid_hits > 0.6 and centroid_hits > random_hits + 0.25, (centroid_hits, random_hits)
