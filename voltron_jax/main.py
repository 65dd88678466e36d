"""Command-line entry: flags -> train.run(config, workdir).

    voltron --config=configs/tiny.py --workdir=runs/demo [--config.model.d_model=512 ...]
    python -m voltron_jax.main ...            (the same)

--config takes any Python file with get_config(arg), by relative or absolute path, optionally with a
variant (`file.py:arg`); every field can be overridden as --config.<section>.<field>=value.

Multi-host (TPU pods): the same command on every worker; `--multihost` calls jax.distributed.initialize()
(auto-detected on TPU VMs; pass --coordinator/--num_processes/--process_id elsewhere).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file: path/to/file.py[:variant] (a get_config(arg)).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (local path or bucket URL).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else.")
_COORD = flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-host outside TPU VMs).")
_NPROC = flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host outside TPU VMs).")
_PID = flags.DEFINE_integer("process_id", -1, "This process's index (multi-host outside TPU VMs).")
_ONLY = flags.DEFINE_string("only_phase", "", "Run just this recipe phase (its parents must be finished).")
_MEMBER = flags.DEFINE_integer("member", -1, "With --only_phase of a fan-out phase: just this member.")
_CACHE = flags.DEFINE_string("compilation_cache", "", "Persistent XLA compilation cache folder.")


def init_distributed() -> None:
    import jax

    kwargs = {}
    if _COORD.value:
        kwargs = dict(coordinator_address=_COORD.value, num_processes=_NPROC.value, process_id=_PID.value)
    jax.distributed.initialize(**kwargs)


def main(argv) -> None:
    del argv
    if _WORKDIR.value is None or _CONFIG.value is None:
        sys.exit("usage: python -m voltron_jax.main --config=configs/tiny.py --workdir=runs/demo")
    import jax

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if _CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    if _MULTIHOST.value or _COORD.value:
        init_distributed()
    from voltron_jax import train
    from voltron_jax.errors import ConfigError

    try:
        train.run(_CONFIG.value, _WORKDIR.value, only_phase=_ONLY.value, member=_MEMBER.value)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def entrypoint() -> None:
    """`python -m voltron_jax.main` and the `voltron` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if any(a in ("-h", "--help", "-?") for a in sys.argv[1:]):
        # absl lists only the flags of the script named in argv[0]; for the console script that is a
        # wrapper, so print this module's flags here.
        print(__doc__.strip() + "\n\nflags:\n" + flags.FLAGS.module_help(__name__))
        sys.exit(0)
    app.run(main)


if __name__ == "__main__":
    entrypoint()
