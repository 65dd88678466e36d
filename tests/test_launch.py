"""launch/tpu.py --dry-run prints the exact gcloud commands and runs nothing; bad arguments fail clearly."""

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("tpu_launch", os.path.join(ROOT, "launch", "tpu.py"))
tpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tpu)

TRAIN = "python -m voltron_jax.main --multihost --config=configs/voltron_13b.py:v4 --workdir=gs://b/v13"


def dry(capsys, monkeypatch, *argv) -> list[list[str]]:
    def refuse(*a, **k):
        raise AssertionError("a dry run must not execute anything")

    monkeypatch.setattr(tpu.subprocess, "run", refuse)
    assert tpu.main(["--dry-run", *argv]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def test_create_is_a_queued_resource_with_the_generations_runtime(capsys, monkeypatch):
    (cmd,) = dry(
        capsys, monkeypatch, "create", "--name=v13", "--zone=us-central2-b", "--type=v4-128", "--spot"
    )
    assert cmd == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "v13",
        "--node-id=v13",
        "--zone=us-central2-b",
        "--accelerator-type=v4-128",
        "--runtime-version=tpu-ubuntu2204-base",
        "--spot",
    ]
    (cmd,) = dry(capsys, monkeypatch, "create", "--name=p", "--zone=z", "--type=v5p-128", "--project=proj")
    assert "--runtime-version=v2-alpha-tpuv5" in cmd and cmd[-1] == "--project=proj"


def test_run_and_install_reach_every_worker(capsys, monkeypatch):
    (cmd,) = dry(
        capsys, monkeypatch, "run", "--name=v13", "--zone=z", "--env", "XLA_FLAGS=--x=1", "--", *TRAIN.split()
    )
    assert (
        cmd[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v13", "--zone=z"] and "--worker=all" in cmd
    )
    remote = cmd[-1].removeprefix("--command=")
    assert remote == (
        "cd voltron_jax && export PATH=$PWD/.venv/bin:$PATH && export XLA_FLAGS=--x=1; " + TRAIN
    )
    (cmd,) = dry(
        capsys, monkeypatch, "install", "--name=v13", "--zone=z", "--repo=https://h/r.git", "--rev=abc"
    )
    remote = cmd[-1].removeprefix("--command=")
    assert "git clone https://h/r.git voltron_jax" in remote and "git checkout --quiet abc" in remote
    assert "pip install --quiet -c constraints.txt -e '.[aot,data]'" in remote


def test_stop_signals_a_checkpointing_exit_and_delete_releases_the_slice(capsys, monkeypatch):
    (cmd,) = dry(capsys, monkeypatch, "stop", "--name=v13", "--zone=z")
    assert cmd[-1] == "--command=pkill -TERM -f 'voltron_jax.main' || true"
    (cmd,) = dry(capsys, monkeypatch, "delete", "--name=v13", "--zone=z")
    assert cmd == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "delete",
        "v13",
        "--zone=z",
        "--force",
        "--quiet",
    ]


def test_branches_run_each_member_on_its_own_slice(capsys, monkeypatch):
    cmds = dry(
        capsys,
        monkeypatch,
        "branches",
        "--name=br",
        "--zone=z",
        "--type=v4-64",
        "--members=0-7",
        "--create",
        "--repo=https://h/r.git",
        "--rev=abc",
        "--",
        *TRAIN.split(),
    )
    creates = [c for c in cmds if c[3:5] == ["queued-resources", "create"]]
    runs = [c for c in cmds if "--only_phase=branch" in c[-1]]
    assert [c[5] for c in creates] == [f"br-{i}" for i in range(8)]
    assert cmds[:8] == creates  # every slice is queued before waiting on any
    for i, c in enumerate(runs):
        assert c[5] == f"br-{i}" and "nohup" in c[-1]
        assert c[-1].count(f"--only_phase=branch --member={i}'") == 1
    assert len(cmds) == 8 + 8 * 3  # create x8, then wait + install + run per member


def test_the_same_command_runs_through_the_real_cli():
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "tpu.py"),
            "delete",
            "--dry-run",
            "--name=a",
            "--zone=z",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "gcloud compute tpus queued-resources delete a --zone=z --force --quiet"


@pytest.mark.parametrize(
    "argv,match",
    [
        (["create", "--name=a", "--zone=z", "--type=v9-8"], "not a TPU accelerator type"),
        (["create", "--name=a", "--zone=z"], "create needs --type"),
        (["run", "--name=a", "--zone=z"], "give the command to run"),
        (["install", "--name=a", "--zone=z"], "needs --repo"),
        (["branches", "--name=a", "--zone=z", "--members=x", "--", "true"], "--members"),
    ],
)
def test_bad_arguments_fail_with_one_message(capsys, argv, match):
    assert tpu.main(["--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1
