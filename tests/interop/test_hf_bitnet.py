"""BitNet both ways: the project's BitNet in transformers' layout (bitlinear.norm='sub', mlp.activation
'relu2') exports as a packed BitNetForCausalLM that AutoModelForCausalLM loads with no custom code, and a
packed HF BitNet imports; import -> export is the identity on the tensors, bit for bit.

How the forwards compare (fp32). The quantisers are the same function up to one rounding: every
transformers BitLinear, fed its own captured input, gives the project's per-token scales to 1 ulp
(127 * (1 / max|x|) there, 127 / max|x| here), the same int8 activations away from a rounding boundary
and the same output up to the fp32 rescale (1e-5 relative). End to end, the float work outside the
integer matmuls (norms, RoPE, softmax, residual adds) differs by ~1e-6 relative between torch and XLA;
an activation within ~1e-4 of a rounding boundary of x * 127 / max|x| (a .5) could round the other way
on one side, moving that position's logits (and, through attention, later ones) by up to ~0.1. That is
rare (no position of benchmarks/interop_parity.py's 256 either way, docs/results.md), so the logits are
compared as: at least 95% of positions within 1e-4 (max abs), every position within 0.1, and the greedy
generations identical."""

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' BitNet quantizer refuses to load without it
torch = pytest.importorskip("torch")

from hf_fixtures import hf_greedy, hf_logits, make_hf_bitnet  # noqa: E402
from test_hf_export import import_then_export, random_params, tiny_config  # noqa: E402

from voltron_jax import config as cfglib  # noqa: E402
from voltron_jax.errors import ConfigError  # noqa: E402
from voltron_jax.inference import generate  # noqa: E402
from voltron_jax.interop import hf_bitnet, hf_export, hf_import  # noqa: E402
from voltron_jax.models import bitlinear as bl  # noqa: E402
from voltron_jax.models import decoder  # noqa: E402

BOS = 1


def bitnet_config(scaled: bool = True):
    """The tiny project BitNet in transformers' layout (MiniCPM scaling on: it must fold exactly)."""
    c = tiny_config("dense_scaled" if scaled else "dense_tied")
    m = c.model
    m.linear, m.bitlinear.norm, m.mlp.activation, m.norm_eps = "bitlinear", "sub", "relu2", 1e-5
    return cfglib.validate(c)


def _capture_bitlinear_io(hf) -> list:
    """[(module name, module, input, output)] of every transformers BitLinear call (forward hooks)."""
    from transformers.integrations.bitnet import BitLinear

    calls = []
    for name, mod in hf.named_modules():
        if isinstance(mod, BitLinear):
            hook = lambda mod, inp, out, name=name: calls.append((name, mod, inp[0].numpy(), out.numpy()))  # noqa: E731
            mod.register_forward_hook(hook)
    return calls


def _assert_quantisers_agree(calls, params, rs: float = 1.0) -> None:
    """Each transformers BitLinear, on its own input: the same per-token scales up to 1 ulp (transformers
    computes 127 * (1 / max|x|): torch's `int / tensor` is a reciprocal then a product; the project 127 /
    max|x|), hence the same int8 activations wherever x * scale is not within 1e-4 of a .5, and the project
    BitLinear's output (kernel from `params`; o and down times the folded residual scale `rs`) up to the
    fp32 rescale."""
    assert len(calls) == 14
    for name, mod, x, y in calls:
        _, _, i, group, proj = name.split(".")
        layer = params["stack"][f"block_{i}"]["layer_0"]["attn" if group == "self_attn" else "ffn"]
        kernel = layer[proj.removesuffix("_proj")]["kernel"]
        their_int, their_scale = (t.numpy() for t in mod.activation_quant(torch.tensor(x)))
        our_int, our_scale = (np.asarray(t) for t in bl.quantize_act(jnp.asarray(x)))
        np.testing.assert_allclose(our_scale, their_scale, rtol=1.2e-7, atol=0, err_msg=name)
        v = x * our_scale
        clear = np.abs(np.abs(v - np.floor(v)) - 0.5) > 1e-4  # not at a rounding boundary
        assert np.mean(clear) > 0.99, name
        np.testing.assert_array_equal(our_int[clear], their_int[clear], err_msg=name)
        ours = np.asarray(bl.bitlinear_apply(jnp.asarray(x), jnp.asarray(kernel)))
        ours = ours * (rs if proj in ("o_proj", "down_proj") else 1.0)
        np.testing.assert_allclose(ours, y, rtol=1e-5, atol=1e-5 * np.abs(y).max(), err_msg=name)


def _assert_logits_close(ours, theirs) -> None:
    """The end-to-end bound of the module docstring: >= 95% of positions within 1e-4, all within 0.1."""
    assert theirs.std() > 0.3  # far from uniform: the tolerances mean something
    per_position = np.abs(ours - theirs).max(-1)  # [B,T]
    assert np.mean(per_position <= 1e-4) >= 0.95, per_position
    assert per_position.max() <= 0.1, per_position


def _greedy(m, params, prompts, n):
    return generate.generate_ids(
        decoder.build_model(m, decode=True),
        decoder.build_model(m),
        params,
        prompts,
        n,
        temperature=0.0,
        eos_id=BOS,
        stop_at_eos=False,
    )


