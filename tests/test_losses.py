"""The vocabulary-tiled cross-entropy (voltron_jax/losses.py) equals the full-logits loss, values and
gradients, and never builds a [B,T,V] array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from voltron_jax import losses, train
from voltron_jax.config import validate
from voltron_jax.errors import ConfigError
from voltron_jax.models import decoder

B, T, D, V = 2, 16, 8, 37


def _inputs(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 4)
    h = (3.0 * jax.random.normal(k[0], (B, T, D))).astype(dtype)
    w = jax.random.normal(k[1], (D, V))
    targets = jax.random.randint(k[2], (B, T), 0, V)
    weights = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
    return h, w, targets, weights


def _loss(ce_zl):
    ce, zl = ce_zl
    return ce + 0.1 * zl  # both outputs carry gradient


# one tile, padded tiles, column by column, tile > V: padded tiles alone in the fast tier
@pytest.mark.parametrize(
    "tile", [pytest.param(t, marks=pytest.mark.slow) if t != 10 else t for t in (V, 10, 1, 64)]
)
def test_tiled_equals_full_logits_fp32(tile):
    h, w, targets, weights = _inputs()
    ref = lambda h, w: _loss(losses.cross_entropy(jnp.dot(h, w), targets, weights))
    got = lambda h, w: _loss(losses.head_cross_entropy(h, w, targets, weights, tile))
    np.testing.assert_allclose(
        losses.head_cross_entropy(h, w, targets, weights, tile),
        losses.cross_entropy(jnp.dot(h, w), targets, weights),
        rtol=1e-6,
    )
    (v_ref, g_ref), (v_got, g_got) = [jax.value_and_grad(f, argnums=(0, 1))(h, w) for f in (ref, got)]
    np.testing.assert_allclose(v_got, v_ref, rtol=1e-6)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tiled_bf16_matches_the_bf16_head():
    """In bf16 compute the tile logits are the head's bf16 logits; gradients come back in bf16 (hidden) and
    the kernel's dtype, as autodiff of the reference gives them."""
    h, w, targets, weights = _inputs(jnp.bfloat16)
    ref = lambda h, w: _loss(
        losses.cross_entropy(jnp.dot(h, w.astype(h.dtype)).astype(jnp.float32), targets, weights)
    )
    got = lambda h, w: _loss(losses.head_cross_entropy(h, w, targets, weights, 8))
    (v_ref, g_ref), (v_got, g_got) = [jax.value_and_grad(f, argnums=(0, 1))(h, w) for f in (ref, got)]
    np.testing.assert_allclose(v_got, v_ref, rtol=1e-6)
    assert g_got[0].dtype == jnp.bfloat16 and g_got[1].dtype == jnp.float32
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=1e-3)


def _shapes(jaxpr) -> set:
    """Every shape an equation of `jaxpr` (and its sub-jaxprs: scan bodies, custom_vjp rules) outputs."""
    out = set()
    for eqn in jaxpr.eqns:
        out |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out |= _shapes(inner)
    return out


def _model_setup(tie: bool):
    c = tiny.get_config("test")
    c.model.update(dim_model_base=32, scale_emb=4.0, scale_depth=1.4, tie_embeddings=tie)  # MiniCPM
    model = decoder.build_model(c.model)
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, c.model.vocab_size)
    batch = {"targets": jnp.roll(ids, -1, axis=1), "weights": jnp.ones(ids.shape).at[:, -1].set(0.0)}
    params = model.init(jax.random.key(2), ids)["params"]
    return c, model, ids, batch, params


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_train_loss_and_grads_equal_with_and_without_tiles(tie):
    """train.model_loss through the decoder (MiniCPM logit division on, untied and tied heads): the tiled
    loss (return_hidden=True, head applied in the loss) gives the full-logits loss and gradients, and no
    equation of its forward + backward outputs a [B,T,V] array (the full-logits one does)."""
    c, model, ids, batch, params = _model_setup(tie)

    def loss(params, chunk):
        (ce, zl), _ = train.model_loss(model, {"params": params}, (ids,), batch, chunk)
        return ce + c.aux_weights.z_loss * zl

    v_ref, g_ref = jax.value_and_grad(loss)(params, 0)
    v_got, g_got = jax.value_and_grad(loss)(params, 64)
    np.testing.assert_allclose(v_got, v_ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_got, g_ref)
    btv = (2, 24, c.model.vocab_size)
    assert btv in _shapes(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, 0).jaxpr)
    assert btv not in _shapes(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, 64).jaxpr)


def test_negative_loss_chunk_is_a_config_error():
    c = tiny.get_config("test")
    c.train.loss_chunk = -1
    with pytest.raises(ConfigError, match="train.loss_chunk=-1 must be >= 0"):
        validate(c)
