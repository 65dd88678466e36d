"""Mixture-of-Depths (techniques-a.md 4.6): reduction to the dense block, bit-identical skips, exact
capacity, per-row aux targets, causality given the selection, stop-gradient predictor, decode == causal
forward, one-hot == gather, per-segment top-k with Infini-attention, FLOPs and validate."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from voltron_jax import config as cfglib
from voltron_jax.models import decoder, mod

B, T, D = 3, 16, 32


def _cfg(**model):
    c = tiny.get_config("test")
    c.model.update(n_layers=2, d_model=D, n_heads=2, n_kv_heads=2, d_ff=64, routing="mod")
    for k, v in model.items():
        if isinstance(v, dict):
            c.model[k].update(v)
        else:
            c.model[k] = v
    return c


def _factory(c=None):
    """The block factory (make_block(**core_overrides)) that build_model hands the routing slot."""
    routed = decoder.build_model((c or _cfg()).model).stack.keywords["layers"][1]
    return routed.keywords["make_block"]


def _block(c=None):
    """The plain Block constructor (callable(name=...)) that build_model makes for config c."""
    return _factory(c)()


def _inputs(seed=3):
    x = jax.random.normal(jax.random.key(seed), (B, T, D))
    return x, jnp.broadcast_to(jnp.arange(T) + 5, (B, T))  # positions offset: RoPE must use them


class UnitWeight(mod.MoDRouting):
    def weight(self, logits):
        return jnp.ones_like(logits)


def _layer(cls=mod.MoDRouting, **kw):
    layer = cls(make_block=_factory(), **kw)
    x, pos = _inputs()
    return layer, nn.unbox(layer.init(jax.random.key(0), x, pos))


@pytest.mark.parametrize("segment_len", [0, 8])
def test_topk_targets_are_per_row_and_sum_to_k(segment_len):
    logits = jax.random.normal(jax.random.key(0), (B, T))
    idx, targets = mod.select_topk(logits, 2, segment_len)
    n_seg = T // segment_len if segment_len else 1
    assert idx.shape == (B, 2 * n_seg)
    assert np.all(np.diff(np.asarray(idx), axis=1) > 0)  # sorted, causal order
    np.testing.assert_array_equal(targets.sum(1), 2 * n_seg)  # every row, not just row 0 (the OLMo bug)
    seg = segment_len or T
    for b in range(B):
        for s in range(n_seg):
            part = np.asarray(logits[b, s * seg : (s + 1) * seg])
            chosen = set(np.argsort(-part)[:2] + s * seg)
            assert chosen == set(np.nonzero(np.asarray(targets[b]))[0]) & set(range(s * seg, (s + 1) * seg))


@pytest.mark.parametrize("dispatch", ["gather", "onehot"])
def test_capacity_one_with_unit_weight_equals_dense_block(dispatch):
    layer, v = _layer(UnitWeight, capacity=1.0, dispatch=dispatch)
    x, pos = _inputs()
    seg = jnp.broadcast_to((jnp.arange(T) >= 6).astype(jnp.int32), (B, T))  # two documents per row
    ref = _block()().apply({"params": v["params"]["block"]}, x, pos, seg)
    np.testing.assert_allclose(layer.apply(v, x, pos, seg), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_skips_are_bit_identical_and_exactly_k_change_and_dispatches_agree():
    layer, v = _layer(capacity=0.25)
    onehot = mod.MoDRouting(make_block=_factory(), capacity=0.25, dispatch="onehot")
    x, pos = _inputs()
    out = layer.apply(v, x, pos)
    changed = np.any(np.asarray(out) != np.asarray(x), axis=-1)  # [B,T]
    np.testing.assert_array_equal(changed.sum(1), 4)  # k = int(0.25 * 16) per row
    np.testing.assert_array_equal(np.asarray(out)[~changed], np.asarray(x)[~changed])
    f = lambda m, p, x_: jnp.sum(jnp.sin(m.apply(p, x_, pos)))
    np.testing.assert_allclose(onehot.apply(v, x, pos), out, rtol=1e-6, atol=1e-6)
    g1, g2 = (jax.jit(jax.grad(functools.partial(f, m), argnums=(0, 1)))(v, x) for m in (layer, onehot))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


@pytest.mark.slow
def test_selected_output_ignores_later_inputs_and_matches_restricted_reference():
    layer, v = _layer(capacity=0.5)
    x, pos = _inputs()
    logits = x @ v["params"]["router"]
    idx, _ = mod.select_topk(logits, 8)
    out = layer.apply(v, x, pos, selection=idx)
    t = T // 2
    x2 = x.at[:, t + 1 :].add(jax.random.normal(jax.random.key(9), (B, T - t - 1, D)))
    out2 = layer.apply(v, x2, pos, selection=idx)
    np.testing.assert_allclose(out2[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-6)
    # reference: the dense block on the selected tokens alone, at their original positions
    take = lambda a: jnp.take_along_axis(a, idx[..., None] if a.ndim == 3 else idx, axis=1)
    y = _block()().apply({"params": v["params"]["block"]}, take(x), take(pos))
    ref = take(x) + jax.nn.sigmoid(take(logits))[..., None] * (y - take(x))
    np.testing.assert_allclose(take(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("causal", ["predictor", "aux_loss"])
def test_aux_losses_gradients(causal):
    """Predictor BCE: zero gradient into every backbone param (the router BCE, by design, does reach the
    backbone). The router gets LM-loss gradient through w(r) * f."""
    c = _cfg(mod=dict(causal=causal, capacity=0.25))
    m = decoder.build_model(c.model)
    ids = jax.random.randint(jax.random.key(1), (2, T), 0, c.model.vocab_size)
    params = nn.unbox(m.init(jax.random.key(0), ids)["params"])

    def losses(p):
        logits, cols = m.apply({"params": p}, ids, mutable=["aux_loss"])
        aux = sum(jnp.sum(a) for a in jax.tree.leaves(cols["aux_loss"]))
        return aux, jnp.mean(logits**2)

    g_aux, g_lm = jax.jit(jax.jacrev(losses))(params)
    router = g_lm["stack"]["block_0"]["layer_1"]["router"]
    assert np.any(np.asarray(router) != 0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(g_aux):
        name = jax.tree_util.keystr(path)
        if causal == "predictor" and "predictor" not in name:
            assert not np.any(np.asarray(leaf)), name  # stop-gradient: exactly zero
    key = "predictor" if causal == "predictor" else "router"
    assert np.any(np.asarray(jax.tree.leaves(g_aux["stack"]["block_0"]["layer_1"][key])[0]))


@pytest.mark.slow
def test_decode_with_predictor_equals_causal_full_forward():
    c = _cfg(mod=dict(route_by="causal"))
    m, dm = decoder.build_model(c.model), decoder.build_model(c.model, decode=True)
    ids = jax.random.randint(jax.random.key(1), (2, T), 0, c.model.vocab_size)
    params = nn.unbox(m.init(jax.random.key(0), ids)["params"])
    full, cols = m.apply({"params": params}, ids, mutable=["intermediates"])
    frac = float(jax.tree.leaves(cols)[0])
    assert 0.0 < frac < 1.0, frac  # the predictor routes some tokens and skips others
    cache = dm.init(jax.random.key(0), ids)["cache"]
    pos = jnp.broadcast_to(jnp.arange(T), ids.shape)

    @jax.jit
    def step(cache, tok, p):
        out, upd = dm.apply({"params": params, "cache": cache}, tok, p, mutable=["cache"])
        return out, upd["cache"]

    outs = []
    for t in range(T):
        o, cache = step(cache, ids[:, t : t + 1], pos[:, t : t + 1])
        outs.append(o)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-4)
    # the routed layer's KV cache holds only the routed tokens; the dense layer's holds all of them
    index = lambda layer: cache["stack"]["block_0"][layer]["attn"]["core"]["index"]
    index_routed = cache["stack"]["block_0"]["layer_1"]["block"]["attn"]["core"]["index"]
    np.testing.assert_array_equal(index("layer_0"), T)
    assert int(jnp.sum(index_routed)) == round(frac * ids.size)


@pytest.mark.slow
def test_per_segment_topk_with_infini_writes_only_routed_tokens():
    """Top-k per Infini segment; the gathered block (segments of k) equals the full-length block that
    masks unrouted tokens (valid=False: not keys, no memory writes); earlier segments ignore later ones."""
    c = _cfg(memory="infini", infini=dict(segment_len=8), mod=dict(capacity=0.25))
    cfglib.validate(c)
    make = decoder.build_model(c.model).stack.keywords["layers"][1]
    layer = make()
    x, pos = _inputs()
    v = nn.unbox(layer.init(jax.random.key(0), x, pos))
    out = layer.apply(v, x, pos)
    changed = np.any(np.asarray(out) != np.asarray(x), axis=-1).reshape(B, 2, 8)
    np.testing.assert_array_equal(changed.sum(-1), 2)  # k = int(0.25 * 8) in every segment
    logits = x @ v["params"]["router"]
    _, sel = mod.select_topk(logits, 2, 8)
    full = make.keywords["make_block"]()().apply({"params": v["params"]["block"]}, x, pos, None, sel > 0)
    ref = jnp.where(sel[..., None] > 0, x + jax.nn.sigmoid(logits)[..., None] * (full - x), x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    x2 = x.at[:, 8:].add(1.0)
    np.testing.assert_allclose(layer.apply(v, x2, pos)[:, :8], out[:, :8], rtol=0, atol=1e-6)


def test_flops_reflect_capacity():
    c, cd = _cfg(), _cfg(routing="none")
    m, seq = c.model, 64
    attn = decoder.registry.get("attention", "mha").flops_per_token(m, seq)
    core = decoder.registry.get("memory", "none").flops_per_token(m, seq)
    ffn = decoder.registry.get("ffn", "mlp").flops_per_token(m, seq)
    cap = m.mod.capacity
    routed = cap * (attn + cap * core + ffn)  # linear layers on c of the tokens, attention on c^2
    extra = mod.MoDRouting.flops_per_token(m, seq)
    assert extra == 2.0 * D + 2.0 * D * 64 + 2.0 * 64
    expect = decoder.flops_per_token(cd.model, seq) - (attn + core + ffn) + routed + extra
    assert decoder.flops_per_token(m, seq) == pytest.approx(expect)


@pytest.mark.parametrize(
    "change,msg",
    [
        (dict(mod=dict(capacity=0.0)), "capacity"),
        (dict(mod=dict(capacity=0.01)), "selects no token"),
        (dict(mod=dict(router_weight="softmax")), "router_weight"),
        (dict(n_layers=3, scan_layers=True), "must divide model.n_layers"),
    ],
)
def test_validate_rejects_bad_configs(change, msg):
    with pytest.raises(cfglib.ConfigError, match=msg):
        cfglib.validate(_cfg(**change))


def test_decoding_with_infini_is_refused():
    c = _cfg(memory="infini")
    with pytest.raises(NotImplementedError, match="infini"):
        decoder.build_model(c.model, decode=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sort", [False, True])
def test_inverse_map_ops_equal_the_scatter_built_ones(seed, sort):
    """membership, scatter_rows and gather_rows (values and gradients) equal the scatter / take_along_axis
    forms they replaced, for random unsorted and sorted selections."""
    x, _ = _inputs()
    sel = jnp.argsort(jax.random.uniform(jax.random.key(seed), (B, T)), axis=-1)[:, :5].astype(jnp.int32)
    sel = jnp.sort(sel, axis=-1) if sort else sel
    rows = jnp.arange(B)[:, None]
    np.testing.assert_array_equal(mod.membership(sel, T), jnp.zeros((B, T)).at[rows, sel].set(1.0))
    vals = jax.random.normal(jax.random.key(seed + 9), (B, 5, D))
    w = jax.random.normal(jax.random.key(seed + 5), (B, T, D))

    def ref_scatter(x, v):
        return x.at[rows, sel].set(v)

    def ref_gather(x):
        return jnp.take_along_axis(x, sel[..., None], axis=1)

    def loss(f):
        return lambda x, v: jnp.sum(f(x, v) * w) + jnp.sum(f(x, v)[:, :5] ** 2)

    np.testing.assert_array_equal(mod.scatter_rows(x, sel, vals, False), ref_scatter(x, vals))
    np.testing.assert_array_equal(mod.gather_rows(x, sel, False), ref_gather(x))
    got = jax.grad(loss(lambda x, v: mod.scatter_rows(x, sel, v, False)), argnums=(0, 1))(x, vals)
    want = jax.grad(loss(ref_scatter), argnums=(0, 1))(x, vals)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        jax.grad(lambda x: jnp.sum(mod.gather_rows(x, sel, False) ** 3))(x),
        jax.grad(lambda x: jnp.sum(ref_gather(x) ** 3))(x),
    )
