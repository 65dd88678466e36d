"""Helpers of the reliability suite (issue 16): real `python -m voltron_jax.main` processes on the tiny
test config, a small tmpfs, and readers for what a run leaves on disk."""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = [  # one short phase, cheap evaluation: a run is compile time plus a few steps
    "--config=configs/tiny.py:test",
    "--only_phase=stable",
    "--config.train.eval_batches=1",
    "--config.train.log_every=1",
]


def env() -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    e.pop("PYTEST_XDIST_WORKER", None)
    return e


def start(workdir, *extra) -> subprocess.Popen:
    """`python -m voltron_jax.main` on the tiny test config in its own process (output: stdout)."""
    cmd = [sys.executable, "-m", "voltron_jax.main", *FAST, f"--workdir={workdir}", *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


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


def records(phase_dir) -> list[dict]:
    return [json.loads(x) for x in (phase_dir / "metrics.jsonl").read_text().splitlines()]


def event_steps(tb_dir) -> list[tuple[str, int]]:
    """(tag, step) of every scalar in the TensorBoard event files of `tb_dir`."""
    import tensorflow as tf

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
    import pytest

    if not mount_tmpfs(path, size):
        pytest.skip("cannot mount a tmpfs here (needs root): the disk-full tests need a real small disk")
    try:
        yield path
    finally:
        umount(path)
