"""Helpers of the reliability suite: run a real command in a subprocess, snapshot a folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Lines that only third-party start-up noise writes (issue 16 item 8): none may reach a user by default.
NOISE = ("oneDNN", "cuda", "absl::InitializeLog", "orbax", "Traceback", "WARNING:", "I0000", "E0000", "W0000")


def env(**extra) -> dict:
    """A user's environment: no TF_CPP_MIN_LOG_LEVEL from the test process (the command sets its own)."""
    out = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)
    for key in ("TF_CPP_MIN_LOG_LEVEL", "PYTEST_XDIST_WORKER"):
        out.pop(key, None)
    return out


def run(*argv: str, cwd: Path = ROOT, timeout: int = 600, **extra) -> subprocess.CompletedProcess:
    """`python <argv>` as a user would type it; text stdout/stderr."""
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=timeout
    )


def one_line_error(out: subprocess.CompletedProcess, *names: str, status: int = 2) -> str:
    """Assert the command failed with `status` and exactly one stderr line `error: ...` holding `names`."""
    lines = out.stderr.splitlines()
    assert out.returncode == status, (out.returncode, out.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


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
