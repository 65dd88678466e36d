"""The lm-evaluation-harness model 'voltron': its loglikelihoods are `Model.score`'s, and local k-shot
tasks (multiple choice and generation, task YAMLs over JSONL files written here; no network) run end to
end through lm_eval's python API and `python -m voltron_jax.experiments.evaluate --tasks=...` with the
accuracy a constructed model predicts."""

import json
import os
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf_datasets_"))
pytest.importorskip("lm_eval")

from etils import epath  # noqa: E402

from voltron_jax import config as cfglib  # noqa: E402
from voltron_jax.inference import api  # noqa: E402
from voltron_jax.interop import lm_eval_adapter  # noqa: E402
from voltron_jax.models import decoder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B = lambda ch: ord(ch) + 3  # noqa: E731  byte vocabulary id of a character


class Req:  # the one attribute of lm_eval's Instance the model reads
    def __init__(self, *args):
        self.args = args


def tiny_config(**model):
    c = cfglib.get_default()
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.init_std = 32, 2, 4, 2, 48, 0.3
    m.update(model)
    c.data.seq_len = 32
    return cfglib.validate(c)


def random_model(seed=0) -> api.Model:
    c = tiny_config()
    params = decoder.build_model(c.model).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    return api.Model(c, nn.unbox(params), epath.Path("/nonexistent"), 0)


