"""A finished workdir: rerunning its command answers in seconds ("already complete" and the report)
instead of building the model, compiling and evaluating every phase again.

A phase (or fan-out member) is finished when its newest committed checkpoint is its last step, its
metrics.jsonl holds the final validation record at that step (train.py writes it after the last save),
and that checkpoint's files are the ones `seal` recorded when the phase finished (names, sizes and
modification times, in complete.json): a checkpoint damaged or rewritten since sends the rerun the
normal way, which restores with fallback (checkpoint.py) and trains the lost steps again.
Only a rerun with the same config counts: one that changes a field a finished run may take (say
optim.lr) goes the normal way, so config.json records it. The steps compared are those of the command
being rerun: a raised `max_steps` or more steps in a phase make it unfinished.
"""

from __future__ import annotations

import json
import os

from etils import epath

from voltron_jax import recipe as recipe_lib
from voltron_jax.run import checkpoint, report, resume
from voltron_jax.run import workdir as workdir_lib

RECORD_FIELDS = ("step", "kind")


def _plain(c) -> object:
    return json.loads(json.dumps(c.to_dict(), default=str, sort_keys=True))


def latest_committed(phase_dir: epath.Path) -> int | None:
    """The newest committed step in a phase folder's checkpoints (a listing; orbax is not started)."""
    ck = workdir_lib.ckpt_dir(phase_dir)
    if not ck.is_dir():
        return None
    steps = [
        int(p.name) for p in ck.iterdir() if p.name.isdigit() and (p / checkpoint.COMMIT_MARKER).exists()
    ]
    return max(steps, default=None)


def _files(step_dir: epath.Path) -> dict[str, list[int]] | None:
    """{relative path: [size, mtime_ns]} of a local checkpoint step folder; None for a bucket URL (no
    cheap modification times there: such a rerun takes the normal path)."""
    root = os.fspath(step_dir)
    if "://" in root or not os.path.isdir(root):
        return None
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            full = os.path.join(folder, n)
            st = os.stat(full)
            out[os.path.relpath(full, root)] = [st.st_size, st.st_mtime_ns]
    return out


def seal(phase_dir: epath.Path, step: int) -> None:
    """Record that the phase finished at global `step` with the files its final checkpoint has now."""
    files = _files(workdir_lib.ckpt_dir(phase_dir) / str(step))
    if files is not None:
        workdir_lib.write_json(workdir_lib.complete_file(phase_dir), {"step": step, "files": files})


def sealed(phase_dir: epath.Path, step: int) -> bool:
    """True when complete.json says the phase finished at `step` and that checkpoint is unchanged."""
    f = workdir_lib.complete_file(phase_dir)
    try:
        record = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    if record.get("step") != step:
        return False
    return record.get("files") == _files(workdir_lib.ckpt_dir(phase_dir) / str(step))


def final_record(phase_dir: epath.Path, step: int) -> dict | None:
    """The final validation metrics of a phase ended at global `step`, or None if it has none."""
    evals = [r for r in report.read_metrics(phase_dir) if r.get("kind") == "eval" and r.get("step") == step]
    if not evals:
        return None
    return {k: v for k, v in evals[-1].items() if k not in RECORD_FIELDS}


def finished(config, root: epath.Path, only_phase: str = "", member: int = -1) -> dict[str, dict] | None:
    """{phase label: final validation metrics} when every selected phase is finished and the workdir's
    config.json is `config`, else None."""
    stored = resume.stored_config(root)
    if stored is None or _plain(stored) != _plain(config):
        return None
    order = recipe_lib.phase_order(config.recipe)
    results = {}
    for folder, name in workdir_lib.phase_folders(order).items():
        if only_phase and name != only_phase:
            continue
        ph = config.recipe[name]
        end = recipe_lib.phase_start(config.recipe, name, config.max_steps) + recipe_lib.phase_steps(
            ph, config.max_steps
        )
        for mem in range(ph.fan_out) if ph.fan_out else [None]:
            if member not in (-1, mem):
                continue
            d = workdir_lib.member_dir(root / folder, mem)
            final = final_record(d, end) if latest_committed(d) == end and sealed(d, end) else None
            if final is None:
                return None
            results[name if mem is None else f"{name}/{mem}"] = final
    return results or None


def report_finished(config, root: epath.Path, results: dict[str, dict], only_phase: str = "") -> dict:
    """Say the run is complete and show its report (rewritten from the metrics on disk)."""
    steps = sum(recipe_lib.phase_steps(config.recipe[n], config.max_steps) for n in config.recipe)
    what = f"phase {only_phase}" if only_phase else f"all {len(results)} phase(s)"
    print(f"already complete: {what} finished in {root} ({steps} steps); nothing to run.", flush=True)
    if only_phase:
        for label, m in results.items():
            print(f"[{label}] validation loss {m['loss']:.4f}  perplexity {m['perplexity']:.3f}", flush=True)
    else:
        report.write(root, results, config.data.n_clusters if config.train.eval_clusters else 0)
    return results
