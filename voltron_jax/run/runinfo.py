"""What makes a run reproducible: resolved config, git commit, package versions, corpus manifest.

Written to the workdir and stored inside every checkpoint, so a checkpoint describes itself.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "ml-collections",
    "seqio",
    "tensorflow",
    "tensorflow-datasets",
    "numpy",
    "sentencepiece",
)


def git_commit() -> str:
    """HEAD commit of the source tree (with '+dirty' when it has local changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def collect(config) -> dict:
    """{'config', 'git_commit', 'versions', 'corpus_manifest'} for a run."""
    from voltron_jax.data import pipeline  # lazy: the data stack

    return {
        "config": config.to_dict(),
        "git_commit": git_commit(),
        "versions": versions(),
        "corpus_manifest": pipeline.corpus_manifest(config),
    }
