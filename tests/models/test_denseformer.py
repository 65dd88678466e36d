"""DenseFormer (techniques-a.md 3.4): identity at init, parameter count, gradient to off-diagonal alpha,
fused == naive loop (values and grads), scan == unrolled (also with MoD), validate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from voltron_jax import config as cfglib
from voltron_jax.models import decoder, denseformer

B, T, D = 2, 16, 32


def _cfg(n_layers=6, dilation=1, period=1, residual="denseformer", **model):
    c = tiny.get_config("test")
    c.model.update(n_layers=n_layers, d_model=D, n_heads=2, n_kv_heads=2, d_ff=64, residual=residual, **model)
    c.model.denseformer.update(dilation=dilation, period=period)
    return c


def _inputs():
    x = jax.random.normal(jax.random.key(3), (B, T, D))
    return x, jnp.broadcast_to(jnp.arange(T), (B, T))


def _stack_init(c):
    """The residual-slot module of config c and its params (unboxed), on a random [B,T,D] input."""
    stack = decoder.build_model(c.model).stack()
    x, pos = _inputs()
    return stack, nn.unbox(stack.init(jax.random.key(0), x, pos)["params"])


def _random_alpha(params, scale=0.3):
    a = params["dwa_weights"]["alpha"]
    a = a + scale * jax.random.normal(jax.random.key(7), a.shape)
    return {**params, "dwa_weights": {"alpha": a}}


def _layers(stack):
    """Per-layer params in depth order from unrolled block_{s}/layer_{j} or scanned blocks/layer_{j}."""
    if "blocks" in stack:
        size = len(stack["blocks"])
        n_super = jax.tree.leaves(stack["blocks"])[0].shape[0]
        return [
            jax.tree.map(lambda a, s=s: a[s], stack["blocks"][f"layer_{j}"])
            for s in range(n_super)
            for j in range(size)
        ]
    blocks = sorted((k for k in stack if k.startswith("block_")), key=lambda k: int(k[6:]))
    return [stack[b][f"layer_{j}"] for b in blocks for j in range(len(stack[b]))]


def _regroup(stack, size, scan):
    """Stack params regrouped into super-blocks of `size` layers (scanned or unrolled); other keys kept."""
    layers = _layers(stack)
    groups = [{f"layer_{j}": layers[s * size + j] for j in range(size)} for s in range(len(layers) // size)]
    rest = {k: v for k, v in stack.items() if k != "blocks" and not k.startswith("block_")}
    if scan:
        return {**rest, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *groups)}
    return {**rest, **{f"block_{s}": g for s, g in enumerate(groups)}}


def _naive(c, params, x, pos):
    """Reference: every output stacked, Y_i = A[i] . stack(X_0..X_i), blocks applied one by one."""
    m = c.model
    stack = decoder.build_model(m).stack
    layers, blocks = stack.keywords["layers"], _layers(params)
    a = denseformer.alpha_matrix(
        params["dwa_weights"]["alpha"], m.n_layers, m.denseformer.dilation, m.denseformer.period
    )
    outs, y = [x], x
    for i in range(m.n_layers):
        outs.append(layers[i]().apply({"params": blocks[i]}, y, pos))
        y = jnp.einsum("j,jbtd->btd", a[i + 1, : i + 2], jnp.stack(outs))
    return y


@pytest.mark.parametrize("n,k,p", [(6, 1, 1), (7, 2, 3), (12, 4, 5), (48, 4, 5)])
def test_parameter_count_matches_formula(n, k, p):
    # the package: the DWA after 0-based block i exists iff (i+1) % p == 0 and has (i+1+k)//k weights
    package = sum((i + 1 + k) // k for i in range(n) if (i + 1) % p == 0)
    assert denseformer.n_alpha(n, k, p) == package
    if k == p == 1:
        assert package == n * (n + 3) // 2
    a = np.asarray(denseformer.alpha_matrix(jnp.ones(package), n, k, p))
    for i in range(n + 1):  # only alpha_ij with p | i, j <= i, j = i (mod k) exist
        expect = [j for j in range(i + 1) if (i - j) % k == 0] if i % p == 0 and i > 0 else [i]
        assert list(np.nonzero(a[i])[0]) == expect


def test_model_params_are_plain_plus_alpha():
    count = lambda c: sum(
        x.size
        for x in jax.tree.leaves(
            jax.eval_shape(decoder.build_model(c.model).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        )
    )
    assert count(_cfg(7, 2, 3)) == count(_cfg(7, residual="plain")) + denseformer.n_alpha(7, 2, 3)


@pytest.mark.parametrize("k,p,scan", [(2, 3, False), pytest.param(1, 2, True, marks=pytest.mark.slow)])
def test_identity_at_init_equals_plain(k, p, scan):
    c = _cfg(4, k, p, scan_layers=scan)
    cp = _cfg(4, residual="plain", scan_layers=scan)
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, c.model.vocab_size)
    m = decoder.build_model(c.model)
    params = nn.unbox(m.init(jax.random.key(0), ids)["params"])
    stack = {k_: v for k_, v in params["stack"].items() if k_ != "dwa_weights"}
    plain = {**params, "stack": _regroup(stack, 1, scan)}  # plain: super-blocks of one layer
    out = jax.jit(m.apply)({"params": params}, ids)
    ref = jax.jit(decoder.build_model(cp.model).apply)({"params": plain}, ids)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k,p", [pytest.param(1, 1, marks=pytest.mark.slow), (2, 3)])
def test_fused_equals_naive_loop_values_and_grads(k, p):
    """Also: at the identity init the gradient reaches every alpha, off-diagonal ones included; the
    output stays causal with random alpha."""
    c = _cfg(4, k, p)
    stack, params = _stack_init(c)
    x, pos = _inputs()
    ct = jax.random.normal(jax.random.key(5), (B, T, D))

    def value_and_grads(forward):
        def loss(p_, x_):
            y = forward(p_, x_)
            return jnp.sum(jnp.sin(y) * ct), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    fused = value_and_grads(lambda p_, x_: stack.apply({"params": p_}, x_, pos))
    naive = value_and_grads(lambda p_, x_: _naive(c, p_, x_, pos))
    g_init = np.asarray(fused(params, x)[1][0]["dwa_weights"]["alpha"])
    assert g_init.shape == (denseformer.n_alpha(4, k, p),) and np.all(g_init != 0), g_init
    params = _random_alpha(params)
    (lf, yf), gf = fused(params, x)
    (ln, yn), gn = naive(params, x)
    np.testing.assert_allclose(yf, yn, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), gf, gn)
    y2 = fused(params, x.at[:, 9:].add(1.0))[0][1]  # DWA mixes depths, never positions
    np.testing.assert_array_equal(y2[:, :9], yf[:, :9])


@pytest.mark.slow
@pytest.mark.parametrize(
    "routing,k,p,remat", [("none", 2, 2, "full"), ("mod", 1, 1, "none"), ("mod", 2, 2, "full")]
)
def test_scan_equals_unrolled_values_and_grads(routing, k, p, remat):
    """Scan over super-blocks (push accumulators) == unrolled (pull sums); with MoD the super-block is
    lcm(p, 2) layers and the routed layers, predictor and aux losses ride along."""
    c = _cfg(4, k, p, routing=routing, remat=remat)
    cs = _cfg(4, k, p, routing=routing, remat=remat, scan_layers=True)
    cfglib.validate(cs)
    stack, params = _stack_init(c)
    params = _random_alpha(params)
    size = stack.period
    stack_s = decoder.build_model(cs.model).stack()
    x, pos = _inputs()

    def value_and_grad(mod, p_):
        def loss(p_):
            out, cols = mod.apply({"params": p_}, x, pos, mutable=["aux_loss"])
            return jnp.sum(out**2) + sum(jnp.sum(v) for v in jax.tree.leaves(cols)), out

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(p_)

    (_, y), g = value_and_grad(stack, params)
    (_, ys), gs = value_and_grad(stack_s, _regroup(params, size, True))
    np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), _regroup(g, size, True), gs
    )


@pytest.mark.slow
def test_scanned_backward_saves_one_activation_per_layer():
    """With remat the scan saves each layer's input [B,T,D] for the backward pass and nothing else of
    that size: the layer output alpha's gradient needs is recomputed inside the same remat, not saved
    beside it (which doubled the saved activations: 1.6 GiB per v4 chip for the 13B MoE)."""
    n, size = 8, 2
    cs = _cfg(n, 2, 2, remat="full", scan_layers=True)
    stack_s = decoder.build_model(cs.model).stack()
    x, pos = _inputs()
    params = nn.unbox(stack_s.init(jax.random.key(0), x, pos)["params"])
    _, vjp = jax.vjp(lambda p_: stack_s.apply({"params": p_}, x, pos), params)
    leaves = jax.tree.leaves(vjp)
    per_step = [r for r in leaves if r.shape[0] == n // size and r.shape[-3:] == (B, T, D)]
    assert len(per_step) == size  # one [n/size, B, T, D] stack per layer of the super-block


@pytest.mark.slow
def test_bf16_accumulators_track_fp32():
    """acc_dtype='bfloat16' stores the pending DWA sums in bf16 (half their memory on pods): the output
    stays within bf16 rounding of the fp32 accumulators."""
    cs = _cfg(4, 2, 2, scan_layers=True)
    cb = _cfg(4, 2, 2, scan_layers=True)
    cb.model.denseformer.acc_dtype = "bfloat16"
    cfglib.validate(cb)
    x, pos = _inputs()
    stack, stack_b = decoder.build_model(cs.model).stack(), decoder.build_model(cb.model).stack()
    params = _random_alpha(nn.unbox(stack.init(jax.random.key(0), x, pos)["params"]))
    y = stack.apply({"params": params}, x, pos)
    yb = stack_b.apply({"params": params}, x, pos)
    assert not np.array_equal(y, yb)  # the setting is live
    np.testing.assert_allclose(yb, y, rtol=2e-2, atol=2e-2)
    cb.model.denseformer.acc_dtype = "float16"
    with pytest.raises(cfglib.ConfigError, match="acc_dtype"):
        cfglib.validate(cb)


def test_flops_add_the_dwa_sums():
    c, cp = _cfg(12, 4, 5), _cfg(12, residual="plain")
    extra = decoder.flops_per_token(c.model, T) - decoder.flops_per_token(cp.model, T)
    assert extra == 2.0 * D * denseformer.n_alpha(12, 4, 5)


@pytest.mark.parametrize(
    "change,msg",
    [
        (dict(period=7), "no DWA"),
        (dict(dilation=0), "must be >= 1"),
        (dict(period=4, scan_layers=True), "must divide model.n_layers"),
        (dict(period=4, scan_layers=True, routing="mod"), "lcm"),
    ],
)
def test_validate_rejects_unservable_layouts(change, msg):
    df = {k: change.pop(k) for k in ("period", "dilation") if k in change}
    c = _cfg(6, **df, **change)
    with pytest.raises(cfglib.ConfigError, match=msg):
        cfglib.validate(c)
