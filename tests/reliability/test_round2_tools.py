"""Issue 29 groups 1, 6, 9, 10 (validation), 11 and 12 at unit level: no tool writes into a folder it did
not create; an allowed optimizer change keeps the state tree; markers are written whole and a truncated
one is named; numeric fields fail before compile; the notebook API and the launcher check their
arguments."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath

from configs import tiny
from launch import tpu
from tests.reliability.common import snapshot
from voltron_jax import cli, optim
from voltron_jax.config import validate
from voltron_jax.errors import ConfigError, UsageError
from voltron_jax.run import checkpoint
from voltron_jax.run import workdir as wd


def _fake_ckpt(folder, steps=(4, 8)):
    for s in steps:
        (folder / str(s)).mkdir(parents=True)
        (folder / str(s) / "commit_success.txt").write_text("ok")
    return folder


# ------------------------------------------------------------------ 1: never write into a user's folder


def test_surgery_refuses_an_out_folder_that_holds_checkpoints_and_leaves_it_alone(tmp_path):
    from voltron_jax.surgery.__main__ import main

    ckpt = _fake_ckpt(tmp_path / "run" / "01_decay" / "ckpt")
    before = snapshot(tmp_path)
    argv = ["surgery", "upcycle", f"--branches={ckpt}", "--config=configs/tiny.py:test", f"--out={ckpt}"]
    with pytest.raises(UsageError, match="not empty.*holds checkpoints.*Nothing was written"):
        main(argv)
    assert snapshot(tmp_path) == before


def test_surgery_reports_a_save_that_wrote_nothing(tmp_path, monkeypatch):
    """A Checkpointer.save that returns False (step already there) is an error, never 'wrote'."""
    from voltron_jax.surgery import __main__ as surgery_cli

    monkeypatch.setattr(surgery_cli, "_params", lambda d, step: {"w": np.zeros(2)})
    monkeypatch.setattr("voltron_jax.surgery.target_shapes", lambda config: None)
    monkeypatch.setattr("voltron_jax.surgery.upcycle", lambda *a, **k: {"w": np.zeros(2)})
    monkeypatch.setattr(checkpoint.Checkpointer, "save", lambda self, *a, **k: False)
    argv = ["s", "upcycle", "--branches=x", "--config=configs/tiny.py:test", f"--out={tmp_path / 'new'}"]
    with pytest.raises(checkpoint.CheckpointError, match="not written"):
        surgery_cli.main(argv)


@pytest.mark.parametrize("kind", ["workdir", "non_empty"])
def test_export_bitnet_refuses_a_workdir_or_non_empty_out_before_reading(tmp_path, kind):
    from voltron_jax.inference import export_bitnet

    out = tmp_path / "out"
    out.mkdir()
    if kind == "workdir":
        (out / "config.json").write_text(json.dumps({"model": {}}))
        _fake_ckpt(out / "00_stable" / "ckpt")
    else:
        (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="workdir" if kind == "workdir" else "not empty"):
        export_bitnet.export(str(tmp_path / "no_such_phase"), str(out))
    assert snapshot(tmp_path) == before


def test_require_new_folder_accepts_new_and_empty_folders(tmp_path):
    assert wd.require_new_folder(tmp_path / "a" / "b") == epath.Path(tmp_path / "a" / "b")
    (tmp_path / "empty").mkdir()
    wd.require_new_folder(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        wd.require_new_folder(tmp_path / "file")


# ------------------------------------------------------------------ 6: grad_clip=0 keeps the state tree


def test_grad_clip_off_keeps_the_optimizer_state_tree():
    params = {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
    trees = []
    for clip in (1.0, 0.0):
        c = tiny.get_config("test")
        c.optim.grad_clip = clip
        tx = optim.make_optimizer(c, params, "stable")
        trees.append(jax.tree.structure(tx.init(params)))
        if clip == 0.0:  # off means off: a huge gradient passes unclipped
            g = {"w": jnp.full((4, 4), 1e6), "b": jnp.full(4, 1e6)}
            clipped, _ = optax.clip_by_global_norm(float("inf")).update(g, optax.EmptyState())
            assert float(optax.global_norm(clipped)) == pytest.approx(float(optax.global_norm(g)))
    assert trees[0] == trees[1]


def test_a_changed_state_tree_is_never_called_damaged(tmp_path):
    """Every committed step fails with the new target: the config changed, not the files (before: 'rename
    8 to 8.damaged', which leads to retraining from scratch)."""
    with checkpoint.Checkpointer(tmp_path, keep=3, async_save=False) as ck:
        for s in (1, 2):
            ck.save(s, {"a": jnp.ones(3)}, {}, {})
    with checkpoint.Checkpointer(tmp_path) as ck, pytest.raises(checkpoint.CheckpointError) as e:
        ck.restore(target={"a": jnp.ones(3), "b": jnp.ones(2)}, fallback=True)
    msg = str(e.value)
    assert "damaged" not in msg and "rename" not in msg and "intact" in msg and "Nothing was moved" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


# ------------------------------------------------------------------ 9: markers whole, unreadable named


def test_prepare_marker_is_written_whole_and_a_truncated_one_is_named(tmp_path, monkeypatch):
    from voltron_jax.data import corpus, prepare

    out = epath.Path(tmp_path / "data")
    prepare.write_marker(out, "fp", {"a": 1}, {"n": 2})
    assert prepare.read_marker(out)["fingerprint"] == "fp"

    def killed(src, dst):  # the process dies between writing and renaming
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare.write_marker(out, "fp2", {"a": 1}, {"n": 3})
    monkeypatch.undo()
    assert prepare.read_marker(out)["fingerprint"] == "fp"  # the old marker, whole
    marker = out / prepare.MARKER
    marker.write_text(marker.read_text()[:10])  # truncated by a copy or a full disk
    with pytest.raises(corpus.DataError, match="prepare.json is not readable JSON.*remove it and rerun"):
        prepare.read_marker(out)


def test_a_truncated_token_cache_is_rebuilt(tmp_path, capsys):
    """The embedded corpus's cached token store (data.cache_dir/tokens) with a truncated shard is
    rebuilt with the same tokens, saying so, instead of failing the run."""
    from voltron_jax.data import pipeline, tasks
    from voltron_jax.data import vocab as vocab_lib

    c = tiny.get_config("test")
    c.data.cache_dir = str(tmp_path)
    vocab = vocab_lib.make_vocab(c.data)
    name = tasks.ensure_task("stdlib", c.data, vocab)
    want = pipeline.token_stream(name, "validation", vocab, c.data)
    shard = sorted((tmp_path / "tokens").rglob("*.arrayrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    got = pipeline.token_stream(name, "validation", vocab, c.data)
    np.testing.assert_array_equal(got[0], want[0])
    assert "unreadable" in capsys.readouterr().out


# ------------------------------------------------------------------ 10: numeric fields before compile


@pytest.mark.parametrize(
    "section,field,value",
    [
        ("train", "ckpt_every", 0),
        ("train", "log_every", 0),
        ("train", "eval_every", -1),
        ("train", "eval_batches", 0),
        ("train", "keep", 0),
        ("model", "n_heads", 0),
        ("model", "n_kv_heads", 0),
        ("schedule", "warmup", -1),
        ("schedule", "final_frac", 1.5),
        ("optim", "weight_decay", -0.1),
        ("data", "val_fraction", 1.0),
    ],
)
def test_numeric_fields_are_refused_by_validate(section, field, value):
    c = tiny.get_config("test")
    c[section][field] = value
    with pytest.raises(ConfigError, match=f"{section}.{field}"):
        validate(c)


def test_empty_workdir_and_member_without_phase_are_refused_before_anything_runs(tmp_path, monkeypatch):
    from voltron_jax import train

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="workdir is empty"):
        train.run(tiny.get_config("test"), "")
    with pytest.raises(ConfigError, match="needs only_phase"):
        train.run(tiny.get_config("test"), str(tmp_path / "w"), member=1)
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_gets_a_hint():
    line, status = cli.describe(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
    assert status == 1 and "internal error" not in line
    assert "grad_accum_steps" in line and "batch_size" in line


# ------------------------------------------------------------------ 11: notebook API bounds


@pytest.fixture(scope="module")
def lm():
    from voltron_jax.inference import api

    c = tiny.get_config("test")
    model = api.Model.__new__(api.Model)
    model.config, model.params, model._vocab = c, None, api.ByteVocab()
    return model


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(max_new_tokens=10**7), "max_length"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
    ],
)
def test_generate_refuses_out_of_range_settings_before_allocating(lm, kwargs, name):
    from voltron_jax.inference import api

    with pytest.raises(api.LoadError, match=name):
        lm.generate("def f():", **kwargs)


@pytest.mark.parametrize("prompt", [b"bytes", None, [], ["ok", 3], "\ud800"])
def test_bad_prompts_give_one_clear_error(lm, prompt):
    from voltron_jax.inference import api

    with pytest.raises(api.LoadError, match="str"):
        lm.generate(prompt, max_new_tokens=1)
    with pytest.raises(api.LoadError, match="str"):
        lm.score(prompt)


def test_load_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys):
    from voltron_jax import train
    from voltron_jax.inference import api

    c = tiny.get_config("test")
    (ph,) = [p for p in train.phases(c, epath.Path(tmp_path)) if p.name == "stable"]
    rt = train.Runtime(ph)
    state = rt.scratch()
    with checkpoint.Checkpointer(wd.ckpt_dir(ph.directory), keep=5, async_save=False) as ck:
        for s in (1, 2):
            ck.save(s, state, {}, {"config": c.to_dict()})
    meta = ph.directory / "ckpt" / "2" / "state" / "_METADATA"
    meta.write_bytes(meta.read_bytes()[:20])
    model = api.load(str(tmp_path))
    assert model.step == 1 and "loaded step 1" in capsys.readouterr().out
    assert (ph.directory / "ckpt" / "2").is_dir()  # skipped, not moved or deleted


