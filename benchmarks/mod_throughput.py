"""Mixture-of-Depths vs dense train-step throughput at equal parameter count, on whatever backend is present.

    python benchmarks/mod_throughput.py [--config=configs/tiny.py] [--capacity=0.125] [--every=2]
        [--steps=5] [--rounds=3] [--json=out.jsonl] [--set model.scan_layers=True ...]

Builds the real train step (voltron_jax.train.Runtime: forward, backward, aux losses, AdamW) for the base
config (dense) and for routing='mod' (same layers, same parameters plus the router/predictor), then
alternates timed rounds of `steps` steps between the two (dense, MoD, dense, MoD, ...) so that a shared,
busy machine slows both alike, and reports the median tokens/s of each, their ratio and the median of the
per-round ratios, beside the ratio of analytic training FLOPs. Synthetic batches; no seqio/TensorFlow
imports. On one GPU:
    python benchmarks/mod_throughput.py --config=configs/bench_1b.py
(goal from issue 5: MoD at c=0.125 on every other block >= 1.55x dense tokens/s).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np


def timed_round(rt, state, batch, steps: int):
    """Run `steps` train steps; returns (state, seconds per step)."""
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = rt.train_step(state, batch)
    jax.block_until_ready(m["loss"])
    return state, (time.perf_counter() - t0) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--capacity", type=float, default=0.125)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", nargs="*", default=[], help="extra overrides a.b=value for both arms")
    p.add_argument("--json", default="")
    a = p.parse_args()
    from voltron_jax import config, testing
    from voltron_jax.models import decoder

    base = config.load(a.config)
    base = config.apply_overrides(
        base, {k: config.parse_value(base, k, v) for k, _, v in (s.partition("=") for s in a.set)}
    )
    mod = config.apply_overrides(
        base, {"model.routing": "mod", "model.mod.capacity": a.capacity, "model.mod.every": a.every}
    )
    arms = {}
    for name, c in (("dense", base), ("mod", mod)):
        config.validate(c)
        rt, state, batch = testing.runtime(c)
        state, _ = timed_round(rt, state, batch, 2)  # compile + warm-up
        arms[name] = [rt, state, batch, []]
    for _ in range(a.rounds):
        for arm in arms.values():
            arm[1], dt = timed_round(arm[0], arm[1], arm[2], a.steps)
            arm[3].append(dt)
    tokens = base.data.batch_size * base.data.seq_len
    res = {
        "config": a.config,
        "overrides": a.set,
        "capacity": a.capacity,
        "every": a.every,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        **{f"{n}_tokens_per_s": tokens / float(np.median(arm[3])) for n, arm in arms.items()},
        **{f"{n}_step_s_rounds": [round(x, 4) for x in arm[3]] for n, arm in arms.items()},
        "flops_ratio_dense_over_mod": decoder.flops_per_token(base.model, base.data.seq_len)
        / decoder.flops_per_token(mod.model, mod.data.seq_len),
    }
    res["speedup_mod_over_dense"] = res["mod_tokens_per_s"] / res["dense_tokens_per_s"]
    per_round = [d / m for d, m in zip(arms["dense"][3], arms["mod"][3], strict=True)]
    res["speedup_per_round"] = [round(x, 3) for x in per_round]
    res["speedup_median_per_round"] = float(np.median(per_round))
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
