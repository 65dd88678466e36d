"""The workdir layout module (issue 24 item 3): the one place that names a run's folders and files."""

from __future__ import annotations

import json
import os

import pytest
from etils import epath

from configs import tiny
from voltron_jax import recipe as recipe_lib
from voltron_jax import train
from voltron_jax.run import resume
from voltron_jax.run import workdir as wd


def test_train_phases_and_resume_use_the_same_folders(tmp_path):
    c = tiny.get_config("test")
    root = epath.Path(tmp_path)
    folders = wd.phase_folders(recipe_lib.phase_order(c.recipe))
    assert resume.folders(c) == folders
    for ph in train.phases(c, root):
        rel = ph.directory.relative_to(root)
        assert rel.parts[0] in folders and folders[rel.parts[0]] == ph.name
        assert len(rel.parts) == (1 if ph.member is None else 2)


def test_run_dirs_orders_members_by_number_and_labels_them(tmp_path):
    root = epath.Path(tmp_path)
    for i in (0, 2, 10):
        (root / "01_branch" / f"cluster_{i}").mkdir(parents=True)
    (root / "00_stable").mkdir()
    (root / "data").mkdir()  # not a phase folder
    (root / "01_branch" / "cluster_x").mkdir()  # not a member folder
    (root / "02_decay.stale").mkdir()  # a phase folder moved aside (train.check_parents advises it)
    dirs = wd.run_dirs(root)
    assert list(dirs) == ["stable", "branch/0", "branch/2", "branch/10"]
    assert dirs["branch/10"] == root / "01_branch" / "cluster_10"


def test_path_is_absolute_and_keeps_urls():
    assert str(wd.path("runs/x")) == os.path.abspath("runs/x")
    assert str(wd.path("gs://bucket/run")) == "gs://bucket/run"


def test_write_json_replaces_whole_or_leaves_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "config.json"
    wd.write_json(f, {"a": 1})
    assert json.loads(f.read_text()) == {"a": 1}

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        wd.write_json(f, {"a": 2, "long": "x" * 10000})
    assert json.loads(f.read_text()) == {"a": 1}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary left behind
