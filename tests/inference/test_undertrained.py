"""Generating from an undertrained model says so: one line with the validation loss and what it means."""

import json
import math
import warnings

import pytest

from configs import tiny
from voltron_jax import train
from voltron_jax.inference import api
from voltron_jax.run import checkpoint


def test_hint_for_blank_output_or_a_high_loss_only():
    hint = api.undertrained_hint(["  \n ", "\n"], 2.8, 259)
    assert hint.startswith("the generated text is only whitespace; ")
    assert "2.80 nats/token" in hint and "perplexity 16.4" in hint and f"{math.log(259):.2f}" in hint
    assert "\n" not in hint
    assert api.undertrained_hint(["def f(x):"], 2.8, 259).startswith(
        "this checkpoint's validation loss is 2.80"
    )
    assert api.undertrained_hint(["def f(x):"], 1.9, 259) == ""  # a trained byte model: nothing to say
    assert api.undertrained_hint(["   "], 1.9, 259).startswith("the generated text is only whitespace")
    assert "no validation loss" in api.undertrained_hint([" "], None, 259)
    assert api.undertrained_hint(["text"], None, 259) == ""


def test_validation_loss_is_the_last_eval_at_or_before_the_checkpoint(tmp_path):
    recs = [
        {"kind": "train", "step": 2, "loss": 5.0},
        {"kind": "eval", "step": 2, "loss": 4.0},
        {"kind": "eval", "step": 4, "loss": 3.0},
        {"kind": "eval", "step": 6, "loss": 2.0},  # after the checkpoint: not its loss
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert api.checkpoint_validation_loss(tmp_path / "ckpt", 4) == 3.0
    assert api.checkpoint_validation_loss(tmp_path / "none" / "ckpt", 4) is None


def test_generate_from_an_untrained_checkpoint_warns_with_its_loss(tmp_path):
    c = tiny.get_config("test")
    c.model.d_model, c.model.d_ff, c.data.seq_len = 32, 64, 32
    phase = tmp_path / "00_stable"
    rt = train.Runtime(train.Phase("stable", None, c, phase, 1, 1))
    with checkpoint.Checkpointer(phase / "ckpt", async_save=False) as ck:
        ck.save(1, rt.scratch(), {"step": 1}, {"config": c.to_dict()}, force=True)
    (phase / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 1, "loss": 5.5}) + "\n")
    lm = api.load(str(tmp_path))
    with pytest.warns(api.UndertrainedWarning, match=r"validation loss is 5\.50 nats/token"):
        lm.generate("def f(", max_new_tokens=4, temperature=0.0)
    (phase / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 1, "loss": 1.5}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", api.UndertrainedWarning)
        out = lm.generate("def f(", max_new_tokens=4, temperature=0.0)
    assert isinstance(out, str)
