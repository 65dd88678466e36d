"""HF checkpoints out: the project's tiny dense, MoE and MoA+MoE models, exported and reloaded with
transformers' AutoModelForCausalLM (no custom code), compute the project's logits (fp32, max abs diff <=
1e-4) and greedy generations; import -> export is the identity on the tensors; models transformers cannot
express are refused with the field that blocks them; the CLI never overwrites a folder."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from hf_fixtures import hf_greedy, hf_logits, make_hf_model, nfkc_spm  # noqa: E402

from voltron_jax import config as cfglib  # noqa: E402
from voltron_jax.errors import ConfigError  # noqa: E402
from voltron_jax.inference import generate  # noqa: E402
from voltron_jax.interop import hf_export, hf_import  # noqa: E402
from voltron_jax.models import decoder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(kind: str) -> ml_collections.ConfigDict:
    c = cfglib.get_default()
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 32, 2, 4, 2, 48
    m.init_std, m.rope_theta, m.norm_eps = 0.3, 30000.0, 1e-6
    c.data.seq_len = 64
    if kind == "dense_scaled":  # MiniCPM scaling, folded into the exported weights
        m.scale_emb, m.scale_depth, m.dim_model_base = 2.0, 1.4, 16
    if kind == "dense_tied":
        m.tie_embeddings = True
    if kind in ("moe", "moa_moe"):
        m.ffn = "moe"
        m.moe.n_experts, m.moe.top_k, m.moe.impl, m.moe.router_init_std = 4, 2, "dense", 0.5
    if kind == "moa_moe":
        m.attention, m.n_kv_heads = "moa", 4
        m.moa.n_experts, m.moa.top_k, m.moa.impl, m.moa.router_init_std = 4, 2, "dense", 0.5
    return cfglib.validate(c)


def random_params(m, seed=0):
    dummy = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(decoder.build_model(m).init(jax.random.key(seed), dummy)["params"])
    params = jax.tree.map(np.asarray, params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(  # norm gains away from 1
        lambda path, x: (
            x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
            if "scale" in jax.tree_util.keystr(path)
            else x
        ),
        params,
    )


@pytest.mark.parametrize("kind", ["dense_scaled", "dense_tied", "moe", "moa_moe"])
def test_exported_model_matches_in_transformers(kind, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c = tiny_config(kind)
    params = random_params(c.model)
    out = hf_export.export(params, c, str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    want = {"dense_scaled": "Llama", "dense_tied": "Llama", "moe": "Mixtral", "moa_moe": "JetMoe"}[kind]
    assert type(hf).__name__ == f"{want}ForCausalLM"
    ids = np.random.default_rng(1).integers(3, 259, (2, 20)).astype(np.int32)
    ours = np.asarray(decoder.build_model(c.model).apply({"params": params}, jnp.asarray(ids)))
    theirs = hf_logits(hf, ids)
    assert ours.std() > 0.3
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)

    tok = AutoTokenizer.from_pretrained(out)  # the byte vocabulary: same ids, EOS first as BOS
    text = "def f(x):\n    return x  # é"
    assert tok(text)["input_ids"] == [1, *(b + 3 for b in text.encode())]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    prompt = list(text.encode()[:6])
    got = generate.generate_ids(
        decoder.build_model(c.model, decode=True),
        decoder.build_model(c.model),
        params,
        [[b + 3 for b in prompt]],
        10,
        temperature=0.0,
        stop_at_eos=False,
    )
    assert got == [hf_greedy(hf, [1, *(b + 3 for b in prompt)], 10)]


def import_then_export(src: str, out: str) -> tuple[dict, dict, str]:
    """(the HF checkpoint's tensors, the tensors of its import exported again, the export's folder)."""
    from safetensors.numpy import load_file

    c = cfglib.get_default()
    c.data.seq_len = 64
    hf_import.configure(c, src)
    _, params = hf_import.load(src)
    out = hf_export.export(params, c, out)
    tensors = lambda folder: load_file(os.path.join(folder, "model.safetensors"))
    return tensors(src), tensors(out), out


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "mixtral", "jetmoe"])
def test_import_then_export_is_the_identity_on_tensors(kind, tmp_path):
    src = str(tmp_path / "src")
    make_hf_model(kind, src)
    a, b, out = import_then_export(src, str(tmp_path / "out"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the checkpoint's tokenizer, unchanged
        assert open(os.path.join(src, f)).read() == open(os.path.join(out, f)).read()


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("memory", "infini", "model.memory='infini'.*nearest exportable model is model.memory='none'"),
        ("residual", "denseformer", "model.residual='denseformer'.*model.residual='plain'"),
        ("routing", "mod", "model.routing='mod'.*model.routing='none'"),
        ("linear", "bitlinear", "model.bitlinear.norm='rms'.*model.bitlinear.norm='sub'"),
    ],
)
def test_models_transformers_cannot_express_are_refused(field, value, match, tmp_path):
    c = tiny_config("dense_tied")
    c.model[field] = value
    with pytest.raises(ConfigError, match=match):
        hf_export.check_exportable(c.model)
    c = tiny_config("dense_tied")
    c.model.scale_emb = 2.0
    with pytest.raises(ConfigError, match="model.scale_emb=2.0.*tie_embeddings=False"):
        hf_export.check_exportable(c.model)
    c = tiny_config("moa_moe")
    c.model.n_kv_heads = 2
    with pytest.raises(ConfigError, match="model.n_heads=model.n_kv_heads"):
        hf_export.check_exportable(c.model)
    c = tiny_config("moe")
    c.model.moe.top_k = 1
    with pytest.raises(ConfigError, match="model.moe.top_k=2"):
        hf_export.check_exportable(c.model)
    c = tiny_config("dense_tied")
    c.data.vocab, c.data.spm_path = "sentencepiece", nfkc_spm(str(tmp_path / "nfkc.model"))
    with pytest.raises(ConfigError, match="nmt_nfkc.*--notokenizer"):
        hf_export.export(random_params(c.model), c, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()  # a refused export writes nothing


@pytest.mark.slow
def test_cli_exports_a_run_and_never_overwrites(tmp_path):
    from transformers import AutoModelForCausalLM

    import voltron_jax
    from voltron_jax import train

    c = tiny_config("dense_tied")
    c.data.batch_size = 8
    c.train.eval_batches, c.schedule.warmup = 1, 0
    c.recipe = ml_collections.ConfigDict(dict(stable=cfglib.phase(1)))
    train.run(c, str(tmp_path / "run"))
    keep = tmp_path / "busy"
    keep.mkdir()
    (keep / "mine.txt").write_text("user data")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "voltron_jax.interop.export_hf", f"--workdir={tmp_path / 'run'}"]
    bad = subprocess.run([*cmd, f"--out={keep}"], env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "exists and is not empty" in bad.stderr, bad.stderr[-2000:]
    assert os.listdir(keep) == ["mine.txt"] and (keep / "mine.txt").read_text() == "user data"
    ok = subprocess.run(
        [*cmd, f"--out={tmp_path / 'hf'}"], env=env, capture_output=True, text=True, timeout=600
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    lm = voltron_jax.load(str(tmp_path / "run"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    text = "import os\n"
    ids = [1, *lm.encode(text)]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1].double()
    nll = (torch.logsumexp(logits, -1) - logits[torch.arange(len(ids) - 1), ids[1:]]).numpy()
    np.testing.assert_allclose(nll, lm.score(text), atol=1e-4, rtol=0)
