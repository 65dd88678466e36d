"""Restarting a workdir: refuse a config whose checkpoints could not continue, before anything is written.

`train.run` calls `check(config, workdir)` after proving the workdir writable and before it writes
`config.json` / `run_info.json`. The reference is the workdir's `config.json` (the resolved config of the
run that wrote its checkpoints, completed with today's defaults by `config.complete`). Only phases that
already hold a checkpoint are compared: a phase that never saved may change freely.

What may NOT change for a phase with a checkpoint (it changes parameter shapes or the data stream that
the saved iterator state points into):
  - every `model.*` field except the execution knobs (`runtime_fields()`: dtype, remat, attention_impl,
    and each slot class's declared RUNTIME_FIELDS, e.g. MoE/MoA impl and capacity_factor): sizes, slots
    and their hyperparameters, scan_layers (the tree layout), vocab_size, init and scaling;
  - every `data.*` field except the folders in `DATA_PATHS` (corpus, vocab, seq_len, batch_size,
    ordering, clusters, prepare settings) and the mixtures the phase did not read (only its own training
    mixture and the validation mixture 'pretrain' are guarded: a typo in a later phase's mixture can be
    fixed without stranding the finished phases);
  - `seed` (the data order of every phase follows it);
  - the phase's place in the recipe (its folder `NN_name`) and its `mixture`, `fan_out`, `init.from_`,
    `init.surgery`; a phase's `overrides` count through the fields above.
What MAY change on resume: `optim.*` (lr, weight decay, clipping ...), `schedule.*`, `train.*` (logging,
eval, checkpoint cadence), `mesh.*` (checkpoints restore onto another mesh), `max_steps`, a phase's
`steps`, `aux_weights.*`, `surgery.*` options and phases that hold no checkpoint yet.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from etils import epath

from voltron_jax import config as config_lib
from voltron_jax import recipe as recipe_lib
from voltron_jax import registry
from voltron_jax.errors import ConfigError
from voltron_jax.run import workdir as workdir_lib

MODEL_RUNTIME = frozenset({"model.dtype", "model.remat", "model.attention_impl"})  # the backbone's knobs
DATA_PATHS = frozenset({"data.cache_dir", "data.tfds_data_dir", "data.token_dir"})
RECIPE_FIELDS = ("mixture", "fan_out", "init.from_", "init.surgery")
STEP_DIR = re.compile(r"^\d+$")
MAX_LISTED = 6


def runtime_fields() -> frozenset[str]:
    """Model fields that only change execution: the backbone's and those each slot class declares."""
    return MODEL_RUNTIME | registry.runtime_fields()


def guarded(key: str) -> bool:
    """True for a dotted field that must not change on resume (module docstring)."""
    if key == "seed":
        return True
    if key.startswith("model."):
        return key not in runtime_fields()
    return key.startswith("data.") and key not in DATA_PATHS


def stored_config(workdir: epath.Path):
    """The workdir's saved run config (config.json, completed with today's defaults), or None."""
    path = workdir_lib.config_file(workdir)
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
    for d in [phase_dir, *workdir_lib.member_dirs(phase_dir)]:
        if any(STEP_DIR.match(p.name) for p in _children(workdir_lib.ckpt_dir(d))):
            return True
    return False


def _children(path: epath.Path) -> list[epath.Path]:
    return [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []


def folders(config) -> dict[str, str]:
    """{phase folder name (as train.phases names it): phase name}."""
    return workdir_lib.phase_folders(recipe_lib.phase_order(config.recipe))


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
        used = {f"data.mixtures.{old.recipe[name].mixture}", "data.mixtures.pretrain"}  # train, eval
        for key in sorted(set(po) | set(pn)):
            if key.startswith("data.mixtures.") and key not in used:
                continue  # a mixture this checkpointed phase never read (a later phase's) may change
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


def corpus_changes(old: dict, new: dict) -> list[str]:
    """'<path>: changed|added|removed' for every embedded-corpus file that differs between two corpus
    manifests (data/corpus.py: manifest); [] when the old run read no embedded file."""
    if old.get("corpus") != "stdlib" and not any(
        "stdlib" in str(v) for v in old.get("mixtures", {}).values()
    ):
        return []

    def files(m: dict) -> dict[str, str]:
        return {f["path"]: f["sha256"] for f in m.get("stdlib", {}).get("files", [])}

    o, n = files(old), files(new)
    return (
        [f"{p}: changed" for p in sorted(o.keys() & n.keys()) if o[p] != n[p]]
        + [f"{p}: added" for p in sorted(n.keys() - o.keys())]
        + [f"{p}: removed" for p in sorted(o.keys() - n.keys())]
    )


def check_corpus(workdir: epath.Path, manifest: dict) -> None:
    """Raise ConfigError (one line) when the corpus the workdir's checkpoints were trained on (its
    run_info.json manifest) differs from today's `manifest`: a resumed data iterator would read other
    documents. Reads only."""
    f = workdir_lib.run_info_file(workdir)
    if not f.exists() or not any(has_checkpoint(d) for d in workdir.iterdir() if workdir_lib.is_phase_dir(d)):
        return
    try:
        old = json.loads(f.read_text()).get("corpus_manifest", {})
    except (ValueError, AttributeError) as e:
        raise ConfigError(
            f"{f} is not readable JSON ({e}); restore it from a checkpoint's meta (run_info is stored "
            "in every checkpoint) or start a new --workdir."
        ) from e
    changes = corpus_changes(old, manifest)
    if changes:
        listed = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
        raise ConfigError(
            f"the corpus changed since the checkpoints in {workdir} were written ({listed}): resuming would "
            f"train on other documents. Use a new --workdir, or resume with the corpus that wrote them "
            f"(Python {old.get('python', '?')}'s standard library, root {old.get('stdlib', {}).get('root')})."
        )


@dataclasses.dataclass(frozen=True)
class CheckedRun:
    """A run that `check_run` accepted: its config, absolute workdir and phase selection."""

    config: Any
    root: epath.Path
    only_phase: str = ""
    member: int = -1


def check_run(config, workdir: str, only_phase: str = "", member: int = -1) -> CheckedRun:
    """Every refusal that needs neither devices nor a write, once per run: the workdir is named, the phase
    selection exists, the run config and each phase's config validate, and the config can continue the
    workdir's checkpoints (`check`). `main` calls it before JAX starts; `train.run` calls it for library
    callers; `train.run_checked` then adds only the device-count checks (config.validate_mesh)."""
    if not str(workdir).strip():
        raise ConfigError("workdir is empty (an unset variable?); name the run folder.")
    if member != -1 and not only_phase:
        raise ConfigError(
            f"member={member} needs only_phase (the fan-out phase it is a member of), e.g. only_phase=branch."
        )
    if only_phase and only_phase not in config.recipe:
        raise ConfigError(f"--only_phase={only_phase!r} is not in the recipe {list(config.recipe)}.")
    config_lib.validate(config)
    for name in recipe_lib.phase_order(config.recipe):
        config_lib.validate(config_lib.phase_config(config, name))
    root = workdir_lib.path(workdir)
    check(config, root)  # another model/data than the checkpoints: refuse before any write
    return CheckedRun(config, root, only_phase, member)
