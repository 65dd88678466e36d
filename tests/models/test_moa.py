"""Mixture of Attention heads: reduction to dense attention, shared K/V head layout, Infini and decode."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from voltron_jax.models import decoder, moa
from voltron_jax.models.attention import Attention, CausalCore
from voltron_jax.models.infini_attention import InfiniCore

D, H, G, K, E, P = 16, 4, 2, 4, 3, 2
B, T = 2, 8


def _x(seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, D))


def _pos():
    return jnp.broadcast_to(jnp.arange(T), (B, T))


CORES = {"causal": CausalCore, "infini": functools.partial(InfiniCore, segment_len=4)}


@functools.lru_cache
def _dense(core: str):
    """(jitted dense Attention apply, E distinct dense param trees sharing k/v and core params)."""
    att = Attention(H, G, K, core=CORES[core])
    init = jax.jit(att.init)
    params = [nn.unbox(init(jax.random.key(i), _x(), _pos())["params"]) for i in range(E)]
    if core == "infini":  # distinct gates per head, so a wrong head order would show
        params[0]["core"]["beta"] = jnp.linspace(-2.0, 2.0, H)
    for p in params[1:]:
        p.update({n: params[0][n] for n in ("k", "v", "core") if n in params[0]})
    return jax.jit(att.apply), params


@functools.lru_cache
def _moa(core: str, impl: str, top_k: int = P):
    layer = moa.MixtureOfAttention(
        H, G, K, core=CORES[core], n_experts=E, top_k=top_k, impl=impl, capacity_factor=E / top_k
    )
    return jax.jit(layer.apply)


def _moa_params(dense: list, router, top_k=P):
    """MoA params from E dense attentions: q/o stacked, k/v (and core params) from the first."""
    out = {n: jax.tree.map(lambda *xs: jnp.stack(xs), *[d[n] for d in dense]) for n in ("q", "o")}
    out.update(k=dense[0]["k"], v=dense[0]["v"], router=router)
    if "core" in dense[0]:  # Infini beta per query head -> per core head (pick slot, head)
        beta = dense[0]["core"]["beta"]  # [H]
        tiled = moa.to_core_heads(jnp.broadcast_to(beta[:, None], (1, 1, top_k, H, 1)), G)  # [1,1,P*H,1]
        out["core"] = {"beta": tiled.reshape(-1)}
    return out


@pytest.mark.parametrize(
    "impl,core",
    [
        pytest.param("dropless", "causal", marks=pytest.mark.slow),
        ("capacity", "causal"),
        ("dense", "causal"),
        ("ragged", "causal"),
        pytest.param("dropless", "infini", marks=pytest.mark.slow),
    ],
)
def test_identical_experts_equal_dense_attention_for_any_router(impl, core):
    apply, dense = _dense(core)
    x, pos = _x(), _pos()
    want = apply({"params": dense[0]}, x, pos)
    router = 10.0 * jax.random.normal(jax.random.key(3), (D, E))
    got = _moa(core, impl)({"params": _moa_params([dense[0]] * E, router)}, x, pos)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("core", ["causal", pytest.param("infini", marks=pytest.mark.slow)])
def test_all_experts_zero_router_is_mean_of_dense_attentions(core):
    apply, dense = _dense(core)  # distinct q/o, shared K/V (and memory gate)
    x, pos = _x(), _pos()
    want = sum(apply({"params": d}, x, pos) for d in dense) / E
    got = _moa(core, "dropless", top_k=E)({"params": _moa_params(dense, jnp.zeros((D, E)), top_k=E)}, x, pos)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_core_head_order_pairs_expert_heads_with_their_kv_heads():
    # core head j reads KV head j // (P*H/G); it must be the KV head of (slot s, head h): h // (H/G)
    q = jnp.arange(P * H).reshape(1, 1, P, H, 1)  # value = s*H + h
    core = np.asarray(moa.to_core_heads(q, G)).reshape(-1)
    for j, v in enumerate(core):
        s, h = divmod(int(v), H)
        assert j // (P * H // G) == h // (H // G), (j, s, h)
    np.testing.assert_array_equal(moa.from_core_heads(moa.to_core_heads(q, G), P, G), q)


@pytest.mark.slow
def test_params_layout_and_aux_losses():
    layer = moa.MixtureOfAttention(H, G, K, n_experts=E, top_k=P)
    boxed = jax.eval_shape(layer.init, jax.random.key(0), _x(), _pos())["params"]
    specs = nn.get_partition_spec(boxed)
    shapes = jax.tree.map(lambda a: a.shape, nn.unbox(boxed))
    assert shapes["q"]["kernel"] == (E, D, H * K) and shapes["o"]["kernel"] == (E, H * K, D)
    assert shapes["k"]["kernel"] == (D, G * K) and shapes["router"] == (D, E)
    assert tuple(specs["q"]["kernel"]) == ("expert", "embed", "heads")
    params = _moa_params(_dense("causal")[1], jax.random.normal(jax.random.key(0), (D, E)))
    _, state = jax.jit(functools.partial(layer.apply, mutable=["aux_loss"]))({"params": params}, _x(), _pos())
    assert set(state["aux_loss"]) == {"moa_lb", "moa_z"}
    assert np.isfinite(float(state["aux_loss"]["moa_lb"][0])) and float(state["aux_loss"]["moa_z"][0]) > 0


@pytest.mark.slow
def test_decode_matches_full_forward():
    m = tiny.get_config("test").model
    m.attention, m.ffn = "moa", "moe"
    m.moa.impl = m.moe.impl = "dropless"  # capacity drops depend on how many tokens a call sees
    m.moa.n_experts = m.moe.n_experts = 4
    m.n_layers, m.d_model, m.d_ff, m.vocab_size = 1, 32, 32, 64
    ids = jax.random.randint(jax.random.key(0), (2, 5), 0, m.vocab_size)
    full_model, dec_model = decoder.build_model(m), decoder.build_model(m, decode=True)
    params = nn.unbox(jax.jit(full_model.init)(jax.random.key(1), ids)["params"])
    want = jax.jit(full_model.apply)({"params": params}, ids)
    shapes = jax.eval_shape(dec_model.init, jax.random.key(1), ids)["cache"]  # an empty cache: zeros
    cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    step = jax.jit(
        lambda c, t, pos: dec_model.apply({"params": params, "cache": c}, t, pos, mutable=["cache"])
    )
    got = []
    for i in range(ids.shape[1]):
        logits, upd = step(cache, ids[:, i : i + 1], jnp.full((2, 1), i))
        cache = upd["cache"]
        got.append(logits)
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, atol=1e-4, rtol=1e-4)


def test_flops_per_token_counts_active_experts():
    m = tiny.get_config("test").model
    m.attention = "moa"
    k = m.d_model // m.n_heads
    want = (
        2 * m.d_model * m.moa.n_experts
        + 4 * m.d_model * m.n_kv_heads * k
        + m.moa.top_k * 4 * m.d_model * m.n_heads * k
    )
    assert moa.MixtureOfAttention.flops_per_token(m, 64) == want
    # the core attends with top_k * n_heads query heads: the model count includes it
    dense = tiny.get_config("test").model
    core = CausalCore.flops_per_token(m, 64)
    extra = want - Attention.flops_per_token(dense, 64) + (m.moa.top_k - 1) * core
    assert decoder.flops_per_token(m, 64) - decoder.flops_per_token(dense, 64) == m.n_layers * extra
