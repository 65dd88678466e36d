"""The plan of a run, as `--dry_run` prints it: resolved config and, per phase in order, its steps,
parameters, FLOPs per token, mesh, batch per device, data mixture and what it starts from.

    python -m voltron_jax.main --config=configs/recipe_tiny.py --workdir=runs/demo --dry_run

Built from the config alone: parameter counts come from `jax.eval_shape` of the model's init (no
parameter is allocated, nothing is compiled) and the workdir is only read (which phases already have a
checkpoint, so a rerun resumes them). Nothing is written.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from voltron_jax import config as config_lib
from voltron_jax import recipe as recipe_lib
from voltron_jax import sharding
from voltron_jax.models import decoder
from voltron_jax.run import resume
from voltron_jax.run import workdir as workdir_lib


@dataclasses.dataclass
class PhasePlan:
    name: str
    folder: str
    start: int  # global step
    steps: int  # effective (max_steps applied)
    configured_steps: int
    members: int  # fan_out, 1 for a plain phase
    params: int
    flops_per_token: float  # forward; a training step costs ~3x
    mesh: dict[str, int]
    batch: int  # global
    batch_per_device: int
    grad_accum: int
    seq_len: int
    mixture: str  # the mixture name and its spec ("corpus:0.7,pydoc:0.3")
    starts_from: str  # "scratch", "parents stable (surgery btx_merge)", "its checkpoint (resume)"
    overrides: dict[str, object]  # the fields this phase changes against the run config


@dataclasses.dataclass
class Plan:
    config: ml_collections.ConfigDict
    workdir: str
    devices: int
    phases: list[PhasePlan]

    @property
    def total_steps(self) -> int:
        return sum(p.steps * p.members for p in self.phases)


def count_params(model_cfg, seq_len: int) -> int:
    """Parameters of the decoder for `model_cfg`, from the shapes of its init (nothing allocated)."""
    model = decoder.build_model(model_cfg)
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    shapes = jax.eval_shape(lambda k: model.init(k, dummy), jax.random.key(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(sharding.unboxed(shapes["params"])))


def _flat(c: ml_collections.ConfigDict) -> dict:
    return {k: v for k, v in config_lib.flatten(c.to_dict()).items() if not k.startswith("recipe.")}


def _starts_from(config, name: str, phase_dir: epath.Path, members: int) -> str:
    dirs = [workdir_lib.member_dir(phase_dir, m) for m in (range(members) if members > 1 else [None])]
    done = sum(resume.has_checkpoint(d) for d in dirs)
    ph = config.recipe[name]
    parents = recipe_lib.parents(ph)
    if parents:
        how = f"parents {', '.join(parents)}"
        how += f" (surgery {ph.init.surgery})" if ph.init.surgery else ""
        how += (
            ", optimizer kept" if ph.init.keep_optimizer and len(parents) == 1 and not ph.init.surgery else ""
        )
    else:
        how = f"scratch (seed {config.seed})"
    if done:
        how += f"; resumes its checkpoint in {phase_dir.name}" + (
            f" ({done}/{len(dirs)} members)" if members > 1 else ""
        )
    return how


def build(
    config: ml_collections.ConfigDict, workdir, only_phase: str = "", n_devices: int | None = None
) -> Plan:
    """The plan of `config` run in `workdir` on `n_devices` (default: the devices JAX sees)."""
    n = jax.device_count() if n_devices is None else n_devices
    root = workdir_lib.path(workdir)
    base, out = _flat(config), []
    counted: dict[tuple, int] = {}
    order = recipe_lib.phase_order(config.recipe)
    for folder, name in workdir_lib.phase_folders(order).items():
        if only_phase and name != only_phase:
            continue
        pc = config_lib.phase_config(config, name)
        ph = config.recipe[name]
        config_lib.validate_mesh(pc, n)  # the run's own device checks: a plan it would refuse fails here
        mesh = sharding.resolve_mesh(pc.mesh, n)
        shards = mesh["data"] * mesh["fsdp"] * mesh["expert"]
        key = (repr(pc.model.to_dict()), pc.data.seq_len)
        if key not in counted:
            counted[key] = count_params(pc.model, pc.data.seq_len)
        flat = _flat(pc)
        members = max(int(ph.fan_out), 1)
        out.append(
            PhasePlan(
                name=name,
                folder=folder,
                start=recipe_lib.phase_start(config.recipe, name, config.max_steps),
                steps=recipe_lib.phase_steps(ph, config.max_steps),
                configured_steps=int(ph.steps),
                members=members,
                params=counted[key],
                flops_per_token=float(decoder.flops_per_token(pc.model, pc.data.seq_len)),
                mesh=mesh,
                batch=pc.data.batch_size,
                batch_per_device=pc.data.batch_size // shards,
                grad_accum=pc.train.grad_accum_steps,
                seq_len=pc.data.seq_len,
                mixture=ph.mixture
                if ph.mixture == "cluster"
                else f"{ph.mixture} = {pc.data.mixtures.get(ph.mixture, ph.mixture)}",
                starts_from=_starts_from(config, name, root / folder, members),
                overrides={k: v for k, v in flat.items() if base.get(k, object()) != v},
            )
        )
    return Plan(config, str(root), n, out)


def human(x: float) -> str:
    """12345678 -> '12.3M'."""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def format_plan(plan: Plan, show_config: bool = True) -> str:
    """The text `--dry_run` prints: the resolved config, then one block per phase."""
    lines = []
    if show_config:
        lines += ["# resolved config (after command-line overrides)", str(plan.config).rstrip(), ""]
    lines.append(
        f"# plan: {len(plan.phases)} phase(s), {plan.total_steps} steps, {plan.devices} device(s), "
        f"workdir {plan.workdir}"
    )
    for i, p in enumerate(plan.phases):
        steps = f"{p.steps} steps (global {p.start}..{p.start + p.steps})"
        if p.steps != p.configured_steps:
            steps += f", configured {p.configured_steps}, capped by max_steps"
        if p.members > 1:
            steps += f", x{p.members} members"
        mesh = " x ".join(f"{a}={v}" for a, v in p.mesh.items())
        lines += [
            f"{i + 1}. {p.name}  [{p.folder}]",
            f"   steps:       {steps}",
            f"   params:      {p.params:,} ({human(p.params)})",
            f"   flops/token: {human(p.flops_per_token)} forward, {human(3 * p.flops_per_token)} train",
            f"   mesh:        {mesh}",
            f"   batch:       {p.batch} x {p.seq_len} tokens global, {p.batch_per_device} rows per batch "
            f"shard, {p.grad_accum} microbatch(es)",
            f"   data:        {p.mixture}",
            f"   starts from: {p.starts_from}",
        ]
        if p.overrides:
            lines.append("   overrides:   " + ", ".join(f"{k}={v!r}" for k, v in sorted(p.overrides.items())))
    lines.append("dry run: nothing compiled, nothing written.")
    return "\n".join(lines)
