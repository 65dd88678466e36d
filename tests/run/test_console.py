"""What a run prints: the start banner, a status line per long silent stretch, a first ETA that is a time;
and a finished workdir rerun answers "already complete" with the report, without compiling or evaluating."""

import os
import re
import subprocess
import sys
import time

import pytest

from voltron_jax.run import console
from voltron_jax.run import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(workdir, *extra):
    cmd = [
        sys.executable,
        "-m",
        "voltron_jax.main",
        "--config=configs/tiny.py:test",
        f"--workdir={workdir}",
        "--config.max_steps=2",
        "--config.train.log_every=1",
        *extra,
    ]
    t = time.time()
    out = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "VOLTRON_STATUS_AFTER": "0"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr, time.time() - t


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("console") / "run"
    text, _ = main(workdir)
    return workdir, text


@pytest.mark.slow
def test_banner_and_status_lines(finished_run):
    _, text = finished_run
    lines = text.splitlines()
    assert re.search(
        r"^\[run\] \d+ cpu device\(s\) \(.*\), 1 process\(es\); 2 phase\(s\), 4 steps$", text, re.M
    )
    for phase in ("stable", "decay"):
        # parameter count, FLOPs/token and mesh before the phase's first step
        assert re.search(
            rf"^\[{phase}\] [\d,]+ params \(.*\), \S+ FLOPs/token .*mesh data=\d+ x fsdp=1", text, re.M
        )
        # every silent stretch says what and how long (VOLTRON_STATUS_AFTER=0: however short)
        for what in (
            "preparing the training data",
            "preparing the validation data",
            "compiling the train step",
            "final evaluation",
            "finishing the last checkpoint save",
        ):
            assert re.search(rf"^\[{phase}\] {what} \.\.\.\n\[{phase}\] {what}: [\d.]+ s$", text, re.M), what
        etas = [ln for ln in lines if ln.startswith(f"[{phase}] step ")]
        assert etas and all("ETA ?" not in ln for ln in etas), etas
    assert re.search(r"^\[decay\] initialising from stable: [\d.]+ s$", text, re.M)
    assert "E0000" not in text and "cuInit" not in text


@pytest.mark.slow
def test_finished_workdir_reruns_without_work(finished_run):
    workdir, _ = finished_run
    files = {d: workdir_lib.metrics_file(d).read_text() for d in workdir_lib.run_dirs(workdir).values()}
    text, seconds = main(workdir)
    assert "already complete: all 2 phase(s) finished" in text
    assert "| stable | 2 |" in text and "| decay | 4 |" in text  # the report
    for word in ("compiling", "evaluation", "dropped", "step 1/2", "E0000"):
        assert word not in text, (word, text)
    # nothing was rerun: the metrics are as the run left them
    assert {d: workdir_lib.metrics_file(d).read_text() for d in files} == files
    print(f"rerun of a finished workdir: {seconds:.1f} s")


@pytest.mark.slow
def test_more_steps_is_not_complete(finished_run, tmp_path):
    from voltron_jax import config as config_lib
    from voltron_jax.run import complete

    workdir, _ = finished_run
    c = config_lib.load(os.path.join(ROOT, "configs/tiny.py:test"))
    c.max_steps, c.train.log_every = 2, 1  # the command line of finished_run
    assert set(complete.finished(c, workdir)) == {"stable", "decay"}
    assert set(complete.finished(c, workdir, only_phase="decay")) == {"decay"}
    c.max_steps = 3
    assert complete.finished(c, workdir) is None
    c.max_steps, c.optim.lr = 2, c.optim.lr / 2  # another config: the normal path records it
    assert complete.finished(c, workdir) is None
    assert complete.finished(c, tmp_path) is None


def test_stage_says_only_long_stretches(capsys):
    with console.Stage("p", "quick"):
        pass
    with console.Stage("p", "slow", after=0.01):
        time.sleep(0.1)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[p] slow ..." and re.fullmatch(r"\[p\] slow: 0\.\d s", out[1]) and len(out) == 2


@pytest.mark.slow
def test_a_final_checkpoint_changed_since_the_run_finished_is_not_complete(finished_run, tmp_path):
    """A damaged (or rewritten) final checkpoint sends the rerun the normal way, which restores with
    fallback and trains the lost steps again, instead of answering 'already complete'."""
    import shutil

    from voltron_jax import config as config_lib
    from voltron_jax.run import complete

    workdir, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)  # copytree keeps modification times: still complete
    c = config_lib.load(os.path.join(ROOT, "configs/tiny.py:test"))
    c.max_steps, c.train.log_every = 2, 1
    assert set(complete.finished(c, copy)) == {"stable", "decay"}
    final = workdir_lib.ckpt_dir(copy / "00_stable") / "2"
    victim = max((p for p in final.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    assert complete.finished(c, copy) is None
    assert set(complete.finished(c, copy, only_phase="decay")) == {"decay"}  # the other phase is intact
