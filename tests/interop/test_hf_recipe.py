"""A Hugging Face checkpoint as a phase's init (init.from_='hf:/path') and its tokenizer as the run's
vocabulary (data.vocab='tokenizers'): the phase starts from exactly the HF function, and the c-BTX recipe
seeded from an imported Llama runs end to end (heavy)."""

import importlib.util
import os

import ml_collections
import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from hf_fixtures import make_hf_bitnet, make_hf_model  # noqa: E402

import voltron_jax  # noqa: E402
from voltron_jax import config as cfglib  # noqa: E402
from voltron_jax import recipe, train  # noqa: E402
from voltron_jax.data import vocab as vocab_lib  # noqa: E402
from voltron_jax.errors import ConfigError  # noqa: E402
from voltron_jax.interop import hf_import  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hf_nll(model, ids: list[int]) -> np.ndarray:
    """transformers' per-token NLL of ids[1:] given the ids before (ids[0] is BOS)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return (torch.logsumexp(logits, -1) - logits[torch.arange(len(ids) - 1), ids[1:]]).numpy()


def test_tokenizers_vocabulary_keeps_the_checkpoint_ids(tmp_path):
    make_hf_model("llama", str(tmp_path))
    v = vocab_lib.TokenizersVocabulary(str(tmp_path))
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "def add(a, b):\n    return a + b  # ünïcode\n"
    assert v.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert v.decode(v.encode(text)) == text
    # the boundary id is BOS (what the checkpoint saw first in every document); its EOS stays known
    assert (v.eos_id, v.hf_eos_id, v.unk_id, v.vocab_size) == (1, 2, 0, len(ref))
    import tensorflow as tf

    assert v.encode_tf(tf.constant(text)).numpy().tolist() == v.encode(text)
    assert vocab_lib.vocab_fingerprint(v).startswith("tok-")
    with pytest.raises(vocab_lib.corpus.DataError, match="no tokenizer.json"):
        vocab_lib.TokenizersVocabulary(str(tmp_path / "missing"))


def _seed_only_config(path: str) -> ml_collections.ConfigDict:
    c = cfglib.get_default()
    c.data.seq_len, c.data.batch_size = 32, 8
    hf_import.configure(c, path)
    c.train.eval_batches, c.train.log_every = 1, 1
    c.schedule.warmup = 0
    c.recipe = ml_collections.ConfigDict()
    c.recipe.seed = cfglib.phase(0, init_from=[f"hf:{path}"])
    return c


@pytest.mark.parametrize("kind", ["llama", "bitnet"])
def test_a_phase_starts_from_the_hf_checkpoint_and_scores_like_transformers(kind, tmp_path):
    hf_dir = str(tmp_path / "hf")
    hf = make_hf_bitnet(hf_dir) if kind == "bitnet" else make_hf_model(kind, hf_dir)
    c = _seed_only_config(hf_dir)
    cfglib.validate(c)
    assert (c.model.linear, c.model.mlp.activation) == (
        ("bitlinear", "relu2") if kind == "bitnet" else ("dense", "silu")
    )
    assert recipe.parents(c.recipe.seed) == [] and recipe.hf_source(c.recipe.seed) == hf_dir
    assert c.data.vocab == "tokenizers" and c.model.n_kv_heads == 2
    train.run(c, str(tmp_path / "run"))
    lm = voltron_jax.load(str(tmp_path / "run"))
    _, imported = hf_import.load(hf_dir)
    import jax

    for a, b in zip(jax.tree.leaves(lm.params), jax.tree.leaves(imported), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # the 0-step phase saved the imported weights
    text = "class Stack:\n    def push(self, x):"
    ids = lm.encode(text)
    np.testing.assert_allclose(lm.score(text), _hf_nll(hf, [1, *ids]), atol=1e-4, rtol=0)


def test_hf_init_errors(tmp_path):
    hf_dir = str(tmp_path / "hf")
    make_hf_model("llama", hf_dir)
    c = _seed_only_config(hf_dir)
    c.recipe.seed.init.from_ = f"hf:{tmp_path}/nothing"
    cfglib.validate(c)  # the folder is read when the phase starts (a finished phase no longer needs it)
    with pytest.raises(ConfigError, match="nothing' is not a folder; pass a Hugging Face checkpoint"):
        train.run(c, str(tmp_path / "run"))
    c.recipe.a = cfglib.phase(1)
    c.recipe.seed = cfglib.phase(0, init_from=[f"hf:{hf_dir}", "a"])
    with pytest.raises(ConfigError, match="initialises a phase alone"):
        cfglib.validate(c)


def _load_config(path: str, arg: str):
    spec = importlib.util.spec_from_file_location("cbtx_hf", os.path.join(ROOT, "configs", "cbtx_hf.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def test_cbtx_hf_config_builds_and_validates(tmp_path):
    make_hf_model("llama", str(tmp_path))
    for arg in (str(tmp_path), f"{tmp_path},test"):
        c = _load_config(str(tmp_path), arg)
        cfglib.validate(c)
        assert c.model.d_model == 32 and c.model.rope_theta == 50000.0 and c.data.vocab == "tokenizers"
        assert recipe.hf_source(c.recipe.seed) == str(tmp_path)
    with pytest.raises(ValueError, match="one Hugging Face checkpoint folder"):
        _load_config(str(tmp_path), "test")


@pytest.mark.heavy
def test_cbtx_recipe_seeded_from_an_imported_llama_runs_end_to_end(tmp_path):
    hf_dir = str(tmp_path / "hf")
    make_hf_model("llama", hf_dir)
    c = _load_config(hf_dir, f"{hf_dir},test")
    c.data.n_clusters = 2
    c.model.moe.n_experts = c.model.moa.n_experts = 2
    c.recipe.branch.fan_out = 2
    c.data.cache_dir = str(tmp_path / "cache")
    train.run(c, str(tmp_path / "run"))
    lm = voltron_jax.load(str(tmp_path / "run"))
    assert lm.config.model.ffn == "moe" and lm.config.model.attention == "moa"
    assert lm.config.model.moe.n_experts == 2 and lm.params["embed"]["embedding"].shape == (320, 32)
    out = lm.generate("def add(", max_new_tokens=4, temperature=0.0)
    assert isinstance(out, str)
