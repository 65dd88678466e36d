"""MoE vs dense train-step throughput at equal ACTIVE parameters, on whatever backend is present.

    python benchmarks/moe_throughput.py [--config=configs/bench_1b.py] [--steps=10] [--experts=8]
        [--top_k=2] [--capacity_factor=1.25] [--impls=capacity,dropless] [--json=out.jsonl]

From the base config (default configs/tiny.py, the CPU-sized shape; configs/bench_1b.py on a GPU) it
times the real train step (voltron_jax.train via benchmarks/step_throughput.py: forward, backward, aux
losses, AdamW) of
  - dense:        ffn='mlp', d_ff = F
  - moe-<impl>:   ffn='moe', `experts` experts, top_k, expert d_ff = F / top_k (so the top_k chosen experts
                  hold F hidden units: the same active FFN parameters and FLOPs as dense, plus the router)
and prints tokens/s and the ratio to dense. Synthetic batches; no seqio/TensorFlow imports.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def load_config(spec: str):
    """configs/x.py[:variant] -> ConfigDict (the same syntax as --config of voltron_jax.main)."""
    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg)


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

    from step_throughput import measure

    from voltron_jax.models import decoder

    base = load_config(args.config)
    rows = {}
    for name, c in variants(
        base, args.experts, args.top_k, args.capacity_factor, args.impls.split(",")
    ).items():
        res = measure(c, args.steps)
        res.update(
            variant=name,
            config=args.config,
            d_ff=c.model.d_ff,
            capacity_factor=args.capacity_factor,
            active_flops_per_token=decoder.flops_per_token(c.model, c.data.seq_len),
        )
        rows[name] = res
        print(json.dumps(res), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(res) + "\n")
    dense = rows["dense"]["tokens_per_s"]
    print(f"\n{'variant':<16}{'d_ff':>8}{'tokens/s':>14}{'vs dense':>10}{'active GFLOP/tok':>18}")
    for name, r in rows.items():
        print(
            f"{name:<16}{r['d_ff']:>8}{r['tokens_per_s']:>14,.0f}{r['tokens_per_s'] / dense:>10.2f}"
            f"{r['active_flops_per_token'] / 1e9:>18.4f}"
        )
    print(
        f"backend {rows['dense']['backend']} ({rows['dense']['device']}), {args.config}, "
        f"{args.experts} experts top-{args.top_k}, capacity factor {args.capacity_factor}"
    )


if __name__ == "__main__":
    main()
