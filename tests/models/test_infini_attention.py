"""Infini-attention (techniques-a.md 2.8): reduction to causal attention, closed forms, prefix sum == scan,
delta fixed point, streaming == full forward (whole model), RoPE shift, padding, sharding, footprint."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from voltron_jax import config as cfglib
from voltron_jax import sharding
from voltron_jax.models import decoder
from voltron_jax.models import infini_attention as ia
from voltron_jax.models.attention import CausalCore
from voltron_jax.models.layers import rope

B, N, S, H, G, K = 2, 4, 3, 4, 2, 8
T = N * S


def _qkv(t=T, seed=0, b=B):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, H, K))  # [B,T,H,K]
    k = jax.random.normal(ks[1], (b, t, G, K))  # [B,T,G,K]
    v = jax.random.normal(ks[2], (b, t, G, K))
    return q, k, v, jnp.broadcast_to(jnp.arange(t), (b, t))


def _core(**kw):
    core = ia.InfiniCore(**{"segment_len": N, **kw})
    q, k, v, pos = _qkv()
    return core, jax.jit(core.init)(jax.random.key(1), q, k, v, pos)


def _apply(module, variables, *args, **kw):
    """Jitted apply: one compile per test instead of one per primitive (keeps the file fast on CPU)."""
    return jax.jit(functools.partial(module.apply, **kw))(variables, *args)


@functools.partial(jax.jit, static_argnames="rule")
def _reference(q, k, v, pos, beta, rule="linear", valid=None):
    """The paper's recurrence written out segment by segment, convention (a); returns (out, M, z)."""
    b = q.shape[0]
    mem, z = jnp.zeros((b, G, K, K)), jnp.zeros((b, G, K))
    ok = jnp.ones(q.shape[:2], bool) if valid is None else valid
    g = jax.nn.sigmoid(beta)[None, None, :, None]  # [1,1,H,1]
    outs = []
    for s in range(q.shape[1] // N):
        sl = slice(s * N, (s + 1) * N)
        qr, kr = rope(q[:, sl], pos[:, sl]), rope(k[:, sl], pos[:, sl])
        mask = jnp.tril(jnp.ones((N, N), bool))[None, None] & ok[:, None, None, sl]
        a_dot = jax.nn.dot_product_attention(qr, kr, v[:, sl], mask=mask)  # [B,N,H,K]
        sq, sk = ia.sigma(q[:, sl]), ia.sigma(k[:, sl]) * ok[:, sl, None, None]
        sk_h = jnp.repeat(sk, H // G, axis=2)  # query head h reads KV head h // (H/G)
        mem_h, z_h = jnp.repeat(mem, H // G, axis=1), jnp.repeat(z, H // G, axis=1)
        a_mem = jnp.einsum("bnhk,bhkv->bnhv", sq, mem_h) / jnp.einsum("bnhk,bhk->bnh", sq, z_h)[..., None]
        has = (jnp.sum(z, -1) > 0)[:, None, :].repeat(H // G, axis=2)[..., None]  # [B,1,H,1]
        outs.append(jnp.where(has, g * a_mem + (1 - g) * a_dot, a_dot))
        vs = v[:, sl]
        if rule == "delta":
            den = jnp.einsum("bngk,bgk->bng", sk, z)[..., None]
            vs = vs - jnp.einsum("bngk,bgkv->bngv", sk, mem) / jnp.where(den > 0, den, 1.0)
        mem, z = mem + jnp.einsum("bngk,bngv->bgkv", sk, vs), z + sk.sum(1)
        del sk_h
    return jnp.concatenate(outs, axis=1), mem, z


def _stream(core_kw, params, q, k, v, pos, chunks, valid=None):
    """Feed [B,T] in the given chunk sizes through the decode core; returns (outputs, final cache)."""
    dc = ia.InfiniCore(**{"segment_len": N, **core_kw, "decode": True})
    cache = jax.jit(dc.init)(jax.random.key(1), q, k, v, pos)["cache"]
    step = jax.jit(functools.partial(dc.apply, mutable=["cache"]))
    outs, start = [], 0
    for c in chunks:
        sl = slice(start, start + c)
        ok = None if valid is None else valid[:, sl]
        o, mut = step({**params, "cache": cache}, q[:, sl], k[:, sl], v[:, sl], pos[:, sl], None, ok)
        outs.append(o)
        cache, start = mut["cache"], start + c
    return jnp.concatenate(outs, axis=1), cache


def test_one_segment_equals_causal_attention_and_eps_convention():
    q, k, v, pos = _qkv(t=N)
    core, p = _core()
    want = _apply(CausalCore(), {}, q, k, v, pos)
    np.testing.assert_allclose(_apply(core, p, q, k, v, pos), want, atol=1e-5, rtol=1e-5)
    core_b, p_b = _core(first_segment="eps", gate_init=0.7)  # (b): (1 - sigmoid(beta)) A_dot
    np.testing.assert_allclose(
        _apply(core_b, p_b, q, k, v, pos), (1 - jax.nn.sigmoid(0.7)) * want, atol=1e-5, rtol=1e-5
    )


@pytest.mark.slow
def test_gate_limits_local_and_memory_read():
    q, k, v, pos = _qkv()
    core, p = _core(gate_init=-1e4)  # sigmoid(beta) -> 0: pure segment-local attention
    local = ia.local_attention(rope(q, pos), rope(k, pos), v, None, None, N, "xla")
    np.testing.assert_allclose(_apply(core, p, q, k, v, pos), local, atol=1e-5, rtol=1e-5)
    core, p = _core(gate_init=1e4)  # sigmoid(beta) -> 1: pure memory read after the first segment
    ref, _, _ = _reference(q, k, v, pos, jnp.full((H,), 1e4))
    out = _apply(core, p, q, k, v, pos)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[:, :N], local[:, :N], atol=1e-5, rtol=1e-5)  # (a): no memory yet


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_forward_equals_reference_recurrence(rule):
    q, k, v, pos = _qkv()
    core, p = _core(rule=rule, gate_init=0.3)
    ref, _, _ = _reference(q, k, v, pos, jnp.full((H,), 0.3), rule)
    np.testing.assert_allclose(_apply(core, p, q, k, v, pos), ref, atol=1e-5, rtol=1e-5)


def test_memory_closed_form_after_s_segments():
    q, k, v, pos = _qkv()
    core, p = _core()
    _, cache = _stream({}, p, q, k, v, pos, [T])
    sk = ia.sigma(k)
    np.testing.assert_allclose(cache["mem"], jnp.einsum("btgk,btgv->bgkv", sk, v), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cache["norm"], sk.sum(1), atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(cache["index"]) - T)


def _mem_inputs(seed=3):
    q, k, v, _ = _qkv(seed=seed)
    sq = ia.sigma(q).reshape(B, S, N, G, H // G, K)
    sk, v = ia.sigma(k).reshape(B, S, N, G, K), v.reshape(B, S, N, G, K)
    state = (jnp.zeros((B, G, K, K)), jnp.zeros((B, G, K)))
    return sq, sk, v, state, jnp.ones((B, S), bool)


@pytest.mark.slow
def test_prefix_sum_equals_scan_values_and_grads():
    sq, sk, v, state, fold = _mem_inputs()

    def loss(fn, sq, sk, v):
        a, _, (mem, z) = fn(sq, sk, v, state, fold, "skip")
        return jnp.sum(jnp.sin(a)) + jnp.sum(mem**2) * 1e-3 + jnp.sum(z)

    prefix = functools.partial(loss, ia.memory_prefix)
    scan = functools.partial(loss, functools.partial(ia.memory_scan, rule="linear"))
    a1, _, s1 = ia.memory_prefix(sq, sk, v, state, fold, "skip")
    a2, _, s2 = ia.memory_scan(sq, sk, v, state, fold, "skip", "linear")
    for x, y in zip((a1, *s1), (a2, *s2), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
    g1 = jax.grad(prefix, argnums=(0, 1, 2))(sq, sk, v)
    g2 = jax.grad(scan, argnums=(0, 1, 2))(sq, sk, v)
    for x, y in zip(g1, g2, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_gradients_flow_through_memory_across_segments(rule):
    q, k, v, pos = _qkv()
    core, p = _core(rule=rule)
    # the last segment's output sees the first segment's keys and values only through the memory
    last = lambda k, v: jnp.sum(core.apply(p, q, k, v, pos)[:, -N:])
    gk, gv = jax.jit(jax.grad(last, argnums=(0, 1)))(k, v)
    assert float(jnp.abs(gk[:, :N]).min()) > 0 and float(jnp.abs(gv[:, :N]).max()) > 0


def test_delta_fixed_point_leaves_memory_unchanged():
    _, sk, _, _, _ = _mem_inputs()
    sk = sk[:, 0]  # [B,N,G,K]
    mem = jax.random.normal(jax.random.key(5), (B, G, K, K))
    z = jax.random.uniform(jax.random.key(6), (B, G, K), minval=0.5, maxval=2.0)
    bound = jnp.einsum("bngk,bgkv->bngv", sk, mem) / jnp.einsum("bngk,bgk->bng", sk, z)[..., None]
    dm, dz = ia.segment_update(sk, bound, mem, z, "delta")
    np.testing.assert_allclose(dm, jnp.zeros_like(dm), atol=1e-5)
    assert float(dz.min()) > 0  # z still grows
    dm_lin, _ = ia.segment_update(sk, bound, mem, z, "linear")
    assert float(jnp.abs(dm_lin).max()) > 1e-2  # the linear rule would write it again


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["linear", "delta", "none"])
def test_streaming_equals_full_forward_core(rule):
    q, k, v, pos = _qkv()
    core, p = _core(rule=rule, gate_init=0.2)
    full = _apply(core, p, q, k, v, pos)
    out, _ = _stream({"rule": rule, "gate_init": 0.2}, p, q, k, v, pos, [5, 1, 6])
    np.testing.assert_allclose(out, full, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_rope_shift_leaves_memory_unchanged_and_outputs_too():
    q, k, v, pos = _qkv()
    core, p = _core()
    out, cache = _stream({}, p, q, k, v, pos, [7, 5])
    out2, cache2 = _stream({}, p, q, k, v, pos + 1000, [7, 5])
    np.testing.assert_array_equal(cache["mem"], cache2["mem"])  # no position enters the memory
    np.testing.assert_array_equal(cache["norm"], cache2["norm"])
    np.testing.assert_allclose(out, out2, atol=1e-4, rtol=1e-4)  # RoPE is relative


@pytest.mark.slow
def test_padding_writes_nothing():
    q, k, v, pos = _qkv()
    valid = jnp.ones((B, T), bool).at[0, 1].set(False).at[0, 6:8].set(False).at[1, 9:].set(False)
    core, p = _core(gate_init=0.5)
    junk = lambda x: jnp.where(valid[:, :, None, None], x, 1e3)
    real = lambda x: x * valid[..., None, None]  # outputs at padded positions are never used
    out = _apply(core, p, q, k, v, pos, None, valid)
    junk_out = _apply(core, p, q, junk(k), junk(v), pos, None, valid)
    np.testing.assert_allclose(real(junk_out), real(out), atol=1e-5, rtol=1e-5)
    ref, _, _ = _reference(q, k, v, pos, jnp.full((H,), 0.5), valid=valid)
    np.testing.assert_allclose(real(out), real(ref), atol=1e-5, rtol=1e-5)
    # streaming skips invalid tokens; 8 valid tokens per row = 2 segments, both folded into memory
    valid = jnp.ones((B, T), bool).at[0, 1:3].set(False).at[0, 9:11].set(False).at[1, 8:].set(False)
    _, cache = _stream({"gate_init": 0.5}, p, q, junk(k), junk(v), pos, [5, 7], valid=valid)
    sk = ia.sigma(k) * valid[:, :, None, None]
    np.testing.assert_allclose(cache["norm"], sk.sum(1), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cache["mem"], jnp.einsum("btgk,btgv->bgkv", sk, v), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_document_mask_only_affects_local_attention():
    q, k, v, pos = _qkv()
    core, p = _core()
    docs = jnp.broadcast_to((jnp.arange(T) >= 6).astype(jnp.int32), (B, T))
    ref = _apply(core, p, q, k, v, pos)
    out = _apply(core, p, q, k, v, pos, docs)
    np.testing.assert_allclose(out[:, :6], ref[:, :6], atol=1e-5, rtol=1e-5)  # before the boundary
    np.testing.assert_allclose(out[:, 8:], ref[:, 8:], atol=1e-5, rtol=1e-5)  # next segment: memory kept
    assert float(jnp.abs(out[:, 6:8] - ref[:, 6:8]).max()) > 1e-3


def _model_cfg(rule="linear", seq_len=16):
    c = tiny.get_config("test")
    c.model.update(memory="infini", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64)
    c.model.infini.segment_len, c.model.infini.rule, c.model.infini.gate_init = N, rule, 0.4
    c.data.seq_len = seq_len
    return c


@pytest.mark.slow
def test_streaming_generation_equals_full_forward_whole_model():
    c = _model_cfg("delta")  # (the linear rule streams through the same code; see the core-level test)
    ids = jax.random.randint(jax.random.key(2), (B, 16), 3, c.model.vocab_size)
    model, dec = decoder.build_model(c.model), decoder.build_model(c.model, decode=True)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    full = _apply(model, {"params": params}, ids)
    cache = jax.jit(dec.init)(jax.random.key(0), ids)["cache"]
    step = jax.jit(functools.partial(dec.apply, mutable=["cache"]))
    outs, start = [], 0
    for n in (7, 1, 4, 4):  # a prompt that is not a multiple of N, one token closing a segment, segments
        pos = jnp.broadcast_to(jnp.arange(start, start + n), (B, n))
        o, mut = step({"params": params, "cache": cache}, ids[:, start : start + n], pos)
        outs.append(o)
        cache, start = mut["cache"], start + n
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_sharded_equals_unsharded():
    c = _model_cfg()
    c.mesh.update(data=4, tensor=2)
    model = decoder.build_model(c.model)
    ids = jax.random.randint(jax.random.key(2), (8, 16), 3, c.model.vocab_size)
    boxed = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    params = nn.unbox(boxed)
    want = _apply(model, {"params": params}, ids)
    mesh = sharding.make_mesh(c.mesh)
    with sharding.context(mesh):
        shard = sharding.tree_shardings(mesh, jax.eval_shape(lambda: boxed))
        ps = jax.device_put(params, shard)
        xs = jax.device_put(ids, sharding.batch_sharding(mesh))
        got = jax.jit(lambda p, x: model.apply({"params": p}, x))(ps, xs)
    q_spec = shard["stack"]["block_0"]["layer_0"]["attn"]["q"]["kernel"].spec
    assert "tensor" in str(q_spec)  # heads really are split over 'tensor'
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_beta_is_one_fp32_gate_per_query_head():
    core, p = _core(gate_init=-5.0)
    beta = nn.unbox(p["params"]["beta"])
    assert beta.shape == (H,) and beta.dtype == jnp.float32 and np.allclose(beta, -5.0)
    _, p_none = _core(rule="none")
    assert "params" not in p_none or "beta" not in p_none.get("params", {})


def test_memory_footprint_per_layer():
    c = _model_cfg()
    dec = decoder.build_model(c.model, decode=True)
    cache = jax.eval_shape(dec.init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["cache"]
    k, g = c.model.d_model // c.model.n_heads, c.model.n_kv_heads
    for i in range(c.model.n_layers):
        core = cache["stack"][f"block_{i}"]["layer_0"]["attn"]["core"]
        floats = int(np.prod(core["mem"].shape) + np.prod(core["norm"].shape))
        assert floats == k * (k + 1) * g == ia.InfiniCore.memory_floats(c.model)
        assert core["k"].shape == (1, N, g, k)  # local KV cache: one segment


@pytest.mark.slow
def test_flops_and_validate():
    c = _model_cfg()
    m = c.model
    k = m.d_model // m.n_heads
    want = 2 * N * m.n_heads * k + m.n_heads * (2 * k * k + 2 * k) + m.n_kv_heads * (2 * k * k + k)
    assert ia.InfiniCore.flops_per_token(m, 4096) == want  # independent of the row length
    assert decoder.flops_per_token(m, 4096) > 0
    cfglib.validate(c)
    c.data.seq_len = 18
    with pytest.raises(cfglib.ConfigError, match="multiple of model.infini.segment_len"):
        cfglib.validate(c)
    q, k_, v, pos = _qkv(t=6)
    with pytest.raises(ValueError, match="not a multiple"):
        ia.InfiniCore(segment_len=N).init(jax.random.key(0), q, k_, v, pos)
