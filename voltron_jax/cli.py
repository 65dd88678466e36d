"""The one wrapper every command-line entry point runs under: quiet by default, one line per error.

    if __name__ == "__main__":
        cli.run(main, doc=__doc__)          # main(argv) -> int | None

What it does for every command (`voltron_jax.main`, `evaluate`, `surgery`, `data.prepare`,
`data.beam_pipeline`, `ablate`, `export_bitnet`, `eval.passkey`):

- `--debug` (full tracebacks, every log line) and `--verbose` (INFO logs, third-party included) are taken
  out of argv first. Without them the C++ start-up lines of TensorFlow and XLA (oneDNN, CUDA stubs,
  "All log messages before absl::InitializeLog()") are not shown and absl/Orbax logging is at WARNING, so
  a user sees the project's own lines only.
- `--config=file.py[:arg]` plus `--config.<section>.<field>=value` overrides are parsed by
  `voltron_jax.config` itself (`config_from_argv`), so an unknown key names the nearest valid field and
  the list of valid ones, and a missing file is one line.
- Every `voltron_jax.errors.VoltronError` (ConfigError, DataError, CheckpointError, NonFiniteLoss, ...) and
  every bad flag is printed as `error: <message>` and exits with status 2; a file-system error (no such
  file, permission, disk full) the same way with status 1; any other exception is one line naming its
  type, with the hint to rerun with `--debug` for the traceback. KeyboardInterrupt exits 130.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from absl import flags
from absl import logging as absl_logging
from absl.flags import Error as FlagsError

from voltron_jax import config as config_lib
from voltron_jax.errors import ConfigError, UsageError, VoltronError

DEBUG_FLAGS = ("--debug", "--verbose")
HELP_FLAGS = ("-h", "--help", "-?", "--helpfull")
# Third-party loggers that speak at INFO on every save/restore/compile.
NOISY_LOGGERS = ("absl", "orbax", "jax", "tensorflow", "etils", "apache_beam", "matplotlib")
STATE = {"debug": False, "verbose": False}


# ============================================================================ noise


def quiet_env(verbose: bool = False) -> None:
    """Environment for the C++ loggers of TensorFlow / XLA / gRPC; set before they are imported."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("GLOG_minloglevel", "2")


def quiet_logging(verbose: bool = False) -> None:
    """absl and Python loggers of the libraries at WARNING (INFO with --verbose/--debug)."""
    level = logging.INFO if verbose else logging.WARNING
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    # Beam logs a failing step's traceback at ERROR, then re-raises it: the one line below says it.
    logging.getLogger("apache_beam.runners").setLevel(level if verbose else logging.CRITICAL)


