"""Infini-attention vs plain causal attention: train-step tokens/s at the same sequence length.

    python benchmarks/infini_throughput.py [--config=configs/tiny.py] [--seq_lens=1024,2048]
        [--segment_len=64] [--batch=2] [--steps=5] [--rounds=2] [--json=out.jsonl]

For each sequence length it times the real train step (voltron_jax.train via
benchmarks/step_throughput.py: forward, backward, AdamW) of
  - plain:          memory='none' (causal attention over the whole row)
  - infini-linear:  memory='infini', rule='linear' (prefix sum over segments)
  - infini-delta:   memory='infini', rule='delta' (lax.scan over segments, rematerialised)
  - local:          memory='infini', rule='none' (segment-local attention only: the memory's own cost is
                    infini-linear minus this)
and prints tokens/s, the ratio to plain and the analytic forward GFLOP per token. Each variant runs
`rounds` times and its best round counts (the machine may be shared). Synthetic batches.
"""

from __future__ import annotations

import argparse
import json

VARIANTS = {
    "plain": ("none", ""),
    "infini-linear": ("infini", "linear"),
    "infini-delta": ("infini", "delta"),
    "local": ("infini", "none"),
}


def variant(base, seq_len: int, segment_len: int, batch: int, memory: str, rule: str):
    c = base.copy_and_resolve_references()
    c.data.seq_len, c.data.batch_size = seq_len, batch
    c.mesh.data = 1
    c.model.memory = memory
    c.model.infini.segment_len = segment_len
    if rule:
        c.model.infini.rule = rule
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--seq_lens", default="1024,2048")
    ap.add_argument("--segment_len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import jax
    from step_throughput import measure  # a sibling script: benchmarks/ is sys.path[0]

    from voltron_jax import config
    from voltron_jax.models import decoder

    base = config.load(args.config)
    names = args.variants.split(",")
    table = []
    for t in (int(s) for s in args.seq_lens.split(",")):
        best = {}
        for _ in range(args.rounds):
            for name in names:
                c = variant(base, t, args.segment_len, args.batch, *VARIANTS[name])
                res = measure(c, args.steps)
                if name not in best or res["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = dict(
                        res,
                        variant=name,
                        seq_len=t,
                        segment_len=args.segment_len,
                        gflops_per_token=decoder.flops_per_token(c.model, t) / 1e9,
                    )
        for name in names:
            print(json.dumps(best[name]), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(best[name]) + "\n")
        table += [best[n] for n in names]
    print(f"\n{'seq_len':>8} {'variant':<15}{'tokens/s':>12}{'vs plain':>10}{'fwd GFLOP/tok':>15}")
    for r in table:
        plain = next(x for x in table if x["seq_len"] == r["seq_len"] and x["variant"] == "plain")
        print(
            f"{r['seq_len']:>8} {r['variant']:<15}{r['tokens_per_s']:>12,.0f}"
            f"{r['tokens_per_s'] / plain['tokens_per_s']:>10.2f}{r['gflops_per_token']:>15.4f}"
        )
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {args.config}, "
        f"segment {args.segment_len}, batch {args.batch}, best of {args.rounds} rounds x {args.steps} "
        "steps (after 2 warm-up steps)"
    )


if __name__ == "__main__":
    main()