def parity_model() -> api.Model:
    """A bigram model built by hand: attention and FFN outputs are zero, so logits(next | x) =
    head(norm(embed(x))). After an even digit 'E' has logit +sqrt(D) and 'O' -sqrt(D) (odd: the reverse);
    after 'E' or 'O' a newline is likely; every other token predicts uniformly."""
    c = tiny_config(n_layers=1)
    p = jax.tree.map(
        np.asarray,
        nn.unbox(
            decoder.build_model(c.model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        ),
    )
    p = jax.tree.map(np.zeros_like, p)
    p["final_norm"]["scale"][:] = 1.0
    emb, head = p["embed"]["embedding"], p["lm_head"]["kernel"]
    for d in range(10):
        emb[B(str(d)), 0] = 1.0 if d % 2 == 0 else -1.0
    emb[B("E"), 1] = emb[B("O"), 1] = 1.0
    head[0, B("E")], head[0, B("O")], head[1, B("\n")] = 1.0, -1.0, 1.0
    return api.Model(c, p, epath.Path("/nonexistent"), 0)


def test_loglikelihoods_equal_the_models_score():
    lm = random_model()
    adapter = lm_eval_adapter.VoltronLM(model=lm, batch_size=2, max_length=64)
    pairs = [("def f(x):", " return x"), ("import", " os\n"), ("a", "bcdefghij"), ("", "xyz")]
    got = adapter.loglikelihood([Req(*p) for p in pairs])
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        nll = lm.score(ctx + cont)
        np.testing.assert_allclose(ll, -float(np.sum(nll[len(lm.encode(ctx)) :])), atol=1e-4, rtol=0)
    texts = ["the quick brown fox jumps over", "x"]
    rolling = adapter.loglikelihood_rolling([Req(t) for t in texts])
    for t, ll in zip(texts, rolling, strict=True):
        np.testing.assert_allclose(ll, -float(np.sum(lm.score(t))), atol=1e-4, rtol=0)
    # windows of 8 tokens: less context per token, a different (finite) total over the same tokens
    short = lm_eval_adapter.VoltronLM(model=lm, batch_size=3, max_length=8)
    (windowed,) = short.loglikelihood_rolling([Req(texts[0])])
    assert np.isfinite(windowed) and abs(windowed - rolling[0]) > 1e-3
    # greedy flags: the parity model's argmax after '4' is 'E'
    (ll_e, greedy_e), (ll_o, greedy_o) = lm_eval_adapter.VoltronLM(model=parity_model()).loglikelihood(
        [Req("Parity of 4", "E"), Req("Parity of 4", "O")]
    )
    assert greedy_e and not greedy_o and ll_e > ll_o


def test_generate_until_uses_the_kv_cache_and_stops():
    lm = parity_model()
    assert lm.decode_model is not None  # the KV-cache path
    adapter = lm_eval_adapter.VoltronLM(model=lm, batch_size=2)
    kw = {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}
    out = adapter.generate_until([Req(f"Parity of {n}", kw) for n in (3, 8, 5)])
    assert out == ["O", "E", "O"]
    ref = lm.generate("Parity of 3", max_new_tokens=5, temperature=0.0)
    assert ref.startswith("O\n")


def test_generation_stops_at_extra_stop_ids():
    """stop_ids (an imported tokenizer's own EOS, when the boundary id is its BOS) end a row as EOS does."""
    from voltron_jax.inference import generate

    lm = parity_model()
    args = (lm.decode_model, lm.train_model, lm.params, [[B(c) for c in "Parity of 4"]], 5)
    assert generate.generate_ids(*args, temperature=0.0)[0][:2] == [B("E"), B("\n")]
    assert generate.generate_ids(*args, temperature=0.0, stop_ids=[B("\n")]) == [[B("E")]]


# labels: parity of n, except two mislabelled test documents -> the parity model scores exactly 0.8
TEST_DOCS = [dict(n=n, label=n % 2 if n not in (2, 7) else 1 - n % 2) for n in range(10)]
TRAIN_DOCS = [dict(n=n, label=n % 2) for n in range(10, 20)]


def write_tasks(folder) -> str:
    folder = str(folder)
    for split, docs in (("train", TRAIN_DOCS), ("test", TEST_DOCS)):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for d in docs:
                f.write(json.dumps(dict(d, answer="EO"[d["label"]])) + "\n")
    common = dict(
        dataset_path="json",
        dataset_kwargs={"data_files": {s: os.path.join(folder, f"{s}.jsonl") for s in ("train", "test")}},
        training_split="train",
        test_split="test",
        fewshot_split="train",
        doc_to_text="Parity of {{n}}",
        target_delimiter="",
        fewshot_delimiter="\n\n",
    )
    mc = dict(
        common,
        task="parity_mc",
        output_type="multiple_choice",
        doc_to_choice=["E", "O"],
        doc_to_target="label",
        metric_list=[{"metric": "acc"}],
    )
    gen = dict(
        common,
        task="parity_gen",
        output_type="generate_until",
        doc_to_target="answer",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
        metric_list=[{"metric": "exact_match"}],
    )
    for t in (mc, gen):
        with open(os.path.join(folder, f"{t['task']}.yaml"), "w") as f:
            json.dump(t, f)  # JSON is YAML
    return folder


def test_local_k_shot_tasks_score_what_the_model_predicts(tmp_path):
    tasks = write_tasks(tmp_path)
    res = lm_eval_adapter.run_tasks(
        parity_model(), ["parity_mc", "parity_gen"], num_fewshot=2, include_path=tasks, batch_size=4
    )
    assert res["parity_mc"]["acc,none"] == pytest.approx(0.8)
    assert res["parity_gen"]["exact_match,none"] == pytest.approx(0.8)


@pytest.mark.heavy  # a training run plus a subprocess (about 50 s here): make test-heavy
def test_evaluate_cli_runs_harness_tasks(tmp_path):
    """The short form over a real run: an exported parity model imported as a 0-step phase."""
    import ml_collections

    from voltron_jax import train
    from voltron_jax.interop import hf_export

    pytest.importorskip("transformers")
    lm = parity_model()
    hf_dir = hf_export.export(lm.params, lm.config, str(tmp_path / "hf"))
    c = cfglib.get_default()
    c.data.seq_len, c.data.batch_size = 32, 8
    from voltron_jax.interop import hf_import

    hf_import.configure(c, hf_dir)
    c.train.eval_batches, c.schedule.warmup = 1, 0
    c.recipe = ml_collections.ConfigDict(dict(seed=cfglib.phase(0, init_from=[f"hf:{hf_dir}"])))
    train.run(c, str(tmp_path / "run"))
    tasks = write_tasks(tmp_path)
    out_json = tmp_path / "out.jsonl"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    cmd = [
        sys.executable,
        "-m",
        "voltron_jax.experiments.evaluate",
        f"--workdir={tmp_path / 'run'}",
        "--tasks=parity_mc,parity_gen",
        "--num_fewshot=1",
        f"--include_path={tasks}",
        f"--json={out_json}",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parity_mc" in r.stdout and "acc,none 0.8000" in r.stdout, r.stdout
    rec = json.loads(out_json.read_text().splitlines()[-1])
    assert rec["tasks"]["parity_gen"]["exact_match,none"] == pytest.approx(0.8)
    # lm_eval's own command line, with the model registered
    harness = [sys.executable, "-m", "voltron_jax.interop.lm_eval_adapter", "run", "--model", "voltron"]
    harness += ["--model_args", f"workdir={tmp_path / 'run'}", "--tasks", "parity_mc", "--num_fewshot", "1"]
    harness += ["--include_path", tasks, "--batch_size", "4"]
    r = subprocess.run(harness, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parity_mc" in r.stdout and "0.8" in r.stdout, r.stdout


@pytest.mark.slow  # a subprocess that imports jax, lm_eval and the datasets stack: about 30 s here
def test_voltron_lm_eval_console_script_runs_a_local_task(tmp_path):
    """`voltron-lm-eval` is `lm_eval` with 'voltron' registered: same arguments, a local 2-shot task over a
    checkpoint of the parity model scores the predicted 0.8. (Plain `lm_eval --model voltron` cannot find
    the model: lm_eval reads no entry points, see lm_eval_adapter.main.)"""
    from voltron_jax.run import checkpoint

    lm = parity_model()
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(0, {"params": lm.params}, {}, {"config": lm.config.to_dict()})
    tasks = write_tasks(tmp_path)
    script = os.path.join(os.path.dirname(sys.executable), "voltron-lm-eval")
    assert os.path.exists(script), "console script missing: run make install (setup.py entry_points)"
    cmd = [script, "--model", "voltron", "--model_args", f"workdir={tmp_path / 'ckpt'}", "--batch_size", "4"]
    cmd += ["--tasks", "parity_mc", "--num_fewshot", "2", "--include_path", tasks]
    cmd += ["--output_path", str(tmp_path / "results")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (result,) = list((tmp_path / "results").rglob("results_*.json"))
    assert json.loads(result.read_text())["results"]["parity_mc"]["acc,none"] == pytest.approx(0.8)