@pytest.mark.slow
def test_exported_bitnet_is_packed_and_matches_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitnet import BitLinear

    c = bitnet_config()
    params = random_params(c.model)
    out = hf_export.export(params, c, str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(hf).__name__ == "BitNetForCausalLM"
    layer = hf.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, BitLinear) and isinstance(layer.mlp.down_proj, BitLinear)
    assert layer.mlp.down_proj.weight.dtype == torch.uint8  # packed 2-bit ternary codes
    assert type(hf.lm_head) is torch.nn.Linear  # never quantised, as in the project
    ids = np.random.default_rng(1).integers(3, 259, (2, 20)).astype(np.int32)
    calls = _capture_bitlinear_io(hf)
    theirs = hf_logits(hf, ids)
    _assert_quantisers_agree(calls, params, rs=c.model.scale_depth / np.sqrt(c.model.n_layers))
    ours = np.asarray(decoder.build_model(c.model).apply({"params": params}, jnp.asarray(ids)))
    _assert_logits_close(ours, theirs)
    prompts = [[5, 17, 9, 40], [33, 8]]
    assert _greedy(c.model, params, prompts, 12) == [hf_greedy(hf, [BOS, *p], 12) for p in prompts]


@pytest.mark.slow
def test_imported_hf_bitnet_matches_transformers(tmp_path):
    hf = make_hf_bitnet(str(tmp_path))
    m, params = hf_import.load(str(tmp_path))
    assert (m.linear, m.bitlinear.norm, m.mlp.activation) == ("bitlinear", "sub", "relu2")
    assert set(params["stack"]["block_0"]["layer_0"]["attn"]["o"]) == {"kernel", "norm"}
    ids = np.random.default_rng(2).integers(3, m.vocab_size, (2, 24)).astype(np.int32)
    calls = _capture_bitlinear_io(hf)
    theirs = hf_logits(hf, ids)
    _assert_quantisers_agree(calls, params)
    ours = np.asarray(decoder.build_model(m).apply({"params": params}, jnp.asarray(ids)))
    _assert_logits_close(ours, theirs)
    prompts = [[5, 17, 9, 40], [33, 8]]
    assert _greedy(m, params, prompts, 12) == [hf_greedy(hf, [BOS, *p], 12) for p in prompts]


@pytest.mark.slow
def test_bitnet_import_then_export_is_the_identity_on_tensors(tmp_path):
    src = str(tmp_path / "src")
    make_hf_bitnet(src)
    a, b, _ = import_then_export(src, str(tmp_path / "out"))
    assert sorted(a) == sorted(b)
    for k in a:  # packed uint8 codes, weight_scale, norms and embeddings: bit for bit
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_packed_layout_is_transformers_pack_weights():
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    w_int = np.random.default_rng(3).integers(-1, 2, (12, 8)).astype(np.int8)  # [in, out]
    ours = hf_bitnet.pack_hf(w_int)  # [out/4, in]
    theirs = pack_weights(torch.tensor(w_int.T, dtype=torch.float32)).numpy()
    np.testing.assert_array_equal(ours, theirs)
    back = unpack_weights(torch.tensor(ours), torch.float32)  # eager: hf_fixtures switches compile off
    np.testing.assert_array_equal(back.numpy().T, w_int)


@pytest.mark.parametrize(
    "field, value, match",
    [
        (
            "bitlinear.norm",
            "rms",
            "model.bitlinear.norm='rms'.*nearest exportable setting is model.bitlinear.norm='sub'",
        ),
        ("bitlinear.weights", "binary", "model.bitlinear.weights='ternary'"),
        ("bitlinear.eps", 1e-6, "model.bitlinear.eps=1e-05"),
        ("ffn", "moe", "model.ffn='moe' with BitLinear.*model.ffn='mlp'"),
        ("d_ff", 50, "model.d_ff.*multiple of 4"),
    ],
)
def test_bitnets_transformers_cannot_express_are_refused(field, value, match):
    c = bitnet_config()
    sub, _, key = field.rpartition(".")
    (c.model[sub] if sub else c.model)[key] = value
    with pytest.raises(ConfigError, match=match):
        hf_export.check_exportable(c.model)


def test_a_full_precision_hf_bitnet_is_refused(tmp_path):
    import json

    from hf_fixtures import hf_config

    cfg = dict(hf_config("bitnet").to_dict(), architectures=["BitNetForCausalLM"])
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match="only the packed ternary format imports"):
        hf_import.load(str(tmp_path))


@pytest.mark.slow  # packs through jit and builds the packed model: ~20 s on the shared host
def test_packed_project_params_export_the_same_codes():
    """A BitNet packed by inference/export_bitnet.py exports the latent model's ternary codes; its scales
    are the forward's fp32 beta, the latent export's the exact mean (equal to ~1e-6 relative)."""
    from voltron_jax.inference import export_bitnet

    c = bitnet_config()
    params = random_params(c.model)
    packed = export_bitnet.pack_params(params, c)
    latent_t = hf_export.to_tensors(params, c.model)
    packed_t = hf_export.to_tensors(packed, export_bitnet.packed_config(c).model)
    assert sorted(latent_t) == sorted(packed_t)
    for k in latent_t:
        if k.endswith("weight_scale"):
            np.testing.assert_allclose(packed_t[k], latent_t[k], rtol=1e-5, err_msg=k)
        else:
            np.testing.assert_array_equal(packed_t[k], latent_t[k], err_msg=k)
