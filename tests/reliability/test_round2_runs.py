"""Issue 29 groups 2, 3, 4, 5, 7 and 8 on the train loop and the sweep driver: a checkpoint is saved only
if it is good, every exit settles the save in flight, config.json is written only once the config has
proven itself, phases check their parents' identity, every phase's data spec is checked before the first
step, no loss is reported from no tokens, and a sweep survives a failing arm and forwards signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from etils import epath

from configs import tiny
from tests.reliability.common import ROOT, env
from voltron_jax import train
from voltron_jax.errors import ConfigError, UsageError
from voltron_jax.experiments import ablate
from voltron_jax.run import checkpoint, resume
from voltron_jax.run import workdir as wd


def _config(**kw):
    c = tiny.get_config("test")
    c.train.log_every, c.train.ckpt_every, c.train.eval_batches = 1, 2, 1
    for k, v in kw.items():
        *path, leaf = k.split(".")
        node = c
        for p in path:
            node = node[p]
        node[leaf] = v
    return c


def _stable(c, root):
    (ph,) = [p for p in train.phases(c, epath.Path(root)) if p.name == "stable"]
    return ph


# ------------------------------------------------------------------ 4: good checkpoints, settled saves


def test_a_diverging_update_is_never_saved_as_good(tmp_path):
    """lr=1e30: the loss of step 1 (before the update) is finite, the parameters after it give a
    non-finite loss. Before: step 1 was saved and called 'last good'; every rerun diverged again."""
    c = _config(**{"optim.lr": 1e30, "train.ckpt_every": 1, "train.async_save": True})
    with pytest.raises(train.NonFiniteLoss) as e:
        train.run(c, str(tmp_path), only_phase="stable")
    ck = checkpoint.Checkpointer(tmp_path / "00_stable" / "ckpt")
    for step in ck.all_steps():  # whatever is committed is good: finite, no exploded parameters
        state, _, _ = ck.restore(step)
        assert all(np.abs(np.asarray(x)).max() < 1e20 for x in jax.tree.leaves(state["params"]))
    if ck.latest_step() is None:
        assert "no checkpoint of this phase was saved yet" in str(e.value) and "None" not in str(e.value)
    else:
        assert f"step {ck.latest_step()}" in str(e.value)
    assert not [p for p in (tmp_path / "00_stable" / "ckpt").iterdir() if "tmp" in p.name]


def test_ctrl_c_right_after_an_async_save_started_commits_it(tmp_path, monkeypatch):
    def interrupt(self, step):
        if step == 2:  # save(2) has just started in the background
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(checkpoint.PreemptionGuard, "should_stop", interrupt)
    c = _config(**{"train.async_save": True})
    with pytest.raises(KeyboardInterrupt):
        train.run(c, str(tmp_path), only_phase="stable")
    folder = tmp_path / "00_stable" / "ckpt"
    # checked at once: the loop waited for the save before the interrupt left it
    assert checkpoint.Checkpointer(folder).all_steps() == [2]
    assert not [p for p in folder.iterdir() if "tmp" in p.name]


# ------------------------------------------------------------------ 5: config.json only once proven


def test_config_json_is_not_written_by_a_run_that_cannot_restore(tmp_path):
    """config.json removed; a run of another shape fails to restore the checkpoint and must not have
    written its config (which would then refuse the correct one)."""
    root = epath.Path(tmp_path)
    ph = _stable(_config(), root)
    with checkpoint.Checkpointer(wd.ckpt_dir(ph.directory), async_save=False) as ck:
        ck.save(2, {"params": {"w": np.ones(3, np.float32)}}, {}, {})  # not this model's tree
    with pytest.raises(checkpoint.CheckpointError):
        train.run(_config(), str(tmp_path), only_phase="stable")
    assert not wd.config_file(root).exists() and not wd.run_info_file(root).exists()


# ------------------------------------------------------------------ 7: no tokens, no loss


def test_evaluate_over_no_scored_tokens_reports_nan_not_zero(tmp_path):
    from voltron_jax.data import pipeline

    c = _config()
    rt = train.Runtime(_stable(c, tmp_path))
    (b,) = pipeline.make_eval_batches(c, "pretrain", 1)
    out = train.evaluate(rt, rt.scratch(), [{**b, "weights": np.zeros_like(b["weights"])}])
    assert np.isnan(out["loss"]) and np.isnan(out["perplexity"])


def test_collect_only_with_nothing_finished_fails(tmp_path):
    with pytest.raises(UsageError, match="nothing to collect"):
        ablate.main(["--config=configs/tiny.py:test", f"--workdir={tmp_path}", "--collect_only"])


# ------------------------------------------------------------------ 3: parents' identity


def _commit(folder, step):
    (folder / str(step)).mkdir(parents=True, exist_ok=True)
    (folder / str(step) / "commit_success.txt").write_text("ok")


def test_a_phase_refuses_unfinished_or_changed_parents(tmp_path):
    c = _config()  # stable (8 steps) -> decay (4)
    phases = train.phases(c, epath.Path(tmp_path))
    stable, decay = phases[0], phases[1]
    _commit(wd.ckpt_dir(stable.directory), 4)  # half-trained
    with pytest.raises(ConfigError, match="starts from stable, which is unfinished \\(step 4 of 8\\)"):
        train.parent_identity(c, phases, decay)
    _commit(wd.ckpt_dir(stable.directory), 8)
    assert train.parent_identity(c, phases, decay) == {
        "stable": {"step": 8, "ckpt": str(wd.ckpt_dir(stable.directory))}
    }
    # decay was built from stable at step 8; stable's steps are then raised to 12 and it trains on
    decay.directory.mkdir(parents=True)
    wd.write_json(wd.parents_file(decay.directory), train.parent_identity(c, phases, decay))
    train.check_parents(c, phases, decay)  # unchanged parents pass
    c2 = _config(**{"recipe.stable.steps": 12})
    phases2 = train.phases(c2, epath.Path(tmp_path))
    with pytest.raises(ConfigError, match="unfinished \\(step 8 of 12\\)"):
        train.check_parents(c2, phases2, phases2[1])
    _commit(wd.ckpt_dir(stable.directory), 12)
    with pytest.raises(ConfigError, match="stable step 8 -> 12.*move .*01_decay aside"):
        train.check_parents(c2, phases2, phases2[1])


def test_a_phase_whose_checkpoint_lies_before_its_start_is_refused(tmp_path):
    """A workdir from before parents.json: decay saved at global step 12 (stable 8 + 4); stable's steps
    are then raised to 16, so decay starts at 16 (before: 'resumed at step -4/4')."""
    c = _config(**{"recipe.stable.steps": 16})
    phases = train.phases(c, epath.Path(tmp_path))
    _commit(wd.ckpt_dir(phases[0].directory), 16)
    _commit(wd.ckpt_dir(phases[1].directory), 12)
    with pytest.raises(ConfigError, match="global step 12\\) lies before its start \\(step 16\\).*aside"):
        train.check_parents(c, phases, phases[1])


def test_only_phase_on_a_phase_whose_parent_is_unfinished_refuses(tmp_path):
    c = _config(**{"train.async_save": False})
    _commit(wd.ckpt_dir(_stable(c, tmp_path).directory), 4)
    with pytest.raises(ConfigError, match="unfinished"):
        train.run(c, str(tmp_path), only_phase="decay")
    assert not (tmp_path / "01_decay" / "ckpt").exists()


# ------------------------------------------------------------------ 2: every phase's data spec up front


def test_a_typo_in_a_later_phase_mixture_fails_before_the_first_step():
    c = _config()
    c.data.mixtures.decay = "corpus:0.7,pydocs:0.3"
    with pytest.raises(ConfigError, match="recipe.decay.mixture='decay'.*unknown data task 'pydocs'"):
        train.check_data_specs(c)
    c.data.mixtures.decay = "corpus:0.7,pydoc:x"
    with pytest.raises(ConfigError, match="recipe.decay"):
        train.check_data_specs(c)
    c.data.mixtures.decay = "corpus:0.7,pydoc:0.3"
    train.check_data_specs(c)


def test_resume_guards_only_the_mixtures_the_finished_phases_read(tmp_path):
    old = _config()
    old.data.mixtures.decay = "corpus:0.7,pydocs:0.3"  # the typo; only 'stable' has finished
    root = epath.Path(tmp_path)
    wd.write_json(wd.config_file(root), old.to_dict())
    _commit(wd.ckpt_dir(root / "00_stable"), 8)
    fixed = _config()
    resume.check(fixed, root)  # the corrected rerun is accepted
    changed = _config()
    changed.data.mixtures.pretrain = "stdlib:1.0"  # what stable trained on: refused
    with pytest.raises(ConfigError, match="data.mixtures.pretrain"):
        resume.check(changed, root)


# ------------------------------------------------------------------ 8: ablate survives its faults


def test_a_failing_arm_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    def fake_command(base, v, seed, fixed, d):
        code = "import sys; sys.exit(1)" if v.name == "bad" else "pass"
        return [sys.executable, "-c", code]

    monkeypatch.setattr(ablate, "command", fake_command)
    variants = [ablate.Variant("bad", {}), ablate.Variant("good", {})]
    with pytest.raises(Exception, match="1 run\\(s\\) failed.*bad seed 0"):
        ablate.run_all("configs/tiny.py", variants, {}, tmp_path, emit=False)
    assert json.loads((tmp_path / "bad" / "seed_0" / "failed.json").read_text())["status"] == 1
    assert (tmp_path / "good" / "seed_0" / "done.json").exists()  # the arm after the failure ran


def test_sigterm_to_ablate_stops_and_reaps_its_training_child(tmp_path):
    pidfile = tmp_path / "child.pid"
    driver = textwrap.dedent(
        f"""
        import sys, time
        from voltron_jax.experiments import ablate
        child = "import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
        ablate.command = lambda base, v, seed, fixed, d: [sys.executable, "-c", child]
        ablate.main(["--config=configs/tiny.py:test", "--workdir={tmp_path / "sweep"}"])
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, env=env())
    t0 = time.time()
    while not pidfile.exists() or not pidfile.read_text():
        assert time.time() - t0 < 120 and proc.poll() is None, "the training child never started"
        time.sleep(0.1)
    child = int(pidfile.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    try:  # the child was reaped: no such process (or a zombie of a reaped parent is gone)
        import os

        os.kill(child, 0)
        alive = open(f"/proc/{child}/stat").read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    assert not alive
    assert not (tmp_path / "sweep" / "base" / "seed_0" / "done.json").exists()


# ------------------------------------------------------------------ 10: a corpus changed between runs


def test_a_corpus_that_changed_since_the_checkpoints_is_refused_on_resume(tmp_path):
    from voltron_jax.data import pipeline

    c = _config()
    root = epath.Path(tmp_path)
    manifest = pipeline.corpus_manifest(c)
    old = json.loads(json.dumps(manifest))
    old["stdlib"]["files"][0]["sha256"] = "0" * 64  # a file edited since
    old["stdlib"]["files"].append({"path": "gone.py", "sha256": "1" * 64, "bytes": 1, "split": "train"})
    wd.write_json(wd.run_info_file(root), {"corpus_manifest": old})
    resume.check_corpus(root, manifest)  # no checkpoint yet: nothing to protect
    _commit(wd.ckpt_dir(root / "00_stable"), 2)
    first = manifest["stdlib"]["files"][0]["path"]
    with pytest.raises(
        ConfigError, match=f"corpus changed.*{first}: changed.*gone.py: removed.*new --workdir"
    ):
        resume.check_corpus(root, manifest)
    wd.write_json(wd.run_info_file(root), {"corpus_manifest": manifest})
    resume.check_corpus(root, manifest)  # the same corpus resumes


# ------------------------------------------------------------------ 4: the real command, end to end


@pytest.mark.heavy
def test_a_diverging_run_with_async_saves_exits_with_one_line(tmp_path):
    """Before: 544 lines (Orbax 'cannot schedule new futures after interpreter shutdown') and the save
    in flight dropped. After: exit 3, one line, every committed step good, no tmp folder left."""
    from tests.reliability.common import one_line_error, run

    out = run(
        "-m",
        "voltron_jax.main",
        "--config=configs/tiny.py:test",
        f"--workdir={tmp_path}",
        "--only_phase=stable",
        "--config.optim.lr=1e30",
        "--config.train.ckpt_every=1",
        "--config.train.log_every=1",
        "--config.train.eval_batches=1",
        "--config.train.async_save=true",
    )
    one_line_error(out, "diverged", "step 1", status=3)
    folder = tmp_path / "00_stable" / "ckpt"
    assert checkpoint.Checkpointer(folder).all_steps() == [1]
    assert not [p for p in folder.iterdir() if "tmp" in p.name]


# ------------------------------------------------------------------ 1: ensemble --out


def test_ensemble_refuses_to_write_its_record_into_a_training_workdir(tmp_path):
    from voltron_jax.experiments import ensemble

    run = tmp_path / "run"
    _commit(run / "00_stable" / "ckpt", 2)
    (run / "config.json").write_text("{}")
    with pytest.raises(ensemble.EnsembleError, match="training run's workdir"):
        ensemble.eval_record_dir(str(run))
    assert ensemble.eval_record_dir(str(tmp_path / "new")) == epath.Path(tmp_path / "new" / "00_eval")
    (tmp_path / "again" / "00_eval").mkdir(parents=True)  # an earlier record of ablate's own
    ensemble.eval_record_dir(str(tmp_path / "again"))


@pytest.mark.heavy
def test_raising_a_parents_steps_refuses_the_stale_child_after_the_parent_caught_up(tmp_path):
    """The documented-safe change `recipe.stable.steps` 8 -> 10 on a finished run: stable trains its 2
    new steps, then decay (built from stable's step 8) is refused in one line, its checkpoints kept.
    Before: decay resumed its old checkpoint ('resumed at step -2/4') on the stale parent."""
    c = _config(**{"train.async_save": False})
    train.run(c, str(tmp_path))
    decay_ckpt = tmp_path / "01_decay" / "ckpt"
    before = checkpoint.Checkpointer(decay_ckpt).all_steps()
    assert json.loads((tmp_path / "01_decay" / "parents.json").read_text())["stable"]["step"] == 8
    c2 = _config(**{"train.async_save": False, "recipe.stable.steps": 10})
    with pytest.raises(ConfigError, match="phase decay was built from parents that changed since"):
        train.run(c2, str(tmp_path))
    assert checkpoint.Checkpointer(tmp_path / "00_stable" / "ckpt").latest_step() == 10
    assert checkpoint.Checkpointer(decay_ckpt).all_steps() == before
