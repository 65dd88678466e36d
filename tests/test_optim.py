"""Optimizer: parameter groups keyed on paths (snapshot), MiniCPM width-scaled lr on exactly the intended
set (techniques-b.md 2.3/2.5), Infini gate lr, weight-decay masks and switch, global step, exact resume."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from voltron_jax import optim, schedules
from voltron_jax.models.decoder import build_model

V, D, F, E, H, L = 11, 8, 12, 4, 2, 3

# (shape, logical axis names) of a small tree with every kind of parameter; 'blocks' is a scanned stack.
SPEC = {
    "embed": {"embedding": ((V, D), ("vocab", "embed"))},
    "final_norm": {"scale": ((D,), ("norm",))},
    "lm_head": {"kernel": ((D, V), ("embed", "vocab"))},
    "stack": {
        "blocks": {
            "layer_0": {
                "attn": {
                    "q": {"kernel": ((L, D, D), ("layers", "embed", "heads"))},
                    "core": {"beta": ((L, H), ("layers", "heads"))},
                },
                "attn_norm": {"scale": ((L, D), ("layers", "norm"))},
                "ffn": {
                    "gate": {"kernel": ((L, D, F), ("layers", "embed", "mlp"))},
                    "router": {"kernel": ((L, D, E), ("layers", "embed", "expert"))},
                    "wi": ((L, E, D, F), ("layers", "expert", "embed", "mlp")),
                    "bias": ((L, F), ("layers", "mlp")),
                },
            }
        }
    },
    "dwa_weights": {"alpha": ((L + 1,), ("dwa",))},
    "mod": {"predictor": {"kernel": ((D, 1), ("embed", None)), "bias": ((1,), (None,))}},
}
SNAPSHOT = {
    "embed": {"embedding": "embedding"},
    "final_norm": {"scale": "norm"},
    "lm_head": {"kernel": "matrix"},
    "stack": {
        "blocks": {
            "layer_0": {
                "attn": {"q": {"kernel": "matrix"}, "core": {"beta": "gate"}},
                "attn_norm": {"scale": "norm"},
                "ffn": {
                    "gate": {"kernel": "matrix"},
                    "router": {"kernel": "router"},
                    "wi": "matrix",
                    "bias": "vector",
                },
            }
        }
    },
    "dwa_weights": {"alpha": "alpha"},
    "mod": {"predictor": {"kernel": "router", "bias": "vector"}},
}


def is_spec(x):
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def make_params(boxed=False, seed=0):
    leaves, treedef = jax.tree.flatten(SPEC, is_leaf=is_spec)
    rng = np.random.default_rng(seed)  # numpy: no per-shape compiles
    arrays = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s, _ in leaves]
    if boxed:
        arrays = [nn.LogicallyPartitioned(a, names) for a, (_, names) in zip(arrays, leaves, strict=True)]
    return jax.tree.unflatten(treedef, arrays)


def config(**optim_kw):
    """tiny:test selecting every technique whose params SPEC holds (their slot classes declare the rules
    that group those params)."""
    c = tiny.get_config("test")
    c.model.update(dict(memory="infini", ffn="moe", residual="denseformer", routing="mod"))
    c.schedule.name, c.schedule.warmup = "constant", 0
    c.optim.grad_clip, c.optim.weight_decay = 0.0, 0.0
    for k, v in optim_kw.items():
        c.optim[k] = v
    return c


def test_param_labels_snapshot_plain_and_boxed():
    assert optim.param_labels(make_params()) == SNAPSHOT
    assert optim.param_labels(make_params(boxed=True)) == SNAPSHOT
    abstract = jax.eval_shape(lambda: make_params(boxed=True))
    assert optim.param_labels(abstract) == SNAPSHOT


def test_slot_rules_apply_only_where_the_slot_declares_them():
    """A leaf named 'beta' is the Infini gate only inside the core of a model that selects infini (the
    rule is InfiniCore's PARAM_GROUPS); elsewhere it is a plain vector, so no other module's 'beta' gets
    the gate's learning rate by its name alone."""
    tree = {"attn": {"core": {"beta": jnp.zeros((H,))}}, "ffn": {"beta": jnp.zeros((D,))}}
    c = tiny.get_config("test")
    assert optim.param_labels(tree, c.model) == {
        "attn": {"core": {"beta": "vector"}},
        "ffn": {"beta": "vector"},
    }
    c.model.memory = "infini"
    assert optim.param_labels(tree, c.model) == {
        "attn": {"core": {"beta": "gate"}},
        "ffn": {"beta": "vector"},
    }


def test_scanned_axis_is_not_a_matrix_dimension():
    # [L, D] under 'blocks' is a stacked vector, [D, D] elsewhere a matrix; boxed: the 'layers' name decides
    assert optim.param_labels({"blocks": {"w": jnp.zeros((L, D))}, "x": {"w": jnp.zeros((D, D))}}) == {
        "blocks": {"w": "vector"},
        "x": {"w": "matrix"},
    }
    boxed = {"scan": {"w": nn.Partitioned(jnp.zeros((L, D)), ("layers", "embed"))}}
    assert optim.param_labels(boxed) == {"scan": {"w": "vector"}}


@pytest.mark.parametrize("scan", [False, True])
def test_model_param_labels(scan):
    c = tiny.get_config("test")
    c.model.scan_layers = scan
    model = build_model(c.model)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    flat = jax.tree_util.tree_flatten_with_path(optim.param_labels(params))[0]
    by_leaf = {(optim.path_names(p)[-1], lab) for p, lab in flat}
    assert by_leaf == {("embedding", "embedding"), ("scale", "norm"), ("kernel", "matrix")}
    assert optim.param_labels(params) == optim.param_labels(nn.unbox(params))


@pytest.mark.parametrize(
    "slots,group,leaf",
    [
        ({"memory": "infini"}, "gate", "beta"),  # Infini-attention gate: own lr, no decay
        ({"ffn": "moe", "attention": "moa"}, "router", "router"),  # expert routers: no decay
        ({"routing": "mod"}, "router", "w_in"),  # MoD aux predictor
        ({"residual": "denseformer"}, "alpha", "alpha"),  # DWA weights: decay only with optim.decay_alpha
    ],
)
def test_technique_params_land_in_their_groups(slots, group, leaf):
    """The technique modules follow the naming rule of optim.py, so their special params are grouped."""
    c = tiny.get_config("test")
    c.model.update(slots)
    model = build_model(c.model)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32)))["params"]
    flat = jax.tree_util.tree_flatten_with_path(optim.param_labels(params))[0]
    labels = {optim.path_names(p): lab for p, lab in flat}
    assert {lab for names, lab in labels.items() if names[-1] == leaf} == {group}
    assert all(lab == "norm" for names, lab in labels.items() if names[-1] == "scale")


