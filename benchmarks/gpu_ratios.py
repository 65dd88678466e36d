"""One call on a GPU: bench_1b dense, each technique alone, the MoE at equal active parameters, and the
plain-JAX anchor step (../shared/bench/plain_jax_step.py), with every ratio written as JSON.

    python benchmarks/gpu_ratios.py [--out=gpu_ratios.json] [--steps=8] [--budget_s=420]
        [--plain_jax=PATH] [--only=dense,bitlinear,...] [--smoke]

Prepared for a one-H100 lease (<= 8 minutes in all). Each variant is the real train step
(voltron_jax.train.Runtime over all local devices: forward, backward, aux losses, AdamW) on synthetic
batches of configs/bench_1b.py (1.36B dense shape: 24 layers, d 2048, seq 2048, batch 8, bf16, remat
'dots'), compiled, warmed up and timed one after another (each freed before the next, so a 1.36B model and
its optimizer state are on the device once); dense is timed first and again last, and the spread of the two
is reported (drift of a shared or throttling device). Variants:
  dense, bitlinear, infini, denseformer, mod, moa (bench_1b:<name>), moe-capacity and moe-dropless
  (8 experts, top-2, expert d_ff = F / 2: the dense model's active FFN parameters, as
  benchmarks/moe_throughput.py builds them).
The plain-JAX anchor runs as its own process (its variants, among them `dense_remat_dots` at the same
shape and remat as bench_1b dense). Ratios: each variant's tokens/s over dense's, and dense over the
anchor's `dense_remat_dots`. Variants left when `--budget_s` is spent are skipped and listed as such.

On the device machine the folder /work/shared is not in the repository: copy the anchor into a folder that
.git/info/exclude ignores, carry it, and pass --plain_jax=that/plain_jax_step.py (the script looks at
--plain_jax, then shared/bench/ inside the repository, then ../shared/bench/ beside it).

--smoke: tiny shapes (d 64, 2 layers, vocab 256, seq 128, batch 8; the anchor with --small), 2 steps, to
test on CPU that every part runs. No seqio/TensorFlow imports.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import bench_1b  # noqa: E402
from voltron_jax import testing  # noqa: E402
from voltron_jax.models import decoder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TECHNIQUES = ("bitlinear", "infini", "denseformer", "mod", "moa")
ANCHOR_MATCH = "dense_remat_dots"  # the anchor's variant with bench_1b dense's shape and remat


def smoke_shape(c):
    """Shrink a bench_1b config to seconds on a CPU (same slots, same code paths)."""
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 256, 64, 2, 4, 4, 128
    c.data.seq_len, c.data.batch_size = 128, 8
    m.infini.segment_len = 64
    return c


def variants(smoke: bool) -> dict:
    """{name: config}: dense, each technique alone, the MoE at equal active parameters (two dispatches)."""
    make = (lambda v: smoke_shape(bench_1b.get_config(v))) if smoke else bench_1b.get_config
    out = {"dense": make("dense")}
    for name in TECHNIQUES:
        if name == "moa":
            c = make("dense")
            c.model.attention = "moa"
        else:
            c = make(name)
        out[name] = c
    for impl in ("capacity", "dropless"):
        c = make("dense")
        c.model.ffn, c.model.d_ff = "moe", out["dense"].model.d_ff // 2
        c.model.moe.n_experts, c.model.moe.top_k, c.model.moe.impl = 8, 2, impl
        out[f"moe-{impl}"] = c
    return out


def time_variant(c, steps: int) -> dict:
    """Compile, warm up and time the real train step of `c`; tokens/s from the median step time."""
    t0 = time.perf_counter()
    rt, state, batch = testing.runtime(c, steps + 2)
    state, times, m = testing.timed_steps(rt, state, batch, steps)
    dt = float(np.median(times))
    tokens = c.data.batch_size * c.data.seq_len
    out = dict(
        tokens_per_s=tokens / dt,
        step_time_s=dt,
        wall_s=time.perf_counter() - t0,
        loss=float(m["loss"]),
        flops_per_token=3 * decoder.flops_per_token(c.model, c.data.seq_len),
        peak_bytes=(jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
    )
    del rt, state, batch
    gc.collect()
    return out


def find_anchor(given: str) -> str:
    for path in (
        given,
        os.path.join(ROOT, "shared/bench/plain_jax_step.py"),
        os.path.join(ROOT, "../shared/bench/plain_jax_step.py"),
    ):
        if path and os.path.isfile(path):
            return os.path.abspath(path)
    return ""


def run_anchor(path: str, smoke: bool, timeout: float) -> dict:
    """The plain-JAX anchor in its own process: its JSON lines by variant name (errors kept as such)."""
    cmd = [sys.executable, path] + (["--small"] if smoke else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    rows = {}
    for line in p.stdout.splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[r.get("name", "info" if "jax" in r else "matmul" if "matmul_bf16_tflops" in r else "?")] = r
    if p.returncode:
        rows["error"] = (
            f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_ratios.json")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budget_s", type=float, default=420.0, help="stop starting variants after this")
    ap.add_argument("--plain_jax", default="", help="path of plain_jax_step.py")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps: a CPU check that all runs")
    args = ap.parse_args()
    steps = 2 if args.smoke else args.steps
    start = time.perf_counter()
    todo = variants(args.smoke)
    wanted = [w for w in args.only.split(",") if w]
    names = ["dense"] + [n for n in todo if n != "dense" and (not wanted or n in wanted)]
    res = dict(
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
        n_devices=jax.device_count(),
        jax=jax.__version__,
        smoke=args.smoke,
        steps=steps,
        variants={},
        skipped=[],
    )

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    for name in names + ["dense"]:  # dense again last: its drift over the call
        key = "dense (again, last)" if name == "dense" and "dense" in res["variants"] else name
        if left() <= 0 and key != "dense":
            res["skipped"].append(key)
            continue
        try:
            res["variants"][key] = time_variant(todo[name], steps)
        except Exception as e:  # one failing variant must not hide the others
            res["variants"][key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        print(json.dumps({key: res["variants"][key]}), flush=True)
    anchor = find_anchor(args.plain_jax)
    res["plain_jax_path"] = anchor
    res["plain_jax"] = run_anchor(anchor, args.smoke, left() + 120) if anchor else {"error": "not found"}
    dense = res["variants"]["dense"].get("tokens_per_s")
    again = res["variants"].get("dense (again, last)", {}).get("tokens_per_s")
    res["dense_drift"] = again / dense - 1 if dense and again else None
    res["ratio_to_dense"] = {
        k: v["tokens_per_s"] / dense for k, v in res["variants"].items() if dense and "tokens_per_s" in v
    }
    match = res["plain_jax"].get(ANCHOR_MATCH, {}) if isinstance(res["plain_jax"], dict) else {}
    res["dense_over_plain_jax"] = (
        dense / match["tokens_per_s"] if dense and match.get("tokens_per_s") else None
    )
    res["wall_s"] = time.perf_counter() - start
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=float)
    print(
        json.dumps({k: res[k] for k in ("ratio_to_dense", "dense_over_plain_jax", "dense_drift", "skipped")})
    )


if __name__ == "__main__":
    main()
