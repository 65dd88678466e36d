"""What a run says while it works: the start banner and one status line per silent stretch.

    [run] 8 cpu device(s) (cpu), 1 process(es); 2 phase(s), 12 steps
    [stable] 107,200 params (107k), 197k FLOPs/token forward (x3 trained), mesh data=8 x ..., ...
    [stable] compiling the train step ...
    [stable] compiling the train step: 11.2 s

A stretch says what it is once it has been silent for `Stage.after` seconds (a timer), and how long it
took when it ends; shorter ones say nothing (VOLTRON_STATUS_AFTER=<seconds> changes `after`). Only
process 0 prints (every host runs the same code).
"""

from __future__ import annotations

import math
import os
import threading
import time

import jax

from voltron_jax import recipe as recipe_lib
from voltron_jax import sharding
from voltron_jax.models import decoder
from voltron_jax.run import plan as plan_lib


def say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)


def banner_line(config) -> str:
    """Devices, processes, the phases and their steps."""
    devs = jax.devices()
    kind = devs[0].device_kind if devs else "?"
    steps = sum(
        recipe_lib.phase_steps(config.recipe[n], config.max_steps) * max(config.recipe[n].fan_out, 1)
        for n in config.recipe
    )
    return (
        f"[run] {len(devs)} {devs[0].platform} device(s) ({kind}), {jax.process_count()} process(es); "
        f"{len(config.recipe)} phase(s), {steps} steps"
    )


def phase_line(label: str, c, abstract_params) -> str:
    """A phase's parameter count, FLOPs per token, mesh and batch per shard, from its compiled runtime's
    abstract parameters (no device memory read)."""
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
    mesh = sharding.resolve_mesh(c.mesh, jax.device_count())
    shards = mesh["data"] * mesh["fsdp"] * mesh["expert"]
    fpt = decoder.flops_per_token(c.model, c.data.seq_len)
    return (
        f"[{label}] {n:,} params ({plan_lib.human(n)}), {plan_lib.human(fpt)} FLOPs/token forward "
        f"(x3 trained), mesh {' x '.join(f'{a}={v}' for a, v in mesh.items())}, "
        f"{c.data.batch_size // shards} rows per batch shard"
    )


class Stage:
    """A status line once a stretch has run `after` seconds, and its duration when it ends (`done()` or
    `with`); a stretch shorter than `after` prints nothing."""

    after = float(os.environ.get("VOLTRON_STATUS_AFTER", "2"))  # 0: every stretch (tests)

    def __init__(self, label: str, what: str, after: float | None = None):
        self.label, self.what, self.t0 = label, what, time.time()
        self.said, self.open = False, True
        self._timer = threading.Timer(self.after if after is None else after, self._say)
        self._timer.daemon = True
        self._timer.start()

    def _say(self) -> None:
        self.said = True
        say(f"[{self.label}] {self.what} ...")

    def done(self) -> float:
        dt = time.time() - self.t0
        if self.open:
            self._timer.cancel()
            self._timer.join()
            self.open = False
            if self.said:
                say(f"[{self.label}] {self.what}: {dt:.1f} s")
        return dt

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.done()
        return False
