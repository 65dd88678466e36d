"""voltron_jax.experiments.evaluate: a finished run's final checkpoint re-evaluated on N fixed validation
batches."""

import json

import pytest

from configs import tiny
from voltron_jax import train
from voltron_jax.experiments import evaluate


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
