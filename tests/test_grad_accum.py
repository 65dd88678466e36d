"""Gradient accumulation (voltron_jax/microbatch.py): N microbatches of B/N give the update of one batch
of B, unsharded and on the 8-device mesh; aux losses and metrics are the exact averages; bad settings
fail in validate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from voltron_jax import config as cfglib
from voltron_jax import microbatch, sharding, testing, train

SINGLE = dict(data=1, fsdp=1, tensor=1, expert=1)
SHARDED = dict(data=2, fsdp=2, tensor=2, expert=1)


def _config(n=1, mesh=SINGLE, **kw):
    c = tiny.get_config("test")
    c.mesh.update(mesh)
    c.train.grad_accum_steps = n
    c.aux_weights.z_loss = 1e-2  # a second token-mean term, large enough to matter
    for k, v in kw.items():
        c.update_from_flattened_dict({k: v})
    return c


def _batch():
    """The tiny test config's [8, 64] synthetic batch with uneven token counts per row."""
    batch = testing.synthetic_batch(tiny.get_config("test"))
    # uneven token counts: microbatch means must be weighted by tokens, not 1/N
    batch["weights"][0, 40:] = 0.0
    batch["weights"][3, 10:] = 0.0
    return batch


# An "optimizer" whose state after a step is that step's gradient, exactly (params stay put).
KEEP_GRADS = optax.GradientTransformation(
    lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g)
)


def _grad_step(c, devices, rows=None):
    """(gradient, metrics) of one train step. `rows=(k, ...)`: a list of them, one per microbatch k of 2
    of the test batch (rows k, k+2, ...)."""
    rt = train.Runtime(train.Phase("stable", None, c, None, 0, 2), devices=devices)
    state = rt.scratch()
    step = jax.jit(
        sharding.traced_in(
            rt.mesh, train.make_train_step(rt.model, KEEP_GRADS, c, rt.lr_fn, None, rt.shardings.params)
        )
    )
    state = train.TrainState(state.step, state.params, KEEP_GRADS.init(state.params))
    out = []
    for r in [None] if rows is None else rows:  # one compile for every microbatch asked for
        batch = _batch() if r is None else {k: v[r::2] for k, v in _batch().items()}
        new, m = step(state, sharding.host_batch_to_global(rt.mesh, batch))
        out.append((jax.device_get(new.opt_state), jax.device_get(m)))
    return out[0] if rows is None else out


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [SINGLE, SHARDED], ids=["unsharded", "sharded"])
def test_microbatches_give_the_gradient_and_metrics_of_one_batch(mesh):
    devices = jax.devices()[:1] if mesh is SINGLE else jax.devices()
    g1, m1 = _grad_step(_config(1, mesh), devices)
    g4, m4 = _grad_step(_config(2, mesh), devices)  # 8 rows, 2 microbatches of 4 (2 per batch shard)
    for k in ("loss", "ce", "z_loss", "grad_norm"):
        assert m4[k] == pytest.approx(m1[k], rel=1e-6), k
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)


