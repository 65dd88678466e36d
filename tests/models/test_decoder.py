"""Dense backbone: shapes, every param sharded by a valid spec, scan == unrolled, GQA, MiniCPM scaling."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec

from configs import tiny
from voltron_jax import sharding
from voltron_jax.models import attention, decoder


def _cfg(**model):
    c = tiny.get_config("test")
    for k, v in model.items():
        c.model[k] = v
    return c


def _init(c, t=16):
    m = decoder.build_model(c.model)
    ids = jax.random.randint(jax.random.key(1), (2, t), 0, c.model.vocab_size)
    return m, m.init(jax.random.key(0), ids), ids


def test_logits_shape_dtype_and_causality():
    c = _cfg()
    m, v, ids = _init(c)
    out = m.apply(v, ids)
    assert out.shape == (2, 16, c.model.vocab_size) and out.dtype == jnp.float32
    ids2 = ids.at[:, 10:].set(7)  # changing the future must not change the past
    np.testing.assert_array_equal(m.apply(v, ids2)[:, :10], out[:, :10])


def test_every_param_has_a_valid_partition_spec():
    c = _cfg(scan_layers=True)
    c.mesh.update(data=2, fsdp=2, tensor=2)
    m = decoder.build_model(c.model)
    boxed = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    mesh = sharding.make_mesh(c.mesh)
    specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(mesh, boxed))
    for (path, spec), (_, leaf) in zip(
        jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
        jax.tree_util.tree_leaves_with_path(nn.unbox(boxed)),
        strict=True,
    ):
        assert isinstance(spec, PartitionSpec), path
        assert len(spec) <= leaf.ndim, (path, spec)
        for dim, axes in zip(leaf.shape, spec):
            size = np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())])
            assert dim % size == 0, (path, spec, leaf.shape)
    # the big matrices are actually sharded, norms replicated
    flat = {
        jax.tree_util.keystr(p): s
        for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    }
    assert any("tensor" in str(s) for k, s in flat.items() if "q" in k)
    assert all(all(a is None for a in s) for k, s in flat.items() if "norm" in k)
    assert flat["['embed']['embedding']"] == PartitionSpec(None, "fsdp")  # 259 rows: tensor dropped


def test_scan_equals_unrolled():
    c = _cfg()
    m, v, ids = _init(c)
    cs = _cfg(scan_layers=True, remat="full")
    ms = decoder.build_model(cs.model)
    p = nn.unbox(v["params"])
    layers = [p["stack"][f"block_{i}"]["layer_0"] for i in range(c.model.n_layers)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    ps = {**p, "stack": {"blocks": {"layer_0": stacked}}}
    np.testing.assert_allclose(ms.apply({"params": ps}, ids), m.apply(v, ids), atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    c = _cfg(n_heads=4, n_kv_heads=2)
    m, v, ids = _init(c)
    cm = _cfg(n_heads=4, n_kv_heads=4)
    mm = decoder.build_model(cm.model)
    p = jax.tree.map(lambda x: x, nn.unbox(v["params"]))
    k = c.model.d_model // 4
    for blk in p["stack"].values():
        att = blk["layer_0"]["attn"]
        for name in ("k", "v"):  # kv head g serves query heads 2g, 2g+1
            w = att[name]["kernel"].reshape(c.model.d_model, 2, k)
            att[name]["kernel"] = jnp.repeat(w, 2, axis=1).reshape(c.model.d_model, 4 * k)
    np.testing.assert_allclose(mm.apply({"params": p}, ids), m.apply(v, ids), atol=1e-5, rtol=1e-5)


def test_minicpm_neutral_values_are_plain_prenorm():
    c = _cfg()
    m, v, ids = _init(c)
    c2 = _cfg(scale_emb=2.0, scale_depth=1.4, dim_model_base=32)
    m2 = decoder.build_model(c2.model)
    # scale_emb multiplies h0; with the same params, a different scale changes the output
    assert not np.allclose(m2.apply(v, ids), m.apply(v, ids))
    assert decoder.width_factor(c2.model) == 2.0
    rs = c2.model.scale_depth / np.sqrt(c2.model.n_layers)
    assert m2.stack.keywords["layers"][0].keywords["residual_scale"] == pytest.approx(rs)


def _stack_rms(c):
    m, v, ids = _init(c)
    _, st = m.apply(
        v, ids, capture_intermediates=lambda mdl, _: mdl.name == "stack", mutable=["intermediates"]
    )
    h = st["intermediates"]["stack"]["__call__"][0]
    return float(jnp.sqrt(jnp.mean(h**2)))


@pytest.mark.slow
@pytest.mark.parametrize("mup", [False, True])
def test_coordinate_check_hidden_scale_flat_across_widths(mup):
    """MiniCPM parameterisation: hidden-matrix init std shrinks with 1/sqrt(width factor), so the residual
    stream's RMS at init stays flat across widths; with a fixed std it grows with sqrt(width)."""
    rms = {}
    for width in (64, 128, 256):
        c = _cfg(d_model=width, d_ff=2 * width, n_heads=4, n_kv_heads=4, init_std=0.1)
        if mup:
            c.model.update(scale_emb=12.0, scale_depth=1.4, dim_model_base=64)
        rms[width] = _stack_rms(c)
    ratio = rms[256] / rms[64]
    if mup:
        assert 0.8 < ratio < 1.25, rms
    else:
        assert ratio > 1.3, rms


