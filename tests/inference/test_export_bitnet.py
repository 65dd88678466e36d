"""BitNet export: packed checkpoints run the int8 x ternary path and match the fake-quant model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bench_1b, tiny
from voltron_jax import config as cfglib
from voltron_jax.inference import export_bitnet
from voltron_jax.models import decoder
from voltron_jax.run import checkpoint


def _bitnet(arg="test", **model):
    c = tiny.get_config(arg)
    c.model.linear = "bitlinear"
    for k, v in model.items():
        c.model[k] = v
    return cfglib.validate(c)


def _trained_like(c, seed=0):
    """Params of a BitNet tiny model with non-trivial norm gains (as after training)."""
    model = decoder.build_model(c.model)
    ids = jax.random.randint(jax.random.key(seed), (2, 24), 0, c.model.vocab_size)
    params = nn.unbox(model.init(jax.random.key(seed + 1), ids)["params"])
    gains = jax.random.key(seed + 2)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x * (1 + 0.2 * jax.random.normal(gains, x.shape)) if "norm" in jax.tree_util.keystr(p) else x
        ),
        params,
    )
    return model, params, ids


@pytest.mark.slow
def test_packed_model_matches_fake_quant_model():
    """Scanned layers: stacked [L, in, out] kernels get one scale per layer (the unscanned model is
    covered by the round trip below)."""
    c = _bitnet(scan_layers=True)
    model, params, ids = _trained_like(c)
    packed = export_bitnet.pack_params(params, c)
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(packed)}
    codes = [x for k, x in flat.items() if k.endswith("['packed']")]
    assert len(codes) == 7 and all(x.dtype == jnp.uint8 for x in codes)
    assert not any(k.endswith("['kernel']") and "lm_head" not in k for k in flat)  # every projection packed
    np.testing.assert_array_equal(packed["embed"]["embedding"], params["embed"]["embedding"])
    np.testing.assert_array_equal(packed["lm_head"]["kernel"], params["lm_head"]["kernel"])
    packed_model = decoder.build_model(export_bitnet.packed_config(c).model)
    want = jax.jit(model.apply)({"params": params}, ids)
    got = jax.jit(packed_model.apply)({"params": packed}, ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_export_cli_path_roundtrips_a_train_checkpoint(tmp_path):
    """A phase folder as the train loop writes it -> export -> load_packed -> same logits."""
    c = _bitnet()
    model, params, ids = _trained_like(c, seed=3)
    ck = checkpoint.Checkpointer(tmp_path / "run" / "00_stable" / "ckpt", async_save=False)
    ck.save(8, {"step": jnp.int32(8), "params": params, "opt_state": {}}, {}, {"config": c.to_dict()})
    ck.close()
    report = export_bitnet.export(str(tmp_path / "run" / "00_stable"), str(tmp_path / "packed"))
    assert report["ratio"] >= 7.5
    packed_model, packed, loaded_cfg = export_bitnet.load_packed(str(tmp_path / "packed"))
    assert loaded_cfg.model.bitlinear.packed
    want = model.apply({"params": params}, ids)
    np.testing.assert_allclose(packed_model.apply({"params": packed}, ids), want, rtol=1e-4, atol=1e-4)


def test_packed_linear_weights_are_at_least_7_5x_smaller_than_bf16():
    for c in (_bitnet(""), bench_1b.get_config("bitlinear")):
        r = export_bitnet.linear_weight_bytes(c)
        m = c.model
        n_weights = m.n_layers * (4 * m.d_model * m.d_model + 3 * m.d_model * m.d_ff)  # q k v o, gate up down
        assert r["bf16_bytes"] == 2 * n_weights
        assert r["packed_bytes"] == n_weights // 4 + 4 * 7 * m.n_layers  # codes + one fp32 scale per matrix
        assert r["ratio"] >= 7.5


def test_weight_bytes_of_an_infini_model_whose_segment_is_longer_than_8():
    """Shapes are traced at one whole segment (Infini-attention refuses partial ones); the memory's
    gates are not linear weights, so the byte counts equal the local-attention model's."""
    c = _bitnet("")
    c.model.memory, c.model.infini.segment_len = "infini", 32
    assert export_bitnet.linear_weight_bytes(c) == export_bitnet.linear_weight_bytes(_bitnet(""))


def test_dense_checkpoints_are_refused():
    c = tiny.get_config("test")
    with pytest.raises(ValueError, match="bitlinear"):
        export_bitnet.packed_config(c)
