"""BitLinear (BitNet b1.58 / b1): the properties of techniques-a.md section 1.10, sharding, the slot."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny
from voltron_jax import config as cfglib
from voltron_jax.models import bitlinear as bl
from voltron_jax.models import decoder
from voltron_jax.models.attention import Attention

# Jitted once per shape: eager dispatch would compile every primitive separately (slow on 2 cores).
quantize_act = jax.jit(bl.quantize_act)
quantize_weight = jax.jit(bl.quantize_weight, static_argnums=1)
bitlinear_apply = jax.jit(bl.bitlinear_apply, static_argnames=("weights",))
packed_apply = jax.jit(bl.packed_apply)
pack_ternary = jax.jit(bl.pack_ternary)


def _normal(seed, shape, std=1.0):
    return (std * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _quantised(x, w, weights="ternary"):
    """numpy (x_int / s_x, W_int * beta) for the references."""
    x_int, s_x = quantize_act(x)
    w_int, beta = quantize_weight(w, weights)
    return np.asarray(x_int / s_x), np.asarray(w_int * beta)


def _apply(module, x, params=None, state=None):
    variables = nn.unbox(module.init(jax.random.key(0), x)) if params is None else {"params": params}
    if state is not None:
        variables = {**variables, "state": state}
    return jax.jit(module.apply)(variables, x), variables


def test_ternary_weights_take_three_values_times_one_scale_per_matrix():
    """Through the module: one-hot inputs read out the rows of W_q, and W_q / mean|W| is in {-1, 0, +1}."""
    n_in, n_out = 128, 256
    y, v = _apply(bl.BitLinear(n_out, init_std=0.02), np.eye(n_in, dtype=np.float32))
    w = np.asarray(v["params"]["kernel"])
    absmax = 1 / np.sqrt(1 / n_in + 1e-6)  # RMSNorm(e_i) = absmax e_i (unit gain), quantised exactly
    ratio = np.asarray(y) / absmax / np.mean(np.abs(w))
    np.testing.assert_allclose(ratio, np.round(ratio), atol=1e-5)
    assert set(np.unique(np.round(ratio))) <= {-1.0, 0.0, 1.0}
    np.testing.assert_allclose(np.round(ratio), np.clip(np.round(w / np.mean(np.abs(w))), -1, 1))


@pytest.mark.parametrize("std", [0.02, 1.0])
def test_gaussian_weights_give_about_31_percent_zeros(std):
    """P(|z| < 0.5 sqrt(2/pi)) = 0.31 for any std (near 1.0 would be the x-instead-of-/ bug)."""
    w_int, beta = quantize_weight(_normal(1, (256, 512), std), "ternary")
    assert beta.shape == (1, 1)
    np.testing.assert_allclose(float(beta[0, 0]), std * np.sqrt(2 / np.pi), rtol=0.02)
    assert abs(float(np.mean(np.asarray(w_int) == 0)) - 0.31) < 0.02


def test_binary_weights_are_plus_minus_one_with_sign_zero_negative():
    w = np.array([[1.0, -1.0, 0.5], [0.0, 0.0, -0.5]], np.float32)  # mean 0: W - mean W = 0 twice
    w_int, beta = quantize_weight(w, "binary")
    np.testing.assert_array_equal(w_int, [[1, -1, 1], [-1, -1, -1]])
    np.testing.assert_allclose(float(beta[0, 0]), 0.5)  # mean|W| of the uncentred W
    w_int, _ = quantize_weight(_normal(2, (64, 64)) + 3.0, "binary")  # centred before the sign
    assert set(np.unique(w_int)) == {-1.0, 1.0} and abs(float(np.mean(w_int))) < 0.1


def test_activations_are_int8_per_token_with_max_127():
    x = _normal(3, (4, 16, 64)) * np.exp(_normal(4, (4, 16, 1)))  # very different token scales
    x_int, s_x = (np.asarray(a) for a in quantize_act(x))
    np.testing.assert_array_equal(x_int, np.round(x_int))
    assert x_int.min() >= -128 and x_int.max() <= 127
    np.testing.assert_array_equal(np.max(np.abs(x_int), axis=-1), 127)
    absmax = np.max(np.abs(x), axis=-1, keepdims=True)
    assert np.all(np.abs(x_int / s_x - x) <= absmax / 254 * (1 + 1e-5))


def test_ste_gradients_are_a_dense_layers_at_the_quantised_operands():
    x, w, g = _normal(5, (6, 32)), _normal(6, (32, 48), 0.05), _normal(7, (6, 48))
    loss = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(g * bl.bitlinear_apply(x, w)), argnums=(0, 1)))
    _, (gx, gw) = loss(x, w)
    x_q, w_q = _quantised(x, w)
    np.testing.assert_allclose(gw, x_q.T @ g, atol=1e-5, rtol=1e-5)  # sum(y), g = 1: x_q^T 1
    np.testing.assert_allclose(gx, g @ w_q.T, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(bitlinear_apply(x, w), x_q @ w_q, atol=1e-5, rtol=1e-5)


def test_pack_then_unpack_is_identity():
    for shape in [(1, 3), (4, 5), (5, 2), (7, 9), (64, 8), (3, 130, 6)]:
        w_int = np.random.default_rng(8).integers(-1, 2, shape).astype(np.float32)
        packed = pack_ternary(w_int)
        assert packed.dtype == jnp.uint8
        assert packed.shape == shape[:-2] + (-(-shape[-2] // 4), shape[-1])
        unpacked = jax.jit(bl.unpack_ternary, static_argnums=1)(packed, shape[-2])
        assert unpacked.dtype == jnp.int8
        np.testing.assert_array_equal(unpacked, w_int)


@pytest.mark.parametrize("weights", ["ternary", "binary"])
def test_int8_int32_path_equals_fake_quant_path(weights):
    x, w = _normal(9, (2, 5, 37)), _normal(10, (37, 24), 0.02)
    w_int, beta = quantize_weight(w, weights)
    packed = pack_ternary(w_int)
    y_int = packed_apply(x, packed, beta[0, 0])
    np.testing.assert_allclose(y_int, bitlinear_apply(x, w, weights=weights), rtol=1e-5, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(bl.packed_apply)(x, packed, beta[0, 0]))
    assert "preferred_element_type=int32" in jaxpr and "i8[" in jaxpr


@pytest.mark.slow
def test_packed_module_equals_training_module():
    x = _normal(11, (2, 7, 40))
    y, v = _apply(bl.BitLinear(12), x)
    w_int, beta = quantize_weight(v["params"]["kernel"], "ternary")
    packed = {"packed": pack_ternary(w_int), "scale": beta[0, 0], "norm": v["params"]["norm"]}
    y_packed, _ = _apply(bl.BitLinear(12, packed=True), x, packed)
    np.testing.assert_allclose(y_packed, y, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_per_expert_scales_for_stacked_kernels():
    """[E, in, out]: one scale per expert; the batched apply equals each expert's own 2-D BitLinear."""
    w = _normal(12, (3, 16, 8)) * np.array([0.01, 0.1, 1.0], np.float32)[:, None, None]
    x = _normal(13, (3, 5, 16))  # [E, C, D]
    w_int, beta = quantize_weight(w, "ternary")
    assert beta.shape == (3, 1, 1)
    np.testing.assert_allclose(beta[:, 0, 0], np.mean(np.abs(w), axis=(1, 2)), rtol=1e-6)
    y = np.asarray(bitlinear_apply(x, w))  # [E, C, F]
    for e in range(3):
        x_q, w_q = _quantised(x[e], w[e])
        np.testing.assert_allclose(y[e], x_q @ w_q, rtol=1e-5, atol=1e-6)
    y_packed = packed_apply(x, pack_ternary(w_int), beta[:, 0, 0])
    np.testing.assert_allclose(y_packed, y, rtol=1e-5, atol=1e-6)
    pooled = np.mean(np.abs(w))  # one scale for all experts would zero out the small expert
    x_q, _ = _quantised(x[0], w[0])
    assert not np.allclose(x_q @ (np.clip(np.round(w[0] / pooled), -1, 1) * pooled), y[0], atol=1e-4)


