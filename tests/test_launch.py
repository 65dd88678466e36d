"""launch/tpu.py --dry-run prints the exact gcloud commands and runs nothing; bad arguments fail clearly."""

import importlib.util
import os
import shlex
import signal
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
    # TPU VM images ship Python 3.10; setup.py needs >= 3.11: installed (deadsnakes) and used for the venv
    assert "command -v python3.11" in remote and "ppa:deadsnakes/ppa" in remote
    assert "python3.11 -m venv .venv" in remote and "python3 -m venv" not in remote
    assert remote.index("python3.11-venv") < remote.index("-m venv") < remote.index("pip install")


def test_stop_signals_a_checkpointing_exit_and_delete_releases_the_slice(capsys, monkeypatch):
    (cmd,) = dry(capsys, monkeypatch, "stop", "--name=v13", "--zone=z")
    assert cmd[-1].startswith("--command=pkill -TERM -f '[v]oltron_jax[.]main' || true; ")
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


# ---------------------------------------------------------------------------- wait, stop, --help (issue 16)


def _fake_gcloud(tmp_path, states: list[str], fail: bool = False) -> dict:
    """PATH with a `gcloud` that prints the next of `states` per call (the last one repeats)."""
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    script = tmp_path / "bin" / "gcloud"
    script.parent.mkdir(exist_ok=True)
    body = (
        "exit 3"
        if fail
        else (
            f'f={tmp_path}/states; s=$(head -n1 "$f"); n=$(wc -l < "$f"); '
            '[ "$n" -gt 1 ] && sed -i 1d "$f"; echo "$s"'
        )
    )
    script.write_text("#!/bin/bash\n" + body + "\n")
    script.chmod(0o755)
    return dict(os.environ, PATH=f"{script.parent}:{os.environ['PATH']}")


def _wait(tmp_path, states, *extra, fail=False):
    a, ((bash, c, loop),) = tpu.plan(
        ["wait", "--name=v13", "--zone=z", "--poll=0.01", *extra]
    )  # --poll must be > 0
    env = _fake_gcloud(tmp_path, states, fail)
    return subprocess.run([bash, c, loop], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("state", ["FAILED", "SUSPENDED", "SUSPENDING", "DELETING"])
def test_wait_ends_on_a_terminal_state_with_one_line(tmp_path, state):
    out = _wait(tmp_path, ["ACCEPTED", "WAITING_FOR_RESOURCES", state])
    assert out.returncode == 1 and out.stdout.count("waiting for v13") == 2
    assert out.stderr.count("\n") == 1 and f"v13 is {state}" in out.stderr and "create again" in out.stderr


def test_wait_succeeds_on_active_and_fails_on_an_unknown_resource_or_timeout(tmp_path):
    ok = _wait(tmp_path, ["PROVISIONING", "ACTIVE"])
    assert ok.returncode == 0 and ok.stdout.strip().endswith("v13 is ACTIVE") and not ok.stderr
    (tmp_path / "bin" / "gcloud").unlink()
    gone = _wait(tmp_path, ["x"], fail=True)
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1 and "cannot describe" in gone.stderr
    (tmp_path / "bin" / "gcloud").unlink()
    late = _wait(tmp_path, ["PROVISIONING"], "--timeout=1", "--poll=1")
    assert late.returncode == 1 and "still PROVISIONING after 1 s" in late.stderr


def test_stop_signals_the_training_processes_but_not_its_own_shell(tmp_path):
    """The remote shell's command line holds the pattern; `[v]...` keeps pkill from matching it. Run with a
    unique marker (never the real pattern: that would signal other runs on this machine)."""
    marker = f"voltron_stop_test_{os.getpid()}_{tmp_path.name}"
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); time.sleep(60)"

    def decoy():
        return subprocess.Popen([sys.executable, "-c", code, marker])

    def remote_shell():
        # The worker's shell that ssh starts has SIGTERM at its default; a job runner that starts the tests
        # with SIGTERM ignored (exec keeps SIG_IGN) would make the naive shell below survive its own pkill.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    proc = decoy()
    try:
        import time

        time.sleep(0.5)
        bracketed = f"[{marker[0]}]{marker[1:]}"
        out = subprocess.run(
            ["bash", "-c", tpu.stop_script(10, pattern=bracketed)],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=remote_shell,
        )
        assert out.returncode == 0, out.stderr  # the shell survived and saw the process exit
        assert proc.wait(timeout=10) == 7  # SIGTERM reached the training process
        proc = decoy()
        time.sleep(0.5)
        naive = subprocess.run(
            ["bash", "-c", tpu.stop_script(10, pattern=marker)], timeout=60, preexec_fn=remote_shell
        )
        assert naive.returncode == -15  # the old plain pattern: the shell signals itself
    finally:
        proc.kill()
        proc.wait()


def test_help_is_whole():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "tpu.py"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "stop, delete, and the c-BTX branch phase as parallel jobs" in text  # the old help ended at "and"
    assert "docs/pods.md explains" in text and "deadsnakes" in text
    for name in tpu.COMMANDS:
        assert name in out.stdout
    sub = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "tpu.py"), "wait", "--help"],
        capture_output=True,
        text=True,
    )
    assert "--timeout" in sub.stdout and "terminal state" in sub.stdout
