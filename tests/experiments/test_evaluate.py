"""voltron_jax.experiments.evaluate: a finished run's final checkpoint re-evaluated on N fixed validation
batches."""

import json

import numpy as np
import pytest

from configs import tiny
from voltron_jax import train
from voltron_jax.experiments import claims, evaluate


@pytest.mark.slow
def test_reevaluation_reproduces_the_loops_final_validation_loss(tmp_path):
    c = tiny.get_config("test")
    c.recipe.stable.steps, c.recipe.decay.steps = 4, 2
    train.run(c, str(tmp_path / "run"))
    last_eval = [
        r
        for r in map(json.loads, (tmp_path / "run" / "01_decay" / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "eval"
    ][-1]
    r = evaluate.evaluate_run(str(tmp_path / "run"), c.train.eval_batches)
    assert (r["phase"], r["step"]) == ("decay", 6)
    assert r["loss"] == pytest.approx(last_eval["loss"], rel=1e-6)
    assert r["tokens"] == c.train.eval_batches * c.data.batch_size * c.data.seq_len
    bigger = evaluate.evaluate_run(str(tmp_path / "run"), 4 * c.train.eval_batches)
    assert bigger["tokens"] == 4 * r["tokens"] and bigger["loss"] != r["loss"]


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(evaluate.EvalError, match="no config.json"):
        evaluate.evaluate_run(str(tmp_path), 4)


def test_batch_fingerprint_is_equal_only_for_equal_tokens():
    a = {"inputs": np.arange(12).reshape(3, 4), "weights": np.ones((3, 4), np.float32)}
    b = {"inputs": np.arange(12).reshape(3, 4), "weights": np.ones((3, 4), np.float32)}
    c = {"inputs": np.arange(12).reshape(3, 4) + (np.arange(12).reshape(3, 4) == 11), "weights": a["weights"]}
    assert evaluate.batch_fingerprint(a) == evaluate.batch_fingerprint(b) != evaluate.batch_fingerprint(c)
    masked = {**a, "weights": np.zeros((3, 4), np.float32)}
    assert evaluate.batch_fingerprint(masked) != evaluate.batch_fingerprint(a)
    assert len(evaluate.row_fingerprints(a)) == 3
    assert claims.batch_fingerprint(a, prefix=128) != claims.batch_fingerprint(a)  # c-BTM suffix scoring


@pytest.mark.slow
def test_per_batch_scores_pair_two_seeds_on_the_same_tokens(tmp_path):
    """Two seeds of a run are scored on the same fixed batches (equal fingerprints); the batch mean of the
    per-batch losses is the run's loss (every batch has the same number of scored tokens)."""
    out = {}
    for seed in (0, 1):
        c = tiny.get_config("test")
        c.recipe.stable.steps, c.recipe.decay.steps, c.seed = 2, 1, seed
        train.run(c, str(tmp_path / f"s{seed}"))
        out[seed] = evaluate.evaluate_run(str(tmp_path / f"s{seed}"), 6, per_batch=True)
    assert len(out[0]["batches"]) == 6 and sorted(out[0]["batches"]) == sorted(out[1]["batches"])
    assert out[0]["batches"] != out[1]["batches"]  # different models, same tokens
    assert np.mean(list(out[0]["batches"].values())) == pytest.approx(out[0]["loss"], rel=1e-5)
    assert 1 <= out[0]["distinct_rows"] <= 6 * c.data.batch_size
