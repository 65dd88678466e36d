"""The full c-BTX recipe (every technique on) runs end to end in one invocation of the loop."""

import json

import pytest

from configs import recipe_tiny
from voltron_jax import train
from voltron_jax.run import checkpoint


@pytest.mark.slow
@pytest.mark.heavy  # minutes: make test-heavy
def test_recipe_runs_end_to_end_with_max_steps(tmp_path):
    c = recipe_tiny.get_config("test")
    c.max_steps = 2
    results = train.run(c, str(tmp_path))
    assert set(results) == {"stable", "mix", "moe_ft", *(f"branch/{i}" for i in range(8))}
    for label, r in results.items():
        assert r["perplexity"] > 1 and all(f"cluster_{j}/perplexity" in r for j in range(8)), label
    meta = checkpoint.Checkpointer(tmp_path / "03_moe_ft" / "ckpt").restore_meta()
    assert meta["config"]["model"]["ffn"] == "moe" and meta["config"]["model"]["attention"] == "moa"
    assert json.loads((tmp_path / "config.json").read_text())["model"]["linear"] == "bitlinear"
    assert "cluster_7" in (tmp_path / "report.md").read_text()
    # rerunning resumes: every phase is already finished, so nothing trains again
    again = train.run(c, str(tmp_path))
    assert again["moe_ft"]["loss"] == pytest.approx(results["moe_ft"]["loss"], rel=1e-6)