def first_update(c, params, grads):
    tx = optim.make_optimizer(c, params, "stable")
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return updates


@pytest.mark.parametrize("mup_embed_lr", [pytest.param(False, marks=pytest.mark.slow), True])
def test_width_scaled_lr_exactly_on_intended_set(mup_embed_lr):
    c = config(mup_embed_lr=mup_embed_lr, gate_lr=5e-2)
    c.model.d_model, c.model.dim_model_base = 64, 16  # width factor 4
    params, grads = make_params(), make_params(seed=1)
    updates = first_update(c, params, grads)
    lr = c.optim.lr
    mult = {
        "matrix": lr / 4,
        "router": lr / 4,
        "embedding": lr / 4 if mup_embed_lr else lr,
        "gate": 5e-2,
        "norm": lr,
        "alpha": lr,
        "vector": lr,
    }
    # Adam's first step is g / (|g| + eps) ~ sign(g): the update is -lr * multiplier * that, per group
    eps = c.optim.eps
    expected = jax.tree.map(lambda lab, g: -mult[lab] * np.asarray(g) / (np.abs(g) + eps), SNAPSHOT, grads)
    jax.tree.map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-6), updates, expected)


@pytest.mark.slow
def test_boxed_and_plain_trees_give_the_same_updates():
    c = config(weight_decay=0.1)
    c.model.d_model, c.model.dim_model_base = 64, 32
    plain, grads = make_params(), make_params(seed=1)
    boxed = make_params(boxed=True)
    tx = optim.make_optimizer(c, jax.eval_shape(lambda: boxed), "stable")  # built from an abstract boxed tree
    update = jax.jit(tx.update)
    u_plain, _ = update(grads, tx.init(plain), plain)
    boxed_grads = jax.tree.map(
        lambda b, g: b.replace_boxed(g), boxed, grads, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    u_boxed, _ = update(boxed_grads, tx.init(boxed), boxed)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), u_plain, nn.unbox(u_boxed))


def decay_updates(c, steps):
    """Updates for zero grads (Adam's part is exactly 0, so only decoupled weight decay moves params)."""
    params = make_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = optim.make_optimizer(c, params, "stable")
    state, out = tx.init(params), []
    update = jax.jit(tx.update)
    for _ in range(steps):
        u, state = update(zeros, state, params)
        out.append(u)
    return params, out


