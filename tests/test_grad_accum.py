"""Gradient accumulation (voltron_jax/microbatch.py): N microbatches of B/N give the update of one batch
of B, unsharded and on the 8-device mesh; aux losses and metrics are the exact averages; bad settings
fail in validate."""

import jax
import numpy as np
import optax
import pytest

from configs import tiny
from voltron_jax import config as cfglib
from voltron_jax import microbatch, sharding, train

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


def _batch(rows=8, seq=64, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 259, size=(rows, seq + 1)).astype(np.int32)
    weights = np.ones((rows, seq), np.float32)
    weights[0, 40:] = 0.0  # uneven token counts: microbatch means must be weighted by tokens, not 1/N
    weights[3, 10:] = 0.0
    return {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "weights": weights,
        "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
        "segment_ids": np.ones((rows, seq), np.int32),
    }


def _sgd_step(c, devices):
    """One step with SGD(lr=1): params' change is minus the accumulated gradient."""
    rt = train.Runtime(train.Phase("stable", None, c, None, 0, 2), devices=devices)
    state = rt.scratch()
    p0 = jax.device_get(state.params)
    step = jax.jit(
        sharding.traced_in(
            rt.mesh,
            train.make_train_step(rt.model, optax.sgd(1.0), c, rt.lr_fn, None, rt.shardings.params),
        )
    )
    tx_state = train.TrainState(state.step, state.params, optax.sgd(1.0).init(state.params))
    new, m = step(tx_state, sharding.host_batch_to_global(rt.mesh, _batch()))
    grads = jax.tree.map(lambda a, b: a - b, p0, jax.device_get(new.params))
    return grads, jax.device_get(m)


@pytest.mark.parametrize("mesh", [SINGLE, SHARDED], ids=["unsharded", "sharded"])
def test_microbatches_give_the_gradient_and_metrics_of_one_batch(mesh):
    devices = jax.devices()[:1] if mesh is SINGLE else jax.devices()
    g1, m1 = _sgd_step(_config(1, mesh), devices)
    g4, m4 = _sgd_step(_config(2, mesh), devices)  # 8 rows, 2 microbatches of 4 (2 per batch shard)
    for k in ("loss", "ce", "z_loss", "grad_norm"):
        assert m4[k] == pytest.approx(m1[k], rel=1e-6), k
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)
    if mesh is SINGLE:  # and 4 microbatches of 2
        g8, m8 = _sgd_step(_config(4, mesh), devices)
        assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-6)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)