@pytest.mark.slow
def test_qkv_have_separate_norms_and_scales():
    """In a built Attention q, k and v are quantised with their own mean|W|, not one fused scale."""
    attn = Attention(n_heads=4, n_kv_heads=4, head_dim=8, linear=bl.BitLinear)
    x = _normal(14, (2, 6, 32))
    pos = np.broadcast_to(np.arange(6, dtype=np.int32), (2, 6))
    v = nn.unbox(attn.init(jax.random.key(1), x, pos))
    _, inter = jax.jit(lambda v, x: attn.apply(v, x, pos, capture_intermediates=True))(v, x)
    p = jax.tree.map(np.asarray, v["params"])
    kernels = [p[n]["kernel"] for n in ("q", "k", "v")]
    assert len({float(np.mean(np.abs(k))) for k in kernels}) == 3  # three scales
    fused_beta = float(np.mean(np.abs(np.concatenate(kernels, axis=1))))
    h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * p["q"]["norm"]["scale"]  # q's own norm
    q_out = inter["intermediates"]["q"]["__call__"][0]
    x_q, w_q = _quantised(h, kernels[0])
    np.testing.assert_allclose(q_out, x_q @ w_q, rtol=1e-5, atol=1e-5)
    w_q_fused = np.clip(np.round(kernels[0] / fused_beta), -1, 1) * fused_beta
    assert not np.allclose(q_out, x_q @ w_q_fused, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, x_spec",
    [
        (P("tensor", None), P("data", None, "tensor")),  # row parallel: input features sharded
        (P(None, "tensor"), P("data", None, None)),  # column parallel: output features sharded
        (P("data", "tensor"), P(None, None, "data")),  # both kernel axes sharded
    ],
)
def test_sharded_equals_unsharded(spec, x_spec):
    """Global statistics under GSPMD: a tensor-parallel BitLinear (kernel split over input and/or output
    features, activations over batch and features) equals the single-device one, values and grads."""
    assert jax.device_count() >= 8, "tests/conftest.py forces 8 CPU devices"
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    layer = bl.BitLinear(32)
    x = _normal(15, (4, 6, 64))
    params = nn.unbox(layer.init(jax.random.key(2), x)["params"])

    def loss(params, x):
        y = layer.apply({"params": params}, x)
        return jnp.sum(y * y), y

    ref = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
    p_sh = {"kernel": NamedSharding(mesh, spec), "norm": {"scale": NamedSharding(mesh, P(spec[0]))}}
    x_sh = NamedSharding(mesh, x_spec)
    out = jax.jit(jax.value_and_grad(loss, has_aux=True), in_shardings=(p_sh, x_sh))(
        jax.device_put(params, p_sh), jax.device_put(x, x_sh)
    )
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_warmin_ramps_from_dense_to_quantised():
    x = _normal(16, (3, 24))
    dense = bl.BitLinear(10, norm="none")
    ramp = bl.BitLinear(10, norm="none", warmin=(100, 50))
    v = nn.unbox(ramp.init(jax.random.key(3), x))
    assert int(v["state"]["step"]) == 0
    w = np.asarray(v["params"]["kernel"])
    apply = jax.jit(ramp.apply)

    def at(step):
        return apply({"params": v["params"], "state": {"step": jnp.int32(step)}}, x)

    np.testing.assert_allclose(at(50), x @ w, rtol=1e-5, atol=1e-6)  # before start: lam = 0, exact dense
    np.testing.assert_allclose(at(100), x @ w, rtol=1e-5, atol=1e-6)
    x_q, w_q = _quantised(x, w)
    np.testing.assert_allclose(at(150), x_q @ w_q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dense.apply({"params": v["params"]}, x), x_q @ w_q, rtol=1e-5, atol=1e-6)
    half = (x + 0.5 * (x_q - x)) @ (w + 0.5 * (w_q - w))  # x + lam (q(x) - x), lam = 1/2
    np.testing.assert_allclose(at(125), half, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ramp.apply({"params": v["params"]}, x), x_q @ w_q, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_layer_norm_option_is_non_affine_subln():
    x = _normal(17, (2, 4, 16)) + 5.0
    y, v = _apply(bl.BitLinear(8, norm="layer"), x)
    assert set(v["params"]) == {"kernel"}
    h = np.asarray(jax.jit(bl.normalize, static_argnums=1)(x, "layer"))
    np.testing.assert_allclose(np.mean(h, -1), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.std(h, -1), 1.0, atol=1e-4)
    np.testing.assert_allclose(y, bitlinear_apply(h, v["params"]["kernel"]), rtol=1e-5, atol=1e-6)


def _tiny_bitnet(**model):
    c = tiny.get_config("test")
    c.model.linear = "bitlinear"
    for k, val in model.items():
        c.model[k] = val
    return cfglib.validate(c)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["rms", "sub"])
