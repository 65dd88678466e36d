"""Input prefetch in the train loop (voltron_jax/data/prefetch.py): a run killed while the prefetch thread
was batches ahead resumes bit-exactly, because checkpoints hold the data state of the batches consumed."""

import json
import threading

import pytest

from configs import tiny
from voltron_jax import train
from voltron_jax.run import checkpoint


def _config(prefetch):
    c = tiny.get_config("test")
    c.train.log_every, c.train.ckpt_every, c.train.async_save = 1, 2, False
    c.train.eval_every, c.train.prefetch = 1000, prefetch
    c.recipe.stable.steps = 6
    c.recipe.decay.steps, c.recipe.decay.stage = 0, "stable"
    return c


def _losses(workdir):
    recs = [json.loads(x) for x in (workdir / "00_stable" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


class Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_after_a_kill_with_prefetch_is_exact(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    train.run(_config(prefetch=0), str(ref))  # uninterrupted, no prefetch

    def kill(self, step):
        if step == 5:  # after the checkpoint of step 4, with batches 5.. already drawn by the thread
            raise Killed
        return False

    monkeypatch.setattr(checkpoint.PreemptionGuard, "should_stop", kill)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train.run(_config(prefetch=3), str(run))
    assert not [t for t in threading.enumerate() if t.name == "voltron-prefetch"]  # stopped on the error
    ck = checkpoint.Checkpointer(run / "00_stable" / "ckpt")
    _, data_state, _ = ck.restore()
    ck.close()
    assert data_state["step"] == 4  # the batches trained on, not the ones prefetched
    monkeypatch.undo()
    train.run(_config(prefetch=3), str(run))
    got, want = _losses(run), _losses(ref)
    assert sorted(got) == list(range(1, 7))
    assert got == want  # bit-exact on CPU, before and after the resume, prefetch on vs off
