"""The workdir layout: the one module that names the folders and files of a run (docs/design.md).

    <workdir>/                      a local path (made absolute) or a bucket URL: `path(workdir)`
      config.json                   the resolved config of the run that wrote the checkpoints (resume.py)
      run_info.json                 config, git commit, package versions, corpus manifest (runinfo.py)
      data/                         prepared data (data/prepare.py; data/prepare.json is its completion mark)
      report.md, losses.png         end-of-run report (report.py)
      NN_<phase>/                   one folder per recipe phase, NN its place in recipe_lib.phase_order
        [cluster_<i>/]              one per member of a fan-out phase
          ckpt/<step>/              Orbax checkpoints (checkpoint.py)
          tb/                       TensorBoard events
          metrics.jsonl             one JSON record per log/eval (metrics.py)
          parents.json              the identity (step, checkpoint) of the parents it was built from
          complete.json             written when the phase finished: its final step and the files of
                                    that checkpoint (run/complete.py: the seconds-long rerun)

Every other module asks this one for a path; none spells a folder name. `write_text`/`write_json` write
a file whole or not at all (a temporary file renamed over it), so a killed process never leaves a
truncated config or marker behind.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from etils import epath

from voltron_jax.errors import UsageError

CONFIG = "config.json"
RUN_INFO = "run_info.json"
DATA = "data"
REPORT = "report.md"
LOSSES = "losses.png"
CKPT = "ckpt"
TB = "tb"
METRICS = "metrics.jsonl"
PARENTS = "parents.json"
COMPLETE = "complete.json"
MEMBER_PREFIX = "cluster_"
PHASE_DIR = re.compile(r"^(\d\d)_(\w+)$")  # not "01_decay.stale": a folder moved aside is no phase


# ============================================================================ the workdir itself


def path(workdir: str | os.PathLike) -> epath.Path:
    """The workdir as every tool names it: an absolute local path (Orbax needs one) or a bucket URL."""
    text = os.fspath(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def config_file(workdir: epath.Path) -> epath.Path:
    return workdir / CONFIG


def run_info_file(workdir: epath.Path) -> epath.Path:
    return workdir / RUN_INFO


def data_dir(workdir: epath.Path) -> epath.Path:
    return workdir / DATA


def report_file(workdir: epath.Path) -> epath.Path:
    return workdir / REPORT


def losses_file(workdir: epath.Path) -> epath.Path:
    return workdir / LOSSES


# ============================================================================ phase and member folders


def phase_folder(index: int, name: str) -> str:
    """'NN_name': the folder of the recipe's `index`-th phase."""
    return f"{index:02d}_{name}"


def phase_folders(order: list[str]) -> dict[str, str]:
    """{folder name: phase name} of the phases in `order` (recipe_lib.phase_order)."""
    return {phase_folder(i, name): name for i, name in enumerate(order)}


def member_dir(phase_dir: epath.Path, member: int | None) -> epath.Path:
    """The folder of fan-out member `member` of a phase (the phase folder itself for None)."""
    return phase_dir if member is None else phase_dir / f"{MEMBER_PREFIX}{int(member)}"


def ckpt_dir(phase_dir: epath.Path) -> epath.Path:
    return phase_dir / CKPT


def tb_dir(phase_dir: epath.Path) -> epath.Path:
    return phase_dir / TB


def metrics_file(phase_dir: epath.Path) -> epath.Path:
    return phase_dir / METRICS


def parents_file(phase_dir: epath.Path) -> epath.Path:
    return phase_dir / PARENTS


def complete_file(phase_dir: epath.Path) -> epath.Path:
    return phase_dir / COMPLETE


def is_phase_dir(p: epath.Path) -> bool:
    return bool(PHASE_DIR.match(p.name)) and p.is_dir()


def member_dirs(phase_dir: epath.Path) -> list[epath.Path]:
    """The fan-out member folders under a phase folder, by member index ([] when it has none)."""
    if not phase_dir.is_dir():
        return []
    found = [p for p in phase_dir.iterdir() if p.is_dir() and _member_index(p.name) is not None]
    return sorted(found, key=lambda p: _member_index(p.name))


def _member_index(name: str) -> int | None:
    rest = name[len(MEMBER_PREFIX) :] if name.startswith(MEMBER_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def run_dirs(workdir: epath.Path) -> dict[str, epath.Path]:
    """{label: folder} of every phase folder on disk, in recipe order (fan-out members as 'name/i')."""
    out = {}
    if not workdir.is_dir():
        return out
    for d in sorted(p for p in workdir.iterdir() if is_phase_dir(p)):
        name = PHASE_DIR.match(d.name).group(2)
        members = member_dirs(d)
        for m in members or [d]:
            out[name if m is d else f"{name}/{_member_index(m.name)}"] = m
    return out


def is_workdir(p: epath.Path) -> bool:
    """A folder a training run wrote: it holds config.json, run_info.json or an NN_phase folder."""
    if not p.is_dir():
        return False
    return config_file(p).exists() or run_info_file(p).exists() or any(is_phase_dir(c) for c in p.iterdir())


def require_new_folder(target: str | os.PathLike, flag: str = "--out") -> epath.Path:
    """`target` as an absolute path, refusing (UsageError, nothing written) a folder that exists and is
    not empty: a tool writes only into a folder it creates, never over a user's checkpoints or run."""

    out = path(target)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag}={target} is a file; pass a new folder. Nothing was written.")
    if out.is_dir() and any(True for _ in out.iterdir()):
        what = "a training run's workdir" if is_workdir(out) else "not empty"
        ckpt = " (it holds checkpoints)" if any(n.name.isdigit() for n in out.iterdir()) else ""
        raise UsageError(
            f"{flag}={target} is {what}{ckpt}; pass a new or empty folder (the tool never writes over "
            "existing files). Nothing was written."
        )
    return out


# ============================================================================ atomic writes


def write_text(target: str | os.PathLike, text: str) -> None:
    """Write `text` to `target` whole or not at all: a temporary file next to it, renamed over it (POSIX
    rename is atomic). A bucket object is written in one upload, which is atomic by itself."""
    target = epath.Path(target)
    if "://" in os.fspath(target):
        target.write_text(text)
        return
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(target: str | os.PathLike, obj: Any, **kwargs) -> None:
    """`write_text` of `json.dumps(obj, indent=2, sort_keys=True, **kwargs)`."""
    write_text(target, json.dumps(obj, **{"indent": 2, "sort_keys": True, **kwargs}))
