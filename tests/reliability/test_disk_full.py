"""Issue 16 item 2 end to end: a real full disk (a 12 MiB tmpfs workdir, filled right after the step-4
checkpoint) makes the async save of step 8 fail; the run stops at the next step boundary, before the
step-12 save, with one line naming the path and the last committed step; the rerun resumes from step 4
with one metric curve. In process (the fault is the disk's, not the process's)."""

import json
import threading

import pytest

from configs import tiny
from tests.reliability.common import committed, small_disk, wait_for
from voltron_jax import train
from voltron_jax.data import pipeline
from voltron_jax.run import checkpoint


def _config():
    c = tiny.get_config("test")
    c.recipe.stable.steps = 16
    c.train.update(log_every=1, ckpt_every=4, eval_every=1000, eval_batches=1, keep=10, async_save=True)
    # The hooks below count and pause batches as the loop draws them; a prefetch thread would draw them
    # up to train.prefetch + 1 steps ahead of the step that trains, so the count would not be the step.
    c.train.prefetch = 0
    return c


def _saving() -> bool:
    return any(t.name == "save_finalize" and t.is_alive() for t in threading.enumerate())


@pytest.fixture
def disk(tmp_path):
    yield from small_disk(tmp_path / "disk", "12m")


@pytest.mark.slow  # two short training runs: ~45 s on a 2-core host
def test_disk_full_stops_at_the_next_step_and_resumes_from_the_last_commit(disk, monkeypatch, capsys):
    import os

    phase = disk / "00_stable"
    filler = disk / "filler"
    drawn = {"n": 0}
    orig = pipeline.make_train_iterator

    def make(*a, **kw):
        it = orig(*a, **kw)

        class Filling:  # fills the disk once step 4 is committed (before step 6 trains)
            def __next__(self):
                drawn["n"] += 1
                if drawn["n"] == 6 and not filler.exists():
                    wait_for(lambda: 4 in committed(phase / "ckpt"), timeout=60, what="step 4's commit")
                    st = os.statvfs(disk)
                    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 256 * 1024))
                if drawn["n"] == 10:  # the step-8 save (started after step 8) has failed by now
                    wait_for(lambda: not _saving(), timeout=60, what="step 8's save to end")
                return next(it)

            get_state, set_state = it.get_state, it.set_state

        return Filling()

    monkeypatch.setattr(pipeline, "make_train_iterator", make)
    with pytest.raises(checkpoint.SaveFailed) as e:
        train.run(_config(), str(disk), only_phase="stable")
    msg = str(e.value)
    assert "\n" not in msg and str(phase / "ckpt" / "8") in msg and "last committed step is 4" in msg
    assert "No space left on device" in msg
    assert drawn["n"] == 10, f"stopped after step {drawn['n']}, not at the first step after the failure"
    assert sorted(committed(phase / "ckpt")) == [4]
    before = [json.loads(x) for x in (phase / "metrics.jsonl").read_text().splitlines()]
    marker = committed(phase / "ckpt")[4]

    filler.unlink()  # space freed: the same command resumes from the last committed step
    capsys.readouterr()
    train.run(_config(), str(disk), only_phase="stable")
    assert "[stable] resumed at step 4/16" in capsys.readouterr().out
    after = [json.loads(x) for x in (phase / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in after if r["step"] <= 4] == [r for r in before if r["step"] <= 4]
    assert [r["step"] for r in after if r["kind"] == "train"] == list(range(1, 17))
    assert committed(phase / "ckpt")[4] == marker and sorted(committed(phase / "ckpt")) == [4, 8, 12, 16]