def test_tiny_bitnet_model_builds_with_finite_logits_and_gradients(norm):
    """Scanned layers with warm-in: the 'state' step collection is stacked like params. (The unscanned
    model runs in tests/test_export_bitnet.py.) 'sub' with ReLU^2: transformers' BitNet layout."""
    c = _tiny_bitnet(scan_layers=True)
    c.model.bitlinear.warmin_steps = 10
    c.model.bitlinear.norm = norm
    c.model.mlp.activation = "relu2" if norm == "sub" else "silu"
    model = decoder.build_model(c.model)
    ids = np.random.default_rng(4).integers(0, c.model.vocab_size, (2, 16)).astype(np.int32)
    v = nn.unbox(jax.jit(model.init)(jax.random.key(5), ids))
    assert v["state"]["stack"]["blocks"]["layer_0"]["attn"]["q"]["step"].shape == (c.model.n_layers,)

    def loss(params):
        logits = model.apply({**v, "params": params}, ids)
        target = jnp.take_along_axis(logits, ids[..., None], -1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - target)

    val, grads = jax.jit(jax.value_and_grad(loss))(v["params"])
    assert np.isfinite(float(val))
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert all(np.all(np.isfinite(g)) for _, g in flat)
    kernels = [  # BitLinear kernels get gradients through the STE
        g
        for path, g in flat
        if "kernel" in jax.tree_util.keystr(path) and "lm_head" not in jax.tree_util.keystr(path)
    ]
    assert len(kernels) == 7 and all(float(np.max(np.abs(g))) > 0 for g in kernels)
    # never quantised: the embedding and LM head keep Dense/Embed params, no BitLinear norm inside them
    assert set(v["params"]["lm_head"]) == {"kernel"} and set(v["params"]["embed"]) == {"embedding"}


