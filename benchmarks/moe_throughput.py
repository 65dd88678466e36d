"""MoE vs dense train-step throughput at equal ACTIVE parameters, on whatever backend is present.

    python benchmarks/moe_throughput.py [--config=configs/bench_1b.py] [--steps=10] [--experts=8]
        [--top_k=2] [--capacity_factor=1.25] [--impls=capacity,dropless] [--json=out.jsonl]

From the base config (default configs/tiny.py, the CPU-sized shape; configs/bench_1b.py on a GPU) it
times the real train step (voltron_jax.train.Runtime: forward, backward, aux losses, AdamW; synthetic
batches) of
  - dense:        ffn='mlp', d_ff = F
  - moe-<impl>:   ffn='moe', `experts` experts, top_k, expert d_ff = F / top_k (so the top_k chosen experts
                  hold F hidden units: the same active FFN parameters and FLOPs as dense, plus the router)
and prints tokens/s, the ratio to dense and the share of MoE assignments dropped (the capacity dispatch
drops what overflows an expert, which also makes its step cheaper; dropless drops none). The variants are
timed in interleaved rounds, so load from other processes hits them alike. No seqio/TensorFlow imports.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from voltron_jax import testing
from voltron_jax.config import load as load_config


def variants(base, experts: int, top_k: int, capacity_factor: float, impls: list[str]) -> dict:
    """{name: config} at equal active FFN parameters."""
    if base.model.d_ff % top_k:
        raise SystemExit(f"d_ff={base.model.d_ff} is not divisible by top_k={top_k}.")
    out = {"dense": base.copy_and_resolve_references()}
    out["dense"].model.ffn = "mlp"
    for impl in impls:
        c = base.copy_and_resolve_references()
        c.model.ffn, c.model.d_ff = "moe", base.model.d_ff // top_k
        c.model.moe.n_experts, c.model.moe.top_k = experts, top_k
        c.model.moe.impl, c.model.moe.capacity_factor = impl, capacity_factor
        out[f"moe-{impl}"] = c
    return out


def measure_interleaved(configs: dict, steps: int) -> dict:
    """Median step time of each variant, timed in rounds (one step of every variant per round), so a
    shared or throttling machine slows all variants alike; also the median per-round ratio to dense."""
    from voltron_jax import sharding, train

    runs = {}
    for name, c in configs.items():
        rt = train.Runtime(train.Phase("stable", None, c, None, 0, steps + 2))
        batch = sharding.host_batch_to_global(rt.mesh, testing.synthetic_batch(c))
        state = rt.scratch()
        for _ in range(2):  # compile + warm-up
            state, m = rt.train_step(state, batch)
        jax.block_until_ready(m["loss"])
        runs[name] = [rt, batch, state, [], []]
    for _ in range(steps):
        for run in runs.values():
            rt, batch, state, times, drops = run
            t0 = time.perf_counter()
            state, m = rt.train_step(state, batch)
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - t0)
            drops.append(float(m.get("moe_drop_rate", 0.0)))
            run[2] = state
    dense = np.asarray(runs["dense"][3])
    out = {}
    for name, (_, _, _, times, drops) in runs.items():
        c = configs[name]
        tokens = c.data.batch_size * c.data.seq_len
        out[name] = {
            "tokens_per_s": tokens / float(np.median(times)),
            "ratio_to_dense": float(np.median(dense / np.asarray(times))),
            "step_time_s": float(np.median(times)),
            "moe_drop_rate": float(np.mean(drops)),  # share of MoE assignments dropped, mean over steps
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--capacity_factor", type=float, default=1.25)
    ap.add_argument("--impls", default="capacity,dropless")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from voltron_jax.models import decoder

    base = load_config(args.config)
    configs = variants(base, args.experts, args.top_k, args.capacity_factor, args.impls.split(","))
    rows = measure_interleaved(configs, args.steps)
    print(f"{'variant':<16}{'d_ff':>8}{'tokens/s':>14}{'vs dense':>10}{'active GFLOP/tok':>18}{'dropped':>9}")
    for name, r in rows.items():
        c = configs[name]
        r.update(
            variant=name,
            config=args.config,
            d_ff=c.model.d_ff,
            capacity_factor=args.capacity_factor,
            backend=jax.default_backend(),
            device=jax.devices()[0].device_kind,
            steps=args.steps,
            active_flops_per_token=decoder.flops_per_token(c.model, c.data.seq_len),
        )
        print(
            f"{name:<16}{r['d_ff']:>8}{r['tokens_per_s']:>14,.0f}{r['ratio_to_dense']:>10.2f}"
            f"{r['active_flops_per_token'] / 1e9:>18.4f}{r['moe_drop_rate']:>9.2%}"
        )
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {args.config}, "
        f"{args.experts} experts top-{args.top_k}, capacity factor {args.capacity_factor}; 'vs dense' is "
        f"the median over {args.steps} rounds of the per-round step-time ratio"
    )


if __name__ == "__main__":
    main()
