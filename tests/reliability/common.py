"""Helpers of the reliability suite (issues 16 and 24): real `python -m voltron_jax...` processes as a
user would start them (`run`, or `start`/`finish` for the tiny test config), a small tmpfs, snapshots of a
folder, and readers for what a run leaves on disk."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lines that only third-party start-up noise writes (issue 16 item 8): none may reach a user by default.
NOISE = ("oneDNN", "cuda", "absl::InitializeLog", "orbax", "Traceback", "WARNING:", "I0000", "E0000", "W0000")
FAST = [  # one short phase, cheap evaluation: a run is compile time plus a few steps
    "--config=configs/tiny.py:test",
    "--only_phase=stable",
    "--config.train.eval_batches=1",
    "--config.train.log_every=1",
]


def env(quiet: bool = False, **extra) -> dict:
    """A user's environment: no TF_CPP_MIN_LOG_LEVEL from the test process (the command sets its own) and
    no pytest-xdist worker id. quiet: TensorFlow's C++ log off and exactly 8 fake devices, for the tests
    that read a run's own output lines; `extra` is set last."""
    out = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    for key in ("TF_CPP_MIN_LOG_LEVEL", "PYTEST_XDIST_WORKER"):
        out.pop(key, None)
    if quiet:
        out.update(TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out.update(extra)
    return out


def run(*argv: str, cwd: Path = ROOT, timeout: int = 600, **extra) -> subprocess.CompletedProcess:
    """`python <argv>` as a user would type it; text stdout/stderr."""
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=timeout
    )


def start(workdir, *extra) -> subprocess.Popen:
    """`python -m voltron_jax.main` on the tiny test config in its own process (output: stdout)."""
    cmd = [sys.executable, "-m", "voltron_jax.main", *FAST, f"--workdir={workdir}", *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(quiet=True), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def one_line_error(out: subprocess.CompletedProcess, *names: str, status: int = 2) -> str:
    """Assert the command failed with `status` and exactly one stderr line `error: ...` holding `names`."""
    lines = out.stderr.splitlines()
    assert out.returncode == status, (out.returncode, out.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def line_with(output: str, text: str) -> str:
    """The one output line holding `text` (the user-facing message); fails if none or several do."""
    lines = [x for x in output.splitlines() if text in x and not x.startswith(" ")]
    assert len(lines) == 1, f"want one line with {text!r}, got {lines}; output:\n{output[-3000:]}"
    return lines[0]


def wait_for(predicate, timeout: float = 180, what: str = "") -> None:
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file under `folder`: equal snapshots = nothing changed."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = (
                hashlib.sha256(p.read_bytes()).hexdigest(),
                p.stat().st_mtime_ns,
            )
    return out


def records(phase_dir) -> list[dict]:
    return [json.loads(x) for x in (phase_dir / "metrics.jsonl").read_text().splitlines()]


def event_steps(tb_dir) -> list[tuple[str, int]]:
    """(tag, step) of every scalar in the TensorBoard event files of `tb_dir`."""
    import tensorflow as tf  # only these readers need TensorFlow: importing it costs seconds

    out = []
    for f in sorted(tb_dir.glob("events.out.tfevents*")):
        for raw in tf.data.TFRecordDataset(str(f)):
            ev = tf.compat.v1.Event.FromString(raw.numpy())
            out += [(v.tag, ev.step) for v in ev.summary.value]
    return out


def committed(ckpt_dir) -> dict[int, float]:
    """{step: commit-marker mtime} of the committed checkpoints in `ckpt_dir`."""
    if not ckpt_dir.exists():
        return {}
    return {
        int(p.name): (p / "commit_success.txt").stat().st_mtime
        for p in ckpt_dir.iterdir()
        if p.name.isdigit() and (p / "commit_success.txt").exists()
    }


def mount_tmpfs(path, size: str) -> bool:
    """Mount a tmpfs of `size` at `path` (root only); False where this machine cannot."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        )
    except OSError:
        return False
    return r.returncode == 0


def umount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def small_disk(path, size: str):
    """Generator for a fixture: a real tmpfs of `size` at `path`, unmounted afterwards; skips the test
    (saying why) where this machine cannot mount one."""
    if not mount_tmpfs(path, size):
        pytest.skip("cannot mount a tmpfs here (needs root): the disk-full tests need a real small disk")
    try:
        yield path
    finally:
        umount(path)
