"""Command-line entry: flags -> train.run(config, workdir).

    voltron --config=configs/tiny.py --workdir=runs/demo [--config.model.d_model=512 ...]
    python -m voltron_jax.main ...            (the same)

--config takes any Python file with get_config(arg), by relative or absolute path, optionally with a
variant (`file.py:arg`); every field can be overridden as --config.<section>.<field>=value (an unknown
field fails with the nearest valid name and the list of valid ones). Errors are one line
(`error: ...`, exit status 2); --debug shows the traceback and every log line, --verbose the libraries'
INFO logs. --dry_run prints the resolved config and the plan (run/plan.py) and exits: nothing compiled,
nothing written.

Multi-host (TPU pods): the same command on every worker; `--multihost` calls jax.distributed.initialize()
(auto-detected on TPU VMs; pass --coordinator/--num_processes/--process_id elsewhere).
"""

from __future__ import annotations

import jax
from absl import flags

from voltron_jax import cli, train
from voltron_jax.data import tasks as data_tasks
from voltron_jax.errors import UsageError
from voltron_jax.run import complete, plan, resume

_CONFIG = flags.DEFINE_string("config", None, "Config file: path/to/file.py[:variant] (a get_config(arg)).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (local path or bucket URL).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else.")
_COORD = flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-host outside TPU VMs).")
_NPROC = flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host outside TPU VMs).")
_PID = flags.DEFINE_integer("process_id", -1, "This process's index (multi-host outside TPU VMs).")
_ONLY = flags.DEFINE_string("only_phase", "", "Run just this recipe phase (its parents must be finished).")
_MEMBER = flags.DEFINE_integer("member", -1, "With --only_phase of a fan-out phase: just this member.")
_CACHE = flags.DEFINE_string("compilation_cache", "", "Persistent XLA compilation cache folder.")
_DRY = flags.DEFINE_bool(
    "dry_run", False, "Print the resolved config and the plan (phases, steps, params, FLOPs, mesh) and exit."
)
_DRY_DEVICES = flags.DEFINE_integer(
    "dry_run_devices", 0, "With --dry_run: plan for this many devices (a pod's) instead of those JAX sees."
)

USAGE = "usage: python -m voltron_jax.main --config=configs/tiny.py --workdir=runs/demo"


def init_distributed() -> None:

    kwargs = {}
    if _COORD.value:
        kwargs = dict(coordinator_address=_COORD.value, num_processes=_NPROC.value, process_id=_PID.value)
    jax.distributed.initialize(**kwargs)


def main(argv) -> int:
    if len(argv) > 1:
        raise UsageError(f"unexpected argument {argv[1]!r}; flags look like --name=value. {USAGE}")
    if _WORKDIR.value is None or _CONFIG.value is None:
        raise UsageError(f"--config and --workdir are required. {USAGE}")
    if not _WORKDIR.value.strip():  # `--workdir=$UNSET`: never train into the current folder
        raise UsageError(f"--workdir is empty (an unset variable?); name the run folder. {USAGE}")
    if _MEMBER.value != -1 and not _ONLY.value:
        raise UsageError(
            "--member needs --only_phase (the fan-out phase it is a member of), e.g. --only_phase=branch."
        )
    # The config (file, overrides, every phase's validation, the workdir's checkpoints) fails before jax
    # starts or anything is written; train.run_checked adds only the device checks.
    config = cli.config_from_argv(_CONFIG.value, cli.overrides())

    checked = resume.check_run(config, _WORKDIR.value, _ONLY.value, _MEMBER.value)
    if _DRY.value:  # nothing compiled, nothing written (run/plan.py)
        devices = _DRY_DEVICES.value or None
        print(
            plan.format_plan(plan.build(checked.config, checked.root, checked.only_phase, devices)),
            flush=True,
        )
        return 0
    finished = complete.finished(checked.config, checked.root, checked.only_phase, checked.member)
    if finished is None and data_tasks.uses_tensorflow(checked.config.data):
        cli.preload(("tensorflow",))  # seqio's TensorFlow, with its C++ start-up lines dropped

    if _CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    if _MULTIHOST.value or _COORD.value:
        init_distributed()

    train.run_checked(checked)
    return 0


def entrypoint() -> None:
    """`python -m voltron_jax.main` and the `voltron` console script."""
    cli.run(main, doc=__doc__)


if __name__ == "__main__":
    entrypoint()
