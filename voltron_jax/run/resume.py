"""Restarting a workdir: refuse a config whose checkpoints could not continue, before anything is written.

`train.run` calls `check(config, workdir)` after proving the workdir writable and before it writes
`config.json` / `run_info.json`. The reference is the workdir's `config.json` (the resolved config of the
run that wrote its checkpoints, completed with today's defaults by `config.complete`). Only phases that
already hold a checkpoint are compared: a phase that never saved may change freely.

What may NOT change for a phase with a checkpoint (it changes parameter shapes or the data stream that
the saved iterator state points into):
  - every `model.*` field except the execution knobs in `MODEL_RUNTIME` (dtype, remat, attention_impl,
    MoE/MoA impl and capacity_factor): sizes, slots and their hyperparameters, scan_layers (the tree
    layout), vocab_size, init and scaling;
  - every `data.*` field except the folders in `DATA_PATHS` (corpus, vocab, seq_len, batch_size,
    mixtures, ordering, clusters, prepare settings);
  - `seed` (the data order of every phase follows it);
  - the phase's place in the recipe (its folder `NN_name`) and its `mixture`, `fan_out`, `init.from_`,
    `init.surgery`; a phase's `overrides` count through the fields above.
What MAY change on resume: `optim.*` (lr, weight decay, clipping ...), `schedule.*`, `train.*` (logging,
eval, checkpoint cadence), `mesh.*` (checkpoints restore onto another mesh), `max_steps`, a phase's
`steps`, `aux_weights.*`, `surgery.*` options and phases that hold no checkpoint yet.
"""

from __future__ import annotations

import json
import os
import re

from etils import epath

from voltron_jax import config as config_lib
from voltron_jax import recipe as recipe_lib
from voltron_jax.errors import ConfigError

MODEL_RUNTIME = frozenset(
    {
        "model.dtype",
        "model.remat",
        "model.attention_impl",
        "model.moe.impl",
        "model.moe.capacity_factor",
        "model.moa.impl",
        "model.moa.capacity_factor",
    }
)
DATA_PATHS = frozenset({"data.cache_dir", "data.tfds_data_dir", "data.token_dir"})
RECIPE_FIELDS = ("mixture", "fan_out", "init.from_", "init.surgery")
STEP_DIR = re.compile(r"^\d+$")
MAX_LISTED = 6


def workdir_path(workdir: str) -> epath.Path:
    """The workdir as train.check_workdir names it: absolute local path or bucket URL (not created)."""
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def guarded(key: str) -> bool:
    """True for a dotted field that must not change on resume (module docstring)."""
    if key == "seed":
        return True
    if key.startswith("model."):
        return key not in MODEL_RUNTIME
    return key.startswith("data.") and key not in DATA_PATHS


def stored_config(workdir: epath.Path):
    """The workdir's saved run config (config.json, completed with today's defaults), or None."""
    path = workdir / "config.json"
    if not path.exists():
        return None
    try:
        return config_lib.complete(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(
            f"{path} is not a readable run config ({type(e).__name__}: {e}); restore it from a "
            "checkpoint's meta or start a new --workdir."
        ) from e


def has_checkpoint(phase_dir: epath.Path) -> bool:
    """A phase folder (or any fan-out member under it) holds at least one saved step."""
    for ckpt in [phase_dir / "ckpt", *(m / "ckpt" for m in _children(phase_dir))]:
        if any(STEP_DIR.match(p.name) for p in _children(ckpt)):
            return True
    return False


def _children(path: epath.Path) -> list[epath.Path]:
    return [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []


def folders(config) -> dict[str, str]:
    """{phase folder name (as train.phases names it): phase name}."""
    return {f"{i:02d}_{name}": name for i, name in enumerate(recipe_lib.phase_order(config.recipe))}


def differences(old, new, workdir: epath.Path) -> list[str]:
    """'field: old -> new' for every guarded difference of a phase that holds a checkpoint."""
    out: list[str] = []
    new_folders = folders(new)
    for folder, name in folders(old).items():
        if not has_checkpoint(workdir / folder):
            continue
        if folder not in new_folders:
            out.append(f"recipe phase {name!r} (folder {folder}) is not at that place in the new recipe")
            continue
        o, n = config_lib.flatten(old.recipe[name].to_dict()), config_lib.flatten(new.recipe[name].to_dict())
        out += [
            f"recipe.{name}.{k}: {o.get(k)!r} -> {n.get(k)!r}" for k in RECIPE_FIELDS if o.get(k) != n.get(k)
        ]
        po = config_lib.flatten(config_lib.phase_config(old, name).to_dict())
        pn = config_lib.flatten(config_lib.phase_config(new, name).to_dict())
        for key in sorted(set(po) | set(pn)):
            if guarded(key) and po.get(key) != pn.get(key):
                out.append(f"{key}: {po.get(key, '<absent>')!r} -> {pn.get(key, '<absent>')!r}")
    return list(dict.fromkeys(out))  # a global field differs in every phase: list it once


def check(config, workdir: epath.Path) -> None:
    """Raise ConfigError (one line, naming the differing fields) when `config` cannot resume `workdir`'s
    checkpoints; reads only, so a refused run leaves the workdir exactly as it was."""
    old = stored_config(workdir)
    if old is None:
        return
    diffs = differences(old, config, workdir)
    if not diffs:
        return
    listed = "; ".join(diffs[:MAX_LISTED]) + (
        f"; and {len(diffs) - MAX_LISTED} more" if len(diffs) > MAX_LISTED else ""
    )
    raise ConfigError(
        f"workdir {workdir} holds checkpoints of another model or data ({listed}): these fields change "
        "parameter shapes or the data, so the run cannot resume. Use a new --workdir, or set them back "
        "(optim, schedule, train, mesh, max_steps and phase steps may change on resume)."
    )