# ------------------------------------------------------------------ 12: the launcher


def test_branches_without_a_command_refuses_before_renting_anything():
    with pytest.raises(tpu.LaunchError, match="needs the training command"):
        tpu.plan(["branches", "--name=x", "--zone=z", "--members=0-2"])


@pytest.mark.parametrize("poll", ["0", "-1"])
def test_wait_poll_must_be_positive(poll):
    with pytest.raises(tpu.LaunchError, match="--poll"):
        tpu.plan(["wait", "--name=x", "--zone=z", f"--poll={poll}"])


def test_damaged_prepared_shards_and_metrics_name_the_file(tmp_path):
    from voltron_jax.data import corpus, prepare
    from voltron_jax.errors import VoltronError
    from voltron_jax.run import report

    out = epath.Path(tmp_path / "data")
    prepare.write_marker(out, "fp", {}, {})
    shard = out / "validation.jsonl"
    prepare.write_jsonl(shard, [{"id": "a", "text": "x" * 50}], ("id", "text"))
    shard.write_text(shard.read_text()[:20])
    with pytest.raises(corpus.DataError, match="validation.jsonl is damaged.*remove .*prepare.json"):
        prepare.read_jsonl(shard)
    phase = epath.Path(tmp_path / "00_stable")
    phase.mkdir()
    good = [json.dumps({"kind": "train", "step": s, "loss": 1.0}) for s in (1, 2)]
    (phase / "metrics.jsonl").write_text("\n".join(good) + '\n{"kind": "tra')  # killed mid-write
    assert [r["step"] for r in report.read_metrics(phase)] == [1, 2]
    (phase / "metrics.jsonl").write_text(good[0] + '\n{"kind"\n' + good[1] + "\n")
    with pytest.raises(VoltronError, match="metrics.jsonl line 2 is not JSON"):
        report.read_metrics(phase)
