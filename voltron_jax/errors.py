"""The project's user-facing error types: each message names the problem and the fix.

A bottom module (no project imports), so every layer can raise them without an import circle. Every
error a user can cause (bad config, bad data, a checkpoint that cannot be used, a diverged run) derives
from `VoltronError`; the command-line wrapper (`voltron_jax.cli.run`) prints such an error as one line,
`error: <message>`, and exits with status 2 (the traceback only with `--debug`), or with the error's own
`exit_status` (a diverged run exits with `DIVERGED_EXIT`, so a sweep can tell divergence from failure).
"""

DIVERGED_EXIT = 3  # exit status of a run stopped by a NaN/inf loss (train.NonFiniteLoss)


class VoltronError(Exception):
    """Base of every user-facing voltron_jax error; the message names the problem and the fix."""


class ConfigError(VoltronError, ValueError):
    """A config that cannot run; the message names the problem and the fix."""


class UsageError(VoltronError, ValueError):
    """Bad command-line flags or arguments; the message names the flag and the fix."""


class RunLocked(VoltronError, RuntimeError):
    """Another live run holds the workdir's lock (runlock.py); the message names it and how to take over."""


class Diverged(VoltronError, RuntimeError):
    """Training produced a NaN/inf loss; exits with `DIVERGED_EXIT` (a result for an lr sweep, not a bug)."""

    exit_status = DIVERGED_EXIT
