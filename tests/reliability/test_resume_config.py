"""Issue 16 item 4: restarting a workdir with another model shape or data is refused in one line naming
the differing fields, before anything is written (config.json / run_info.json / checkpoints unchanged);
fields that may change on resume (lr, max_steps, mesh, steps ...) pass."""

from __future__ import annotations

import json

import pytest
from etils import epath

from configs import tiny
from tests.reliability.common import one_line_error, run, snapshot
from voltron_jax.errors import ConfigError
from voltron_jax.run import resume


def fake_run(workdir, config, checkpointed=("00_stable",)):
    """A workdir as the loop leaves it: config.json, run_info.json, a saved step in some phases."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    (workdir / "run_info.json").write_text(json.dumps({"config": config.to_dict(), "git_commit": "x"}))
    for folder in checkpointed:
        step = workdir / folder / "ckpt" / "8"
        step.mkdir(parents=True)
        (step / "commit_success.txt").write_text("ok")
    return workdir


def changed(**fields):
    c = tiny.get_config("test")
    for key, value in fields.items():
        *path, leaf = key.split("__")
        node = c
        for p in path:
            node = node[p]
        node[leaf] = value
    return c


@pytest.mark.slow
def test_another_model_shape_is_refused_by_the_real_command_and_nothing_changes(tmp_path):
    w = fake_run(tmp_path / "w", tiny.get_config("test"))
    before = snapshot(w)
    out = run(
        "-m",
        "voltron_jax.main",
        "--config=configs/tiny.py:test",
        f"--workdir={w}",
        "--config.model.d_model=128",
        "--config.model.n_layers=3",
        "--config.optim.lr=1e-3",  # allowed: not listed
    )
    line = one_line_error(out, "model.d_model: 64 -> 128", "model.n_layers: 2 -> 3", "new --workdir")
    assert "optim.lr" not in line.split("(optim")[0] and "strict" not in line
    assert snapshot(w) == before  # config.json, run_info.json and the checkpoint untouched


@pytest.mark.parametrize(
    "fields,names",
    [
        ({"data__seq_len": 32}, ["data.seq_len: 64 -> 32"]),
        ({"data__batch_size": 16}, ["data.batch_size: 8 -> 16"]),
        ({"seed": 3}, ["seed: 0 -> 3"]),
        ({"model__linear": "bitlinear"}, ["model.linear: 'dense' -> 'bitlinear'"]),
        ({"model__scan_layers": True}, ["model.scan_layers"]),
        ({"data__mixtures__pretrain": "stdlib:1.0"}, ["data.mixtures.pretrain"]),
        ({"recipe__stable__mixture": "decay"}, ["recipe.stable.mixture: 'pretrain' -> 'decay'"]),
    ],
)
def test_fields_that_change_shapes_or_data_are_refused(tmp_path, fields, names):
    w = fake_run(tmp_path, tiny.get_config("test"))
    with pytest.raises(ConfigError) as e:
        resume.check(changed(**fields), epath.Path(w))
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg


@pytest.mark.parametrize(
    "fields",
    [
        {"optim__lr": 1e-4, "optim__weight_decay": 0.0, "max_steps": 3},
        {"schedule__warmup": 5, "train__ckpt_every": 2, "train__log_every": 1},
        {"mesh__data": 2, "mesh__fsdp": 4},
        {"recipe__stable__steps": 100, "recipe__decay__steps": 10},
        {"model__dtype": "bfloat16", "model__remat": "full", "data__cache_dir": "/elsewhere"},
    ],
)
def test_fields_that_may_change_on_resume_pass(tmp_path, fields):
    resume.check(changed(**fields), epath.Path(fake_run(tmp_path, tiny.get_config("test"))))


def test_only_phases_with_a_checkpoint_are_compared(tmp_path):
    old = tiny.get_config("test")
    # nothing saved yet: a new shape simply starts over
    resume.check(changed(model__d_model=32), epath.Path(fake_run(tmp_path / "a", old, checkpointed=())))
    # the stable phase saved: a decay-only override is fine, a stable one is not
    w = epath.Path(fake_run(tmp_path / "b", old))
    ok = tiny.get_config("test")
    ok.recipe.decay.overrides = {"model": {"d_ff": 256}}
    resume.check(ok, w)
    bad = tiny.get_config("test")
    bad.recipe.stable.overrides = {"model": {"d_ff": 256}}
    with pytest.raises(ConfigError, match=r"model.d_ff: 128 -> 256"):
        resume.check(bad, w)
    # a fresh workdir, or one without config.json, has nothing to compare
    resume.check(changed(model__d_model=32), epath.Path(tmp_path / "fresh"))


@pytest.mark.slow
@pytest.mark.heavy  # a multi-process end-to-end run: make test-heavy (CI runs it), keeping make test < 15 min
def test_a_real_run_then_another_shape_then_another_lr(tmp_path):
    args = (
        "-m",
        "voltron_jax.main",
        "--config=configs/tiny.py:test",
        f"--workdir={tmp_path}",
        "--config.max_steps=2",
    )
    first = run(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr == ""  # item 8: only the project's own lines, on stdout
    before = snapshot(tmp_path)
    one_line_error(run(*args, "--config.model.d_ff=256"), "model.d_ff: 128 -> 256")
    assert snapshot(tmp_path) == before
    again = run(*args, "--config.optim.lr=1e-3")
    assert again.returncode == 0 and "resumed at step 2/2" in again.stdout, again.stderr[-3000:]
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 1e-3