@pytest.mark.slow
def test_kv_cache_decode_matches_full_forward():
    c = _cfg()
    m, v, ids = _init(c, t=12)
    full = m.apply(v, ids)
    md = decoder.build_model(c.model, decode=True)
    cache = md.init(jax.random.key(0), jnp.zeros((2, 12), jnp.int32))["cache"]
    logits, mut = md.apply(
        {"params": v["params"], "cache": cache},
        ids[:, :5],
        positions=jnp.broadcast_to(jnp.arange(5), (2, 5)),
        mutable=["cache"],
    )
    outs = [logits]
    for t in range(5, 12):
        lg, mut = md.apply(
            {"params": v["params"], **mut},
            ids[:, t : t + 1],
            positions=jnp.full((2, 1), t),
            mutable=["cache"],
        )
        outs.append(lg)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_doc_mask_blocks_cross_document_attention():
    c = _cfg()
    m, v, ids = _init(c)
    seg = jnp.concatenate([jnp.ones((2, 6), jnp.int32), 2 * jnp.ones((2, 10), jnp.int32)], 1)
    a = m.apply(v, ids, segment_ids=seg)
    b = m.apply(v, ids.at[:, :6].set(5), segment_ids=seg)  # change document 1 only
    np.testing.assert_allclose(a[:, 6:], b[:, 6:], atol=1e-6)


def test_flops_per_token_dense_formula():
    c = _cfg()
    mc, t = c.model, 64
    k = mc.d_model // mc.n_heads
    per_layer = 2 * mc.d_model * k * (2 * mc.n_heads + 2 * mc.n_kv_heads) + 6 * mc.d_model * mc.d_ff
    per_layer += 2 * t * mc.n_heads * k  # causal attention at half
    assert decoder.flops_per_token(mc, t) == mc.n_layers * per_layer + 2 * mc.d_model * mc.vocab_size


def test_causal_core_valid_mask_hides_invalid_keys():
    q = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, 6, 2, 8))
    vv = jax.random.normal(jax.random.key(2), (1, 6, 2, 8))
    pos = jnp.arange(6)[None]
    core = attention.CausalCore()
    valid = jnp.array([[True, False, True, True, False, True]])
    out = core.apply({}, q, k, vv, pos, None, valid)
    out2 = core.apply({}, q, k.at[:, 1].set(9.0), vv.at[:, 4].set(-3.0), pos, None, valid)
    np.testing.assert_allclose(out[:, jnp.array([0, 2, 3, 5])], out2[:, jnp.array([0, 2, 3, 5])], atol=1e-6)


