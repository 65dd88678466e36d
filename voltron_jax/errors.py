"""The project's user-facing error types: each message names the problem and the fix.

A bottom module (no project imports), so every layer can raise them without an import circle.
"""


class ConfigError(ValueError):
    """A config that cannot run; the message names the problem and the fix."""


class RunLocked(RuntimeError):
    """Another live run holds the workdir's lock (runlock.py); the message names it and how to take over."""
