"""voltron_jax.load / generate / score: light import, exact restore, cached decode == full forward, errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import voltron_jax
from configs import tiny
from voltron_jax import train
from voltron_jax.inference import api, generate
from voltron_jax.models import decoder
from voltron_jax.run import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**model):
    c = tiny.get_config("test")
    c.model.d_model, c.model.d_ff, c.data.seq_len = 32, 64, 32
    for key, value in model.items():
        section, _, field = key.rpartition(".")
        (c.model[section] if section else c.model)[field] = value
    return c


def _save(directory, c, seed: int, step: int):
    """A real train checkpoint (TrainState with optimizer state, data state, meta) of config c."""
    c.seed = seed
    rt = train.Runtime(train.Phase("stable", None, c, directory, step, 1))
    state = rt.scratch()
    with checkpoint.Checkpointer(directory / "ckpt", async_save=False) as ck:
        ck.save(step, state, {"step": step}, {"config": c.to_dict()}, force=True)
    return jax.device_get(state.params)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    c = _config()
    first = _save(root / "00_stable", c, seed=1, step=4)
    last = _save(root / "01_decay", c, seed=2, step=6)
    return root, c, first, last


def _snapshot(path):
    return sorted((p, os.path.getmtime(p)) for p in map(str, path.rglob("*")))


def test_import_is_light():
    code = (
        "import sys, voltron_jax; print(sorted(m for m in ('jax', 'flax', 'orbax', 'tensorflow', 'seqio') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_load_picks_the_last_phase_and_restores_exact_params(run):
    root, c, first, last = run
    lm = voltron_jax.load(str(root))
    assert lm.path.parent.name == "01_decay" and lm.step == 6
    assert lm.config.model.to_dict() == c.model.to_dict()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(lm.params), last)
    ckpt = root / "00_stable" / "ckpt"
    for path, step in ((root / "00_stable", None), (ckpt, 4), (ckpt / "4", None)):
        lm = voltron_jax.load(str(path), step)
        assert lm.step == 4
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(lm.params), first)
    assert jax.tree.leaves(lm.params)[0].devices() == {jax.local_devices()[0]}  # one device, any host


def test_load_takes_a_relative_path(run, monkeypatch):
    root, c, first, last = run
    monkeypatch.chdir(root.parent)
    lm = voltron_jax.load(root.name)  # as a notebook beside its runs would: load("demo")
    assert lm.step == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(lm.params), last)


@pytest.mark.slow
def test_generate_and_score_through_the_handle(run):
    root, c, _, _ = run
    lm = voltron_jax.load(str(root))
    out = lm.generate(["def f(", "x"], max_new_tokens=6, temperature=0.0)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    assert lm.generate("def f(", max_new_tokens=6, temperature=0.0) == out[0]  # batch-independent
    a = lm.generate("x", max_new_tokens=6, temperature=1.0, top_k=20, seed=3)
    assert a == lm.generate("x", max_new_tokens=6, temperature=1.0, top_k=20, seed=3)  # seeded
    nll = lm.score("import os\n")
    assert nll.shape == (len("import os\n"),) and np.all(nll > 0)
    # the per-token losses are the training loss: their mean is train.cross_entropy on the same row
    ids = [1, *lm.encode("import os\n")]
    logits = jax.jit(lm.train_model.apply)({"params": lm.params}, jnp.asarray([ids[:-1]]))
    ce, _ = train.cross_entropy(logits, jnp.asarray([ids[1:]]), jnp.ones((1, len(ids) - 1)))
    np.testing.assert_allclose(nll.mean(), float(ce), rtol=1e-5)


SLOT_SETS = {
    "dense": {},
    "infini_bitnet_denseformer_moe_moa": {
        "memory": "infini",
        "infini.segment_len": 8,
        "linear": "bitlinear",
        "residual": "denseformer",
        "ffn": "moe",
        "moe.impl": "dense",
        "attention": "moa",
        "moa.impl": "dense",
    },
    "mod_causal": {"routing": "mod", "mod.route_by": "causal", "mod.capacity": 0.5, "n_layers": 4},
}


@pytest.mark.slow
@pytest.mark.parametrize("slots", SLOT_SETS.values(), ids=SLOT_SETS.keys())
def test_cached_decoding_equals_the_full_forward(slots):
    """Prefill of ragged prompts, then one token per step through the 'cache' collection, gives the same
    logits as the training forward over the whole sequence (teacher forcing)."""
    c = _config(**slots)
    full, dec = decoder.build_model(c.model), decoder.build_model(c.model, decode=True)
    params = jax.jit(full.init)(jax.random.key(0), jnp.zeros((1, c.data.seq_len), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    seqs = rng.integers(3, c.model.vocab_size, size=(2, 24)).astype(np.int32)
    lens = np.array([5, 11])  # ragged prompts, right-padded
    ref = jax.jit(full.apply)({"params": params}, jnp.asarray(seqs))  # [B,T,V]
    ids, valid = generate.pad_rows([s[:n] for s, n in zip(seqs, lens)], int(lens.max()))
    cache = generate.empty_cache(dec, params, (2, 24))
    cache, logits = generate._prefill(dec, params, cache, ids, valid)
    got = [logits]
    for i in range(6):
        tok = seqs[np.arange(2), lens + i]
        cache, logits = generate._step(dec, params, cache, jnp.asarray(tok), jnp.asarray(lens + i, jnp.int32))
        got.append(logits)
    want = [ref[np.arange(2), lens - 1 + i] for i in range(7)]
    np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_model_that_cannot_stream_is_sampled_by_recomputation():
    c = _config(routing="mod", memory="infini", **{"infini.segment_len": 8, "mod.capacity": 0.5})
    with pytest.raises(NotImplementedError):
        decoder.build_model(c.model, decode=True)
    full = decoder.build_model(c.model)
    params = jax.jit(full.init)(jax.random.key(0), jnp.zeros((1, c.data.seq_len), jnp.int32))["params"]
    out = generate.generate_ids(
        None,
        full,
        params,
        [[5, 6, 7], [8]],
        5,
        temperature=0.0,
        stop_at_eos=False,
        pad_multiple=c.data.seq_len,
    )
    assert [len(o) for o in out] == [5, 5]
    # greedy: the third id of each row is the argmax of the training forward over its prefix, whose
    # padding (valid=False) is neither a key nor routed
    rows = [[1, 5, 6, 7, *out[0][:2]], [1, 8, *out[1][:2]]]
    logits = generate._full_last(full, params, *generate.pad_rows(rows, c.data.seq_len))
    assert np.argmax(logits, axis=-1).tolist() == [out[0][2], out[1][2]]


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2))
    keys = jax.random.split(jax.random.key(0), 200)
    draw = lambda **kw: np.asarray(jax.jit(jax.vmap(lambda k: generate.sample_logits(logits, k, **kw)))(keys))
    assert (draw(temperature=0.0) == 0).all()
    assert (draw(temperature=5.0, top_k=1) == 0).all()
    assert (draw(top_p=0.4) == 0).all()  # the most likely id alone reaches 0.4
    assert set(np.unique(draw(top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(np.unique(draw(top_k=3))) == {0, 1, 2}
    assert set(np.unique(draw())) == {0, 1, 2, 3}


def test_byte_vocab_is_seqios_byte_mapping():
    v = api.ByteVocab()
    assert v.encode("hello") == [107, 104, 111, 111, 114]  # seqio.ByteVocabulary: byte + 3
    assert v.decode([1, *v.encode("héllo"), 0]) == "héllo"


def test_bad_input_gives_one_clear_error_and_writes_nothing(run, tmp_path):
    root, c, _, _ = run
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    before = _snapshot(tmp_path), _snapshot(root)
    with pytest.raises(api.LoadError, match="does not exist"):
        voltron_jax.load(str(tmp_path / "missing"))
    with pytest.raises(api.LoadError, match="not a checkpoint"):
        voltron_jax.load(str(tmp_path / "empty"))
    with pytest.raises(api.LoadError, match="is a file"):
        voltron_jax.load(str(tmp_path / "file.txt"))
    with pytest.raises(api.LoadError, match="available steps: \\[6\\]"):
        voltron_jax.load(str(root / "01_decay"), step=5)
    other = _config(d_model=48)
    with pytest.raises(
        api.LoadError, match="different architecture.*embedding.*\\(259, 48\\) vs checkpoint \\(259, 32\\)"
    ):
        voltron_jax.load(str(root), config=other)
    assert (_snapshot(tmp_path), _snapshot(root)) == before
