"""Golden loss curves: the first 16 training losses of the tiny dense recipe and of each technique arm,
seed 0, on CPU through the real data path and the one loop, stored in tests/golden/curves.json.

A change that moves any of them by more than ATOL (nats) fails here, so a rewrite that shifts results
(the data order, a module's numerics, the optimizer) is noticed by `make test` and not by a later sweep.
When a change is meant to move them, regenerate the file and say so in the commit message:

    make golden        # = VOLTRON_UPDATE_GOLDEN=1 pytest tests/test_golden_curves.py (rewrites the file)
"""

import json
import os
import pathlib

import numpy as np
import pytest

from configs import tiny
from voltron_jax import config as cfglib
from voltron_jax import train

GOLDEN = pathlib.Path(__file__).parent / "golden" / "curves.json"
STEPS = 16
# fp32 on CPU is deterministic for a given XLA build and host (a rerun here repeats every digit); the
# tolerance leaves room for reordered reductions on another CPU's vector width, and is below what a real
# change moves: DenseFormer, which starts as the identity over depth, is already 2e-4 off the dense curve
# at step 3.
ATOL = 2e-4
UPDATE = os.environ.get("VOLTRON_UPDATE_GOLDEN") == "1"

ARMS = {
    "dense": {},
    "bitlinear": {"model.linear": "bitlinear"},
    "infini": {"model.memory": "infini", "model.infini.segment_len": 32},
    "denseformer": {"model.residual": "denseformer"},
    "mod": {"model.routing": "mod"},
    "moe_moa": {
        "model.ffn": "moe",
        "model.attention": "moa",
        "model.moe.n_experts": 4,
        "model.moa.n_experts": 4,
    },
    "icp": {"data.ordering": "icp", "data.n_clusters": 2},
}


def arm_config(overrides: dict):
    c = tiny.get_config("test")
    c.recipe.stable.steps = STEPS
    c.max_steps = STEPS
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 1, STEPS, STEPS
    return cfglib.apply_overrides(c, overrides)


def stable_curve(tmp_path, overrides: dict) -> list[float]:
    c = arm_config(overrides)
    train.run(c, str(tmp_path), only_phase="stable")
    lines = (tmp_path / "00_stable" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r["loss"] for r in records if "loss" in r and r.get("kind", "train") == "train"][:STEPS]


@pytest.mark.slow
@pytest.mark.parametrize("arm", sorted(ARMS))
def test_loss_curve_matches_the_golden_file(arm, tmp_path):
    curve = stable_curve(tmp_path, ARMS[arm])
    assert len(curve) == STEPS and all(np.isfinite(curve))
    if UPDATE:
        stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        stored[arm] = [round(x, 6) for x in curve]
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(dict(sorted(stored.items())), indent=1) + "\n")
        return
    golden = json.loads(GOLDEN.read_text())
    assert arm in golden, (
        f"no golden curve for {arm!r}: run `make golden` and commit tests/golden/curves.json"
    )
    diff = np.abs(np.asarray(curve) - np.asarray(golden[arm]))
    worst = int(np.argmax(diff))
    assert diff[worst] <= ATOL, (
        f"{arm}: the loss at step {worst + 1} moved {diff[worst]:.2e} nats (> {ATOL}) from the golden curve "
        f"({golden[arm][worst]:.6f} -> {curve[worst]:.6f}). If the change is meant to move results, run "
        "`make golden` and say so in the commit message."
    )