def test_bitnet_tree_extends_the_dense_tree():
    """Same 'kernel' paths and shapes as the dense model, plus one norm gain per BitLinear."""
    c = _tiny_bitnet()
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = {}
    for linear in ("dense", "bitlinear"):
        c.model.linear = linear
        tree = jax.eval_shape(decoder.build_model(c.model).init, jax.random.key(0), ids)["params"]
        shapes[linear] = {
            jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(nn.unbox(tree))
        }
    extra = set(shapes["bitlinear"]) - set(shapes["dense"])
    assert all(shapes["bitlinear"][k] == s for k, s in shapes["dense"].items())
    assert len(extra) == 14 and all(k.endswith("['norm']['scale']") for k in extra)


def test_validate_rejects_bad_bitlinear_settings():
    for field, value, word in [
        ("weights", "quaternary", "ternary"),
        ("norm", "batch", "rms"),
        ("warmin_steps", -1, "warmin"),
        ("eps", 0.0, "eps"),
    ]:
        c = _tiny_bitnet()
        c.model.bitlinear[field] = value
        with pytest.raises(cfglib.ConfigError, match=word):
            cfglib.validate(c)


def test_sub_norm_puts_a_gain_only_inside_o_and_down():
    """norm='sub' (transformers' BitNet layout): an RMSNorm gain inside the projections that read an inner
    activation (o: attn_sub_norm, down: ffn_sub_norm), none inside q, k, v, gate, up."""
    c = _tiny_bitnet()
    c.model.bitlinear.norm = "sub"
    tree = jax.eval_shape(decoder.build_model(c.model).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    norms = {
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(tree["params"]))
        if p[-2:] == (jax.tree_util.DictKey("norm"), jax.tree_util.DictKey("scale"))
    }
    assert len(norms) == 2 * c.model.n_layers
    assert all(("['o']" in k) != ("['down']" in k) for k in norms)


def test_sub_norm_relu2_mlp_equals_the_subln_reference():
    """MLP(linear=BitLinear norm 'sub', activation relu2) = down(rms(relu(gate x)^2 * up x) * gain) with
    gate/up quantising x itself (no inner norm), as transformers' BitNetMLP."""
    from functools import partial

    from voltron_jax.models.layers import MLP

    lin = partial(bl.BitLinear, norm="sub", norm_eps=1e-5)
    mlp = MLP(d_ff=12, linear=lin, activation="relu2")
    x = _normal(7, (2, 5, 8))
    params = nn.unbox(mlp.init(jax.random.key(1), x))["params"]
    params["down"]["norm"]["scale"] = 1.0 + _normal(8, (12,), 0.3)
    y = np.asarray(jax.jit(mlp.apply)({"params": params}, x))
    gate = bitlinear_apply(x, params["gate"]["kernel"])
    up = bitlinear_apply(x, params["up"]["kernel"])
    h = np.square(np.maximum(np.asarray(gate), 0.0)) * np.asarray(up)
    h = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-5) * params["down"]["norm"]["scale"]
    want = np.asarray(bitlinear_apply(h.astype(np.float32), params["down"]["kernel"]))
    assert set(params["gate"]) == {"kernel"} and set(params["down"]) == {"kernel", "norm"}
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


def test_validate_rejects_an_unknown_mlp_activation():
    c = _tiny_bitnet()
    c.model.mlp.activation = "gelu"
    with pytest.raises(cfglib.ConfigError, match="model.mlp.activation='gelu'.*relu2"):
        cfglib.validate(c)
