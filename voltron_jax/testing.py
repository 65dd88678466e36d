"""Small helpers shared by the tests and the benchmarks: synthetic batches and timed train steps.

    from voltron_jax import config, testing
    c = config.load("configs/tiny.py:test")
    rt, state, batch = testing.runtime(c)             # Runtime of one scratch phase + a global batch
    state, seconds, last_metrics = testing.timed_steps(rt, state, batch, steps=10)

Nothing here reads data from disk: the batch is uniform random token ids in the train loop's layout.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from voltron_jax import sharding, train


def synthetic_batch(config, seed: int = 0, batch_size: int | None = None) -> dict:
    """A host batch in the train loop's layout: random ids in [3, vocab), one document per row, every
    target weighted (`inputs`, `targets` [B,T] int32, `positions`, `segment_ids`, `weights`)."""
    b = config.data.batch_size if batch_size is None else batch_size
    t = config.data.seq_len
    ids = np.random.default_rng(seed).integers(3, config.model.vocab_size, size=(b, t + 1), dtype=np.int32)
    return {
        "inputs": ids[:, :-1],  # [B,T]
        "targets": ids[:, 1:],  # [B,T]
        "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        "segment_ids": np.ones((b, t), np.int32),
        "weights": np.ones((b, t), np.float32),
    }


def runtime(config, steps: int = 10**6, seed: int = 0):
    """(Runtime, scratch TrainState, global synthetic batch) for a one-phase run of `config` on all
    devices (the mesh from `config.mesh`)."""

    rt = train.Runtime(train.Phase("stable", None, config, None, 0, steps))
    return rt, rt.scratch(), sharding.host_batch_to_global(rt.mesh, synthetic_batch(config, seed))


def timed_steps(rt, state, batch, steps: int, warmup: int = 2):
    """Run `warmup` untimed then `steps` timed train steps; returns (state, [seconds per step], the last
    step's metrics)."""

    m = None
    for _ in range(warmup):
        state, m = rt.train_step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = rt.train_step(state, batch)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    return state, times, m
