"""The recipe graph: phases, their parents, dependency order and global start steps.

`config.recipe` maps phase names to `config.phase(...)` entries. A phase names its parents in
`init.from_` (comma-separated); the loop runs phases parents first, and the learning-rate schedule of a
phase continues its first parent's global step (`phase_start`). Instead of phases, `init.from_` may name
one Hugging Face checkpoint folder, `hf:/path/to/model` (`hf_source`): the phase starts from those
weights (voltron_jax/interop/hf_import.py) at global step 0, like a scratch phase. Pure functions of the
config; no I/O.
"""

from __future__ import annotations

import ml_collections

from voltron_jax.errors import ConfigError

HF_PREFIX = "hf:"


def parents(ph: ml_collections.ConfigDict) -> list[str]:
    """The phases that initialise `ph` (empty: it starts from scratch or from a Hugging Face checkpoint)."""
    return [p for p in ph.init.from_.split(",") if p and not p.startswith(HF_PREFIX)]


def hf_source(ph: ml_collections.ConfigDict) -> str:
    """The Hugging Face checkpoint folder that initialises `ph` ('' for none)."""
    hf = [p[len(HF_PREFIX) :] for p in ph.init.from_.split(",") if p.startswith(HF_PREFIX)]
    return hf[0] if hf else ""


def phase_order(recipe: ml_collections.ConfigDict) -> list[str]:
    """Phase names in dependency order (parents first, then recipe order)."""
    names = list(recipe.keys())
    order, seen = [], set()

    def visit(n, stack):
        if n in seen:
            return
        if n in stack:
            raise ConfigError(f"recipe: phases {' -> '.join(stack + [n])} form a cycle.")
        for p in parents(recipe[n]):
            if p not in recipe:
                raise ConfigError(f"recipe.{n}.init.from_ names unknown phase {p!r}; phases are {names}.")
            visit(p, stack + [n])
        seen.add(n)
        order.append(n)

    for n in names:
        visit(n, [])
    return order


def phase_steps(ph: ml_collections.ConfigDict, max_steps: int = 0) -> int:
    """Optimizer steps of phase `ph`, capped by `max_steps` when that is > 0."""
    return min(ph.steps, max_steps) if max_steps > 0 else ph.steps


def phase_start(recipe: ml_collections.ConfigDict, name: str, max_steps: int = 0) -> int:
    """Global step at which `name` starts: its ancestors' steps along the first-parent chain."""
    start, ph = 0, recipe[name]
    while parents(ph):
        p = parents(ph)[0]
        start += phase_steps(recipe[p], max_steps)
        ph = recipe[p]
    return start


def seed_phase(recipe: ml_collections.ConfigDict, name: str) -> str:
    """The seed of merge phase `name` (surgery.seed_expert): the one phase that all its parents (the
    branches) start from."""
    seeds = sorted({g for p in parents(recipe[name]) for g in parents(recipe[p])})
    if len(seeds) != 1:
        raise ConfigError(
            f"recipe.{name}: surgery.seed_expert needs its parents {parents(recipe[name])} to start "
            f"from one seed phase, but they start from {seeds or 'scratch'}; set "
            "surgery.seed_expert=False."
        )
    if recipe[seeds[0]].fan_out:
        raise ConfigError(
            f"recipe.{name}: the seed phase {seeds[0]!r} is a fan-out phase; the seed expert must be one "
            "dense checkpoint."
        )
    return seeds[0]