def test_accumulate_sums_the_microbatch_shares_into_the_full_batch_gradient():
    """A weighted least-squares loss: the microbatch split is strided, shares weight by tokens, and the
    bf16 accumulator returns gradients in the parameters' dtype."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(12,)), jnp.float32)
    w = jnp.asarray(rng.integers(0, 3, size=(12,)), jnp.float32)
    params = {"a": jnp.asarray(rng.normal(size=(5,)), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    batch = {"x": x, "y": y, "w": w}

    def loss(p, b, share=1.0):
        err = jnp.sum(b["w"] * (b["x"] @ p["a"] + p["b"] - b["y"]) ** 2) / jnp.maximum(jnp.sum(b["w"]), 1.0)
        return err * share, {"err": err * share}

    total = jnp.maximum(jnp.sum(w), 1.0)

    def micro(p, b):
        return jax.value_and_grad(loss, has_aux=True)(p, b, jnp.maximum(jnp.sum(b["w"]), 1.0) / total)

    (want, _), g_want = jax.value_and_grad(loss, has_aux=True)(params, batch)
    np.testing.assert_array_equal(microbatch.split(x, 3)[1], x[1::3])  # microbatch k: rows k, k+N, ...
    for n in (2, 3, 4):
        (got, aux), g = jax.jit(lambda p, b, n=n: microbatch.accumulate(micro, p, b, n))(params, batch)
        assert float(got) == pytest.approx(float(want), rel=1e-6) and float(aux["err"]) == pytest.approx(
            float(want), rel=1e-6
        )
        for k in params:
            np.testing.assert_allclose(g[k], g_want[k], rtol=1e-5, atol=1e-7)
    _, g16 = microbatch.accumulate(micro, params, batch, 3, jnp.bfloat16)
    for k in params:
        assert g16[k].dtype == jnp.float32
        np.testing.assert_allclose(g16[k], g_want[k], rtol=2e-2, atol=2e-2)


def test_accumulator_dtype_and_validation():
    c = _config(2)
    assert microbatch.accumulator_dtype(c) == jnp.float32
    c.train.grad_accum_dtype, c.optim.moments_dtype = "moments", "bfloat16"
    assert microbatch.accumulator_dtype(c) == jnp.bfloat16
    cfglib.validate(_config(2, SHARDED), n_devices=8)  # 8 rows, 2 microbatches of 4 over 4 batch shards
    with pytest.raises(cfglib.ConfigError, match="divide data.batch_size=8"):
        cfglib.validate(_config(3))
    with pytest.raises(cfglib.ConfigError, match="microbatch .* = 2 is not divisible by the 4 batch shards"):
        cfglib.validate(_config(4, SHARDED), n_devices=8)
    with pytest.raises(cfglib.ConfigError, match="grad_accum_dtype"):
        cfglib.validate(_config(2, **{"train.grad_accum_dtype": "float16"}))


@pytest.mark.slow
def test_moe_token_mean_aux_losses_accumulate_exactly_and_load_balance_is_the_microbatch_mean():
    """MoE (dense dispatch: per-token routing): the router z-loss is a token mean, so the update still
    equals the one-batch update; the Switch load-balancing loss is a statistic of the batch, so its
    accumulated value is the mean of the microbatches' values (as in MaxText and Megatron-LM)."""
    moe = {"model.ffn": "moe", "model.moe.impl": "dense", "aux_weights.moe_z": 0.1}
    devices = jax.devices()[:1]
    g1, m1 = _grad_step(_config(1, **moe, **{"aux_weights.moe_lb": 0.0}), devices)
    g2, m2 = _grad_step(_config(2, **moe, **{"aux_weights.moe_lb": 0.0}), devices)
    for k in ("loss", "ce", "aux/moe_z"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-6), k
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)
    _, m_acc = _grad_step(_config(2, **moe), devices)
    halves = _grad_step(_config(1, **moe, **{"data.batch_size": 4}), devices, rows=(0, 1))
    assert m_acc["aux/moe_lb"] == pytest.approx(np.mean([m["aux/moe_lb"] for _, m in halves]), rel=1e-6)


@pytest.mark.slow  # 45 s here under load (a libtpu compile)
def test_accumulated_step_compiles_for_a_tpu_topology():
    """The scanned microbatches and the accumulator on the params' shardings lower and compile with libtpu
    (the AOT path of launch/aot_compile.py, on the tiny config: 2 microbatches of 4 over 4 chips)."""
    pytest.importorskip("libtpu")
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "aot_compile", os.path.join(root, "launch", "aot_compile.py")
    )
    aot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aot)
    r = aot.compile_step(_config(2, dict(data=-1, fsdp=1, tensor=1, expert=1)), "v4:2x2x1")
    assert r["fits"] and r["devices"] == 4 and r["batch"] == 8