@pytest.mark.parametrize(
    "decay_alpha,decay_embed", [pytest.param(False, False, marks=pytest.mark.slow), (True, True)]
)
def test_weight_decay_mask_and_switch(decay_alpha, decay_embed):
    c = config(weight_decay=0.1, wd_zero_step=3, decay_alpha=decay_alpha, decay_embed=decay_embed)
    params, out = decay_updates(c, 5)
    decayed = {"matrix"} | ({"alpha"} if decay_alpha else set()) | ({"embedding"} if decay_embed else set())
    lr = c.optim.lr
    for step, u in enumerate(out):
        wd = 0.1 if step < 3 else 0.0
        expected = jax.tree.map(lambda lab, p, wd=wd: -lr * wd * p * (lab in decayed), SNAPSHOT, params)
        jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-6, atol=0), u, expected)


def test_optimizer_counts_global_steps_from_the_phase_start():
    c = tiny.get_config("test")  # stable 8 steps, decay 4 (wsd): the decay phase starts at global step 8
    c.schedule.half_life = 1
    params = make_params()
    tx = optim.make_optimizer(c, params, "decay")
    state = tx.init(params)
    lr = schedules.lr_schedule(c, "decay")
    assert int(state[-1].step) == 8 and float(optim.current_lr(state)) == float(lr(8))
    update = jax.jit(tx.update)
    for s in range(8, 11):
        _, state = update(make_params(seed=s), state, params)
        assert float(optim.current_lr(state)) == float(lr(s)) == pytest.approx(c.optim.lr * 0.5 ** (s - 8))
    assert int(state[-1].step) == 11


def test_resume_from_host_copy_is_bitwise_exact():
    c = tiny.get_config("test")
    params = make_params()
    tx = optim.make_optimizer(c, params, "stable")
    step = jax.jit(lambda p, s, g: (lambda u, s2: (jax.tree.map(jnp.add, p, u), s2))(*tx.update(g, s, p)))
    grads = [make_params(seed=10 + i) for i in range(4)]
    p, s = params, tx.init(params)
    for g in grads[:2]:
        p, s = step(p, s, g)
    p2, s2 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), (p, s))  # as if saved and restored
    for g in grads[2:]:
        p, s = step(p, s, g)
        p2, s2 = step(p2, s2, g)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), (p, s), (p2, s2))


def test_global_norm_clipping_and_unknown_param():
    c = config(grad_clip=1.0)
    params = make_params()
    grads = jax.tree.map(lambda x: 100.0 * np.asarray(x), make_params(seed=1))
    tx = optim.make_optimizer(c, params, "stable")
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    mu = state[1].mu  # Adam's first moment after one step: (1 - b1) * clipped grads
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(mu["lm_head"]["kernel"], 0.1 * grads["lm_head"]["kernel"] / norm, rtol=1e-5)
    other = {**params, "extra": {"kernel": jnp.ones((D, D))}}  # not the tree the optimizer was built for
    with pytest.raises(KeyError, match="extra/kernel"):
        jax.jit(tx.update)(other, tx.init(other), other)


@pytest.mark.slow
def test_bf16_moments_store_half_and_track_fp32_adam():
    """optim.moments_dtype='bfloat16': mu and nu are stored in bf16 (same ScaleByAdamState layout as
    optax), and the updates of a few steps stay within bf16 rounding of optax's fp32 Adam."""
    import optax

    params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params) for i in range(4)]
    ref, low = optax.scale_by_adam(0.9, 0.95, 1e-8), optim.scale_by_adam_stored(0.9, 0.95, 1e-8, jnp.bfloat16)
    s_ref, s_low = ref.init(params), low.init(params)
    assert s_low.mu["w"].dtype == jnp.bfloat16 and s_low.nu["w"].dtype == jnp.bfloat16
    assert type(s_low) is type(s_ref)
    for g in grads:
        u_ref, s_ref = ref.update(g, s_ref)
        u_low, s_low = low.update(g, s_low)
        assert u_low["w"].dtype == jnp.float32
        np.testing.assert_allclose(u_low["w"], u_ref["w"], rtol=2e-2, atol=2e-3)
    assert int(s_low.count) == 4
    c = tiny.get_config("test")
    c.optim.moments_dtype = "bfloat16"
    model = build_model(c.model)
    ids = jnp.zeros((1, c.data.seq_len), jnp.int32)
    p = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids)["params"])
    state = jax.eval_shape(optim.make_optimizer(c, p, "stable").init, p)
    assert {a.dtype for a in jax.tree.leaves(state) if a.ndim >= 2} == {jnp.dtype(jnp.bfloat16)}
    c.optim.moments_dtype = "float8"
    with pytest.raises(Exception, match="moments_dtype"):
        optim.make_optimizer(c, p, "stable")