def test_final_norm_uses_model_norm_eps():
    """The final RMSNorm divides by sqrt(mean(x^2) + model.norm_eps), like the block norms (a Llama-2
    checkpoint's 1e-5 must not drift the logits through a hard-coded 1e-6)."""
    for eps in (1e-5, 0.5):
        c = _cfg(norm_eps=eps)
        m, v, ids = _init(c)
        _, state = m.apply(
            v, ids, capture_intermediates=lambda mdl, _: mdl.name in ("stack", "final_norm"), mutable=True
        )
        inter = state["intermediates"]
        x = np.asarray(inter["stack"]["__call__"][0], np.float64)  # [B,T,D] the final norm's input
        y = np.asarray(inter["final_norm"]["__call__"][0], np.float64)
        want = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps)  # gain is 1 at init
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_head_shaped_dense_is_the_reshaped_plain_product():
    """Dense(heads_out=H) / Dense(heads_in=H): the same [in, features] parameter and the same values as
    x @ W reshaped to (or from) heads, in fp32; attention with them equals the plain projections."""
    from voltron_jax.models.layers import Dense

    x = jax.random.normal(jax.random.key(0), (2, 5, 12))
    plain = Dense(8 * 3, ("embed", "heads"))
    v = plain.init(jax.random.key(1), x)
    split = Dense(8 * 3, ("embed", "heads"), heads_out=8)
    assert jax.tree.map(jnp.shape, split.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, v)
    want = plain.apply(v, x).reshape(2, 5, 8, 3)
    np.testing.assert_allclose(split.apply(v, x), want, atol=1e-5, rtol=1e-5)
    o = Dense(12, ("heads", "embed"))
    vo = o.init(jax.random.key(2), want.reshape(2, 5, 24))
    merged = Dense(12, ("heads", "embed"), heads_in=8).apply(vo, want)
    np.testing.assert_allclose(merged, o.apply(vo, want.reshape(2, 5, 24)), atol=1e-5, rtol=1e-5)
    # attention (GQA) with the dense slot uses them; a linear that is not Dense takes the reshape path
    b, t, d = 2, 16, 32
    h = jax.random.normal(jax.random.key(3), (b, t, d))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    att = attention.Attention(4, 2, d // 4)
    va = att.init(jax.random.key(4), h, pos)
    ref = attention.Attention(4, 2, d // 4, linear=lambda *a, **k: Dense(*a, **k))
    np.testing.assert_allclose(att.apply(va, h, pos), ref.apply(va, h, pos), atol=1e-5, rtol=1e-5)


def test_rope_is_the_complex_rotation_of_the_two_halves():
    """layers.rope rotates (x1 + i x2) by pos * theta^(-2j/K) (HF's rotate-half convention), bf16 in bf16
    out; its values against a float64 reference. The full-width forms tried for issue 27 gave the same
    values bit for bit and were slower (docs/results.md)."""
    from voltron_jax.models.layers import rope

    x = jax.random.normal(jax.random.key(0), (2, 64, 3, 16))
    pos = jnp.stack([jnp.arange(64) * 37, jnp.arange(64)[::-1]])  # large and reversed positions
    assert rope(x.astype(jnp.bfloat16), pos).dtype == jnp.bfloat16
    xn, pn = np.asarray(x, np.float64), np.asarray(pos, np.float64)
    z = (xn[..., :8] + 1j * xn[..., 8:]) * np.exp(
        1j * pn[:, :, None, None] / 10000.0 ** (np.arange(0, 16, 2) / 16)
    )
    # fp32 angles of positions up to 2331 are off by ~1e-4 rad; a wrong sign or half is off by O(1)
    np.testing.assert_allclose(rope(x, pos), np.concatenate([z.real, z.imag], -1), rtol=0, atol=2e-3)


def test_remat_dots_no_batch_rotated_keeps_q_and_k_after_rope(capsys):
    """'dots_no_batch' keeps the projections' outputs, q and k before RoPE; 'dots_no_batch_rotated' keeps
    q and k after it instead (MaxText's 'minimal'), and not before; the gradients are full remat's."""
    c = _cfg(scan_layers=False)
    m, v, ids = _init(c)
    p = nn.unbox(v["params"])
    saved, grads = {}, {}
    for policy in ("full", "dots_no_batch", "dots_no_batch_rotated"):
        mp = decoder.build_model(_cfg(scan_layers=False, remat=policy).model)
        loss = lambda p, mp=mp: jnp.mean(mp.apply({"params": p}, ids) ** 2)
        jax.ad_checkpoint.print_saved_residuals(loss, p)
        saved[policy] = capsys.readouterr().out.splitlines()
        grads[policy] = jax.grad(loss)(p)
    n = c.model.n_layers
    head_shaped = lambda lines: [x for x in lines if "dot_general" in x and re.search(r"\[\d+(,\d+){3}\]", x)]
    assert len(head_shaped(saved["dots_no_batch"])) == 3 * n  # q, k, v projections
    assert len(head_shaped(saved["dots_no_batch_rotated"])) == n  # v only
    assert sum(attention.ROTATED in x for x in saved["dots_no_batch_rotated"]) == 2 * n
    assert not any(attention.ROTATED in x for x in saved["dots_no_batch"] + saved["full"])
    for policy in ("dots_no_batch", "dots_no_batch_rotated"):
        for a, b in zip(jax.tree.leaves(grads["full"]), jax.tree.leaves(grads[policy]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
