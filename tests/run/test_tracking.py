"""Optional Weights & Biases logging (run/tracking.py): offline mode end to end, never required."""

import json
import sys

import pytest

from configs import tiny
from voltron_jax import train
from voltron_jax.errors import ConfigError
from voltron_jax.run import tracking


def _config(**train_fields):
    c = tiny.get_config("test")
    c.max_steps = 2
    c.train.log_every = 1
    c.train.async_save = False
    c.train.update(train_fields)
    return c


def test_off_by_default_and_wandb_never_imported(tmp_path):
    assert tracking.make(_config(), tmp_path, "stable") is None
    assert tracking.make(_config(wandb_project=""), tmp_path, "stable") is None


def test_asking_for_wandb_without_it_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"\.\[track\]"):
        tracking.make(_config(wandb_project="p"), tmp_path, "stable")


def test_offline_run_logs_train_and_validation_at_the_global_step(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the `track` extra (make install installs it)
    monkeypatch.setenv("WANDB_SILENT", "true")
    train.run(
        _config(wandb_project="voltron-test", wandb_mode="offline"),
        str(tmp_path / "run"),
        only_phase="stable",
    )
    runs = list((tmp_path / "run" / "00_stable" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    history = logged_history(runs[0])
    assert [h["_step"] for h in history] == [1, 2]  # the global step, as TensorBoard's
    assert history[0]["train/loss"] == pytest.approx(train_records(tmp_path)[0]["loss"])
    assert history[1]["eval/loss"] == pytest.approx(train_records(tmp_path, "eval")[-1]["loss"])


def logged_history(path) -> list[dict]:
    """The history rows of an offline W&B run file (what `wandb sync` would upload)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    ds, rows = datastore.DataStore(), []
    ds.open_for_scan(str(path))
    while (data := ds.scan_data()) is not None:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def train_records(tmp_path, kind="train"):
    recs = [
        json.loads(x) for x in (tmp_path / "run" / "00_stable" / "metrics.jsonl").read_text().splitlines()
    ]
    return [r for r in recs if r["kind"] == kind]