@contextlib.contextmanager
def silenced_stderr():
    """File descriptor 2 to /dev/null for the block: TensorFlow's C++ start-up lines are written before
    its log level is read (absl::InitializeLog), so no environment variable reaches them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def tf_devices_quietly() -> None:
    """TensorFlow (seqio's input pipeline) on the CPU only, its devices set up now: the first TF op
    otherwise probes CUDA and prints `E0000 ... failed call to cuInit` on machines without a GPU. The
    accelerators belong to JAX (big_vision hides them from TF the same way). Call with stderr silenced."""
    import tensorflow as tf  # lazy: TensorFlow (preloaded here, quietly, before anything else imports it)

    tf.config.set_visible_devices([], "GPU")
    tf.config.list_logical_devices()  # the device probe happens here, under the caller's silence


def preload(modules: Sequence[str]) -> None:
    """Import `modules` (e.g. tensorflow, which seqio imports later) with their start-up noise dropped.
    An import that fails here is retried where the code needs it, so its error is shown there. With
    --verbose/--debug nothing is dropped."""
    if STATE["verbose"]:
        return
    root = logging.getLogger()
    for name in modules:
        if name in sys.modules:
            continue
        level = root.level
        root.setLevel(logging.ERROR)  # apache_beam warns on the root logger at import (apitools)
        with silenced_stderr():
            try:
                __import__(name)
                if name == "tensorflow":
                    tf_devices_quietly()
            except Exception:  # noqa: BLE001 - shown again, loud, at the real import
                pass
            finally:
                root.setLevel(level)


# ============================================================================ config from argv


def split_overrides(argv: Sequence[str], name: str = "config") -> tuple[list[str], list[tuple[str, str]]]:
    """(argv without them, [(dotted key, text)]) of every `--config.<key>=value` (or `--config.<key>
    value`; a bare `--config.<flag>` means true) in argv."""
    prefix, rest, overrides = f"--{name}.", [], []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest += args[i:]
            break
        if a.startswith(prefix):
            key, eq, value = a[len(prefix) :].partition("=")
            if not eq:
                nxt = args[i + 1] if i + 1 < len(args) else None
                if nxt is not None and not nxt.startswith("--"):
                    value, i = nxt, i + 1
                else:
                    value = "true"
            if not key:
                raise UsageError(f"{a!r}: give a field, e.g. --{name}.optim.lr=1e-3.")
            overrides.append((key, value))
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def load_config(spec: str, overrides: Sequence[tuple[str, str]] = ()):
    """The ConfigDict of `spec` ("file.py[:arg]") with command-line `overrides` applied, each parsed as
    its field's own type. Unknown fields and bad values raise ConfigError naming the valid ones."""
    c = config_lib.load(spec)
    for key, text in overrides:
        value = config_lib.parse_value(c, key, text)
        *path, leaf = key.split(".")
        node = c
        for p in path:
            node = node[p]
        node[leaf] = value
    c.lock()  # a later typo in code fails as loudly as one on the command line
    return c


def config_from_argv(spec: str | None, overrides: Sequence[tuple[str, str]], required: bool = True):
    """The config named by `--config` with the overrides collected by `run` (None when not given)."""
    if not spec:
        if overrides:
            raise UsageError(f"--config.{overrides[0][0]} needs --config=path/to/file.py[:variant] first.")
        if required:
            raise UsageError(
                "--config=path/to/file.py[:variant] is required (e.g. --config=configs/tiny.py)."
            )
        return None
    return load_config(spec, overrides)


# ============================================================================ the wrapper


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (an error's own newlines become '; ')."""
    text = str(e).strip()
    if isinstance(e, KeyError) and len(e.args) == 1:
        text = str(e.args[0])
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


def describe(e: BaseException) -> tuple[str, int]:
    """(the line to print, exit status) for an exception that ends a command."""
    if isinstance(e, VoltronError):
        return f"error: {one_line(e)}", getattr(e, "exit_status", 2)
    if "RESOURCE_EXHAUSTED" in str(e):  # XLA's out-of-memory, raised as a plain runtime error
        first = one_line(e)[:200]
        return (
            f"error: out of device memory ({first}). Lower data.batch_size, or keep it and raise "
            "train.grad_accum_steps (microbatches), set model.remat=full, or use more devices.",
            1,
        )
    if isinstance(e, FlagsError):
        return f"error: {one_line(e)} (see --help)", 2
    if isinstance(e, UnicodeDecodeError):
        return f"error: a file is not UTF-8 text ({one_line(e)}); rerun with --debug to see which", 2
    if isinstance(e, OSError):
        return f"error: {one_line(e)}", 1
    return (
        f"error: {type(e).__name__}: {one_line(e)} (an internal error: rerun with --debug for the "
        "traceback and report it)",
        1,
    )


def run(
    main: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    *,
    doc: str = "",
    absl_flags: bool = True,
    preload_modules: Sequence[str] = (),
) -> None:
    """Run `main(argv)` as a command and exit with its status (never returns).

    absl_flags: parse argv with absl's global FLAGS first (`--help` prints `doc` and this module's flags);
      `--config.*` overrides are collected into `STATE['overrides']` for `config_from_argv`. False: `main`
      parses argv itself (argparse), after --debug/--verbose are removed.
    preload_modules: imported (start-up noise dropped) after the flags parse and before `main`.
    """
    argv = list(sys.argv if argv is None else argv)
    head = argv[: argv.index("--")] if "--" in argv else argv
    debug, verbose = "--debug" in head, "--verbose" in head
    argv = [a for a in head if a not in DEBUG_FLAGS] + argv[len(head) :]
    STATE.update(debug=debug, verbose=verbose or debug)
    quiet_env(verbose or debug)
    try:
        if absl_flags:
            argv = _parse_absl(argv, doc)
        preload(preload_modules)
        quiet_logging(verbose or debug)
        status = main(argv)
    except SystemExit:
        raise
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        line, status = describe(e)
        print(line, file=sys.stderr, flush=True)
        sys.exit(status)
    sys.exit(status or 0)


def _parse_absl(argv: list[str], doc: str) -> list[str]:
    if any(a in HELP_FLAGS for a in argv[1:]):
        # absl's own --help lists only the flags of the script named in argv[0] (a console-script wrapper
        # has none), so print the caller's doc and the flags of the module that defined them.
        own = [m for m in flags.FLAGS.flags_by_module_dict() if not m.startswith("absl")]
        text = "\n".join(flags.FLAGS.module_help(m) for m in own)
        print((doc.strip() + "\n\n" if doc else "") + "flags:\n" + text + COMMON_HELP)
        sys.exit(0)
    argv, overrides = split_overrides(argv)
    if overrides and "config" not in flags.FLAGS:
        raise UsageError(f"--config.{overrides[0][0]}: this command takes no --config (see --help).")
    STATE["overrides"] = overrides
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise UsageError(f"{one_line(e)} (see --help)") from e


COMMON_HELP = """
  --config.<section>.<field>=value: override one config field (e.g. --config.optim.lr=1e-3)
  --debug: full tracebacks and every log line; --verbose: INFO logs of the libraries too"""


def overrides() -> list[tuple[str, str]]:
    """The `--config.*` overrides of this command line (collected by `run`)."""
    return list(STATE.get("overrides", []))


__all__ = ["ConfigError", "UsageError", "config_from_argv", "load_config", "overrides", "run"]
