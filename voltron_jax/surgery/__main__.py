"""Surgery CLI: merge branch checkpoints into one MoE+MoA checkpoint (c-BTX), or upcycle one.

    python -m voltron_jax.surgery merge --branches=runs/x/02_branch/cluster_0/ckpt,... \\
        --config=configs/recipe_tiny.py --out=runs/x/merged [--seed_ckpt=runs/x/00_stable/ckpt]
    python -m voltron_jax.surgery upcycle --branches=runs/x/01_decay/ckpt --config=... --out=...

`--config` describes the TARGET model (model.ffn='moe', model.attention='moa'; n_experts = branches, +1
with --seed_ckpt); overrides such as `--config.model.moe.n_experts=4` work as in voltron_jax.main. Each
branch is read at its latest committed step (or --step). The output is a Checkpointer folder holding
step 0 with state {'params': merged} (no optimizer state: fine-tuning starts it fresh, as in BTX) and
the target config plus the surgery arguments in its metadata. Routers: small random
(model.moe.router_init_std); centroid routers need data: the train loop's merge phases do them
(config.surgery.router_init='centroid'), or see btx.centroid_router_init. The seed is averaged too.
"""

from __future__ import annotations

import jax
from absl import flags

from voltron_jax import cli, surgery
from voltron_jax.errors import UsageError
from voltron_jax.run import checkpoint
from voltron_jax.run import workdir as workdir_lib

USAGE = (
    "usage: python -m voltron_jax.surgery {merge,upcycle} --branches=... --config=... --out=... (see --help)"
)


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("config", None, "Target model config (configs/*.py[:variant]).", flag_values=fv)
    flags.DEFINE_string(
        "branches", None, "Comma-separated branch checkpoint folders (expert order).", flag_values=fv
    )
    flags.DEFINE_string(
        "seed_ckpt", "", "Optional seed checkpoint folder: the last, generalist expert.", flag_values=fv
    )
    flags.DEFINE_string("out", None, "Output checkpoint folder.", flag_values=fv)
    flags.DEFINE_integer("step", -1, "Step to read from every source (-1: latest).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "PRNG seed of the router init.", flag_values=fv)
    return fv


def _params(directory: str, step: int):
    """Host params of a checkpoint folder saved by the train loop (state.params)."""

    with checkpoint.Checkpointer(directory) as ck:
        state, _, _ = ck.restore(step=None if step < 0 else step)
    params = state["params"] if isinstance(state, dict) else getattr(state, "params", None)
    if params is None:
        raise UsageError(
            f"{directory}: the checkpoint state has no 'params'; pass a voltron_jax checkpoint folder."
        )
    return jax.device_get(params)


def main(argv: list[str]) -> int:
    """Entry point; argv[0] is the program name, argv[1] the command ('merge' or 'upcycle')."""

    fv = _flags()
    argv, overrides = cli.split_overrides(argv)
    if any(a in cli.HELP_FLAGS for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + fv.module_help(__name__) + cli.COMMON_HELP)
        return 0
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise UsageError(f"{cli.one_line(e)}; {USAGE}") from e
    if len(rest) != 2 or rest[1] not in ("merge", "upcycle") or not (fv.branches and fv.out and fv.config):
        raise UsageError(USAGE)
    out = workdir_lib.require_new_folder(fv.out)  # never over a phase's checkpoints or a finished merge
    config = cli.config_from_argv(fv.config, overrides)
    dirs = [d for d in fv.branches.split(",") if d]
    sources = [_params(d, fv.step) for d in dirs]
    seed = _params(fv.seed_ckpt, fv.step) if fv.seed_ckpt else None
    shapes = surgery.target_shapes(config)
    key = jax.random.key(fv.seed)
    std = config.model.moe.router_init_std
    if rest[1] == "upcycle":
        if len(sources) != 1 or seed is not None:
            raise SystemExit("upcycle takes exactly one --branches folder and no --seed_ckpt.")
        merged = surgery.upcycle(sources[0], shapes, key=key, router_std=std)
    else:
        merged = surgery.btx_merge(sources, shapes, seed_params=seed, key=key, router_std=std)
    meta = {
        "config": config.to_dict(),
        "surgery": {"command": rest[1], "branches": dirs, "seed_ckpt": fv.seed_ckpt, "seed": fv.seed},
    }
    with checkpoint.Checkpointer(out, keep=1, async_save=False) as ck:
        if not ck.save(0, {"params": merged}, {}, meta, force=True):
            raise checkpoint.CheckpointError(
                f"{out}: step 0 was not written (a step 0 exists there already)."
            )
    print(
        f"wrote {fv.out}/0: {len(dirs)} branches{' + seed' if seed is not None else ''} -> "
        f"{surgery.tree.count(merged):,} params"
    )
    return 0


if __name__ == "__main__":
    cli.run(main, absl_flags=False)
