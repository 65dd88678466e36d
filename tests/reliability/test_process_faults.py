"""Issue 16 items 1, 3 and 6 with real processes and real signals: `python -m voltron_jax.main` on the
tiny test config, killed with -9 or SIGTERM, run twice on one workdir, resumed over a damaged newest
checkpoint. Each test asserts the one-line message and that no committed checkpoint, metric line or
config file was lost or overwritten. Slow: each starts two or three training processes."""

import signal
import time

import pytest

from tests.reliability.common import committed, event_steps, finish, line_with, records, start, wait_for
from voltron_jax.run import runlock

pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # multi-process end-to-end runs: make test-heavy
LONG = [  # long enough to be caught mid-run; nothing garbage-collected, so every committed step is checked
    "--config.recipe.stable.steps=60",
    "--config.train.ckpt_every=10",
    "--config.train.keep=100",
    "--config.train.eval_every=1000",
]


def _locks(workdir):
    return sorted(p.name for p in workdir.glob("run*.lock"))


def _train_steps(phase):
    return [r["step"] for r in records(phase) if r["kind"] == "train"]


def _snapshot(workdir):
    phase = workdir / "00_stable"
    return {
        "config": (workdir / "config.json").read_bytes(),
        "ckpt": committed(phase / "ckpt"),
        "records": records(phase) if (phase / "metrics.jsonl").exists() else [],
    }


def _assert_nothing_lost(before, workdir, resumed_at):
    phase = workdir / "00_stable"
    assert (workdir / "config.json").read_bytes() == before["config"]
    after = committed(phase / "ckpt")
    for step, mtime in before["ckpt"].items():  # still committed, not rewritten
        assert after.get(step) == mtime, f"committed step {step} lost or overwritten"
    kept = [r for r in records(phase) if r["step"] <= resumed_at]
    assert kept == [r for r in before["records"] if r["step"] <= resumed_at]
    steps = _train_steps(phase)
    assert steps == sorted(set(steps)), "duplicated or out-of-order metric lines"
    tb = [s for tag, s in event_steps(phase / "tb") if tag == "train/loss"]
    assert sorted(tb) == steps, "TensorBoard holds another curve than metrics.jsonl"


def _resumed_at(out):
    return int(line_with(out, "resumed at step").split("resumed at step ")[1].split("/")[0])


def test_kill_9_mid_run_resumes_with_one_curve_and_takes_over_the_stale_lock(tmp_path):
    phase = tmp_path / "00_stable"
    run = start(tmp_path, *LONG)

    def past_a_checkpoint():
        done = committed(phase / "ckpt")
        return done and (phase / "metrics.jsonl").exists() and max(_train_steps(phase)) > max(done) + 2

    wait_for(past_a_checkpoint, what="a run 2 steps past a checkpoint")
    run.send_signal(signal.SIGKILL)
    run.wait()
    before = _snapshot(tmp_path)
    last = max(before["ckpt"])
    assert max(r["step"] for r in before["records"]) > last  # the lines a naive resume would duplicate
    assert _locks(tmp_path) == [runlock.lock_name("stable")]  # kill -9 leaves the lock (of --only_phase)

    code, out = finish(start(tmp_path, *LONG))  # the same command
    assert code == 0, out[-3000:]
    assert f"pid {run.pid}" in line_with(out, "taking over the stale lock")
    assert _resumed_at(out) == last
    _assert_nothing_lost(before, tmp_path, last)
    assert _train_steps(phase) == list(range(1, 61))
    assert _locks(tmp_path) == []


def test_second_run_refuses_while_the_first_trains_and_sigterm_releases(tmp_path):
    phase = tmp_path / "00_stable"
    endless = ["--config.recipe.stable.steps=100000", "--config.train.ckpt_every=1000"]  # SIGTERM ends it
    first = start(tmp_path, *endless)
    wait_for(lambda: (phase / "metrics.jsonl").exists(), what="the first run to train")
    t0 = time.time()
    code, out = finish(start(tmp_path, *endless))
    line = line_with(out, "is in use by another run")
    assert code != 0 and f"pid {first.pid}" in line and "started" in line
    assert first.poll() is None, "the second run disturbed the first"
    assert time.time() - t0 < 120
    first.send_signal(signal.SIGTERM)  # the first run saves and stops; its lock goes with it
    code, out = finish(first)
    assert code != 0 and "preempted: saved step" in out
    assert _locks(tmp_path) == []
    steps = _train_steps(phase)
    assert steps == list(range(1, len(steps) + 1))  # one run's lines only, none interleaved
    assert max(committed(phase / "ckpt")) == steps[-1]


def test_damaged_latest_checkpoint_falls_back_and_is_moved_aside(tmp_path):
    phase = tmp_path / "00_stable"
    args = ["--config.train.ckpt_every=4", "--config.train.keep=10"]
    code, out = finish(start(tmp_path, *args))
    assert code == 0, out[-3000:]
    assert sorted(committed(phase / "ckpt")) == [4, 8]
    before = _snapshot(tmp_path)
    before["ckpt"].pop(8)  # it is the damaged one: moved aside, then written again
    victim = phase / "ckpt" / "8"
    for f in [p for p in victim.rglob("*") if p.is_file() and p.parent.name == "d"]:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated array files
    damaged = {p.relative_to(victim): p.read_bytes() for p in victim.rglob("*") if p.is_file()}

    code, out = finish(start(tmp_path, *args))
    assert code == 0, out[-3000:]
    line = line_with(out, "is damaged")
    (moved,) = [p for p in (phase / "ckpt").iterdir() if p.name.startswith("8.damaged-")]
    assert str(victim) in line and moved.name in line and "restored step 4" in line
    assert {p.relative_to(moved): p.read_bytes() for p in moved.rglob("*") if p.is_file()} == damaged
    assert _resumed_at(out) == 4
    _assert_nothing_lost(before, tmp_path, 4)
    assert sorted(committed(phase / "ckpt")) == [4, 8] and _train_steps(phase) == list(range(1, 9))
