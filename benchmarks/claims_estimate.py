"""How long the verified-claims sweep takes on this host, from its step counts and measured per-step
times, without running it.

    python benchmarks/claims_estimate.py [--sweep_file=configs/sweeps/claims.py] [--jobs=2] \
        [--measure --workdir=/tmp/claims_estimate]  |  [--rates='{"train_flops_s": ..., ...}']

Every run the sweep would start is enumerated (each arm's lr-sweep points, its remaining seeds at the
best lr, the per-batch final scoring of each final run, and the evaluation-only arms), with its training
FLOPs (ablate.training_flops), its evaluation FLOPs (the loop's evaluations every train.eval_every steps,
the final scoring, a c-BTM ensemble's every branch) and its number of steps. Seconds per run are
    overhead_s + steps * max(step_floor_s, train FLOPs per step / train_flops_s) + eval FLOPs / eval_flops_s
(a process's start and compiles; the training steps, where a small model is bound by the per-step floor
rather than by FLOPs; forward passes), and the sweep takes their sum / jobs (2 runs at once on the 2-core
host share its cores; `--measure` measures with the CPU as it is, other users' load included). A process
whose programs an earlier process of the sweep already compiled (the other seeds of an arm at its best lr,
an arm without an lr grid after its first seed, a scoring of a model shape already scored) finds them in
the sweep's shared compilation cache (ablate.child_env) and pays `overhead_warm_s` instead (default:
overhead_s). `--measure`
trains configs/tiny.py for 8 and 24 steps and at d=32 for 24 steps (per-step times: each run's median
logged tokens/s; overhead: the rest of its wall time) and scores one run on 8 and 32 batches, all with one
compilation cache under --workdir that starts empty, then trains the 8-step run again with that cache
warm (overhead_warm_s). Prints a
table per arm and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from voltron_jax import config as config_lib
from voltron_jax.experiments import ablate
from voltron_jax.experiments.claims_doc import enumerate_runs, run_costs, seconds  # noqa: F401 (its API)
from voltron_jax.models import decoder


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def _median_tokens_per_s(d: Path) -> float:
    """Median training tokens/s of a finished run's log records, leaving out the last one (the one-step
    decay phase, whose time is mostly its compile)."""
    from voltron_jax.experiments.ablate import read_run  # lazy: keeps --rates from importing twice

    return float(np.median([r["tokens_per_s"] for r in read_run(d)["train"] if "tokens_per_s" in r][:-1]))


def measure(workdir: Path) -> dict:
    """The four rates from three short real runs (configs/tiny.py for 8 and 24 steps, at d=32 for 24) and
    two scorings (8 and 32 batches): the per-step time is the runs' own median tokens/s (what the loop
    logs), the overhead what remains of each run's wall time, the eval rate the difference of the two
    scorings; all with one compilation cache under `workdir` (empty at first, as a sweep's first process
    finds it), then the 8-step run once more with it warm (`overhead_warm_s`)."""
    py = [sys.executable, "-m", "voltron_jax.main", "--config=configs/tiny.py"]
    c = config_lib.load("configs/tiny.py")
    fpt = decoder.flops_per_token(c.model, c.data.seq_len)
    tokens = 8 * c.data.seq_len
    flags = ["--config.data.batch_size=8", "--config.train.eval_every=1000", "--config.recipe.decay.steps=1",
             "--config.schedule.warmup=2"]  # fmt: skip
    narrow = ["--config.model.d_model=32", "--config.model.n_heads=1", "--config.model.n_kv_heads=1",
              "--config.model.d_ff=96"]  # fmt: skip
    if any(workdir.iterdir() if workdir.is_dir() else ()):
        raise SystemExit(f"--workdir={workdir} is not empty: --measure needs fresh run folders and cache.")
    env = ablate.child_env(workdir)  # the sweep's shared cache, empty now
    walls, per_step = {}, {}
    runs = (("d256_8", 8, []), ("d256_24", 24, []), ("d32", 24, narrow), ("d256_8_warm", 8, []))
    for name, steps, extra in runs:
        d = workdir / name
        walls[name] = (_timed([*py, f"--workdir={d}", f"--config.recipe.stable.steps={steps - 1}", *flags,
                               *extra], env), steps)  # fmt: skip
        per_step[name] = tokens / _median_tokens_per_s(d)
    warm = walls.pop("d256_8_warm")
    overhead = float(np.mean([w - n * per_step[k] for k, (w, n) in walls.items()]))
    ev = [sys.executable, "-m", "voltron_jax.experiments.evaluate", f"--workdir={workdir / 'd256_24'}"]
    e = {b: _timed([*ev, f"--batches={b}"], env) for b in (8, 32)}
    return {
        "overhead_s": overhead,
        "overhead_warm_s": warm[0] - warm[1] * per_step["d256_8"],
        "train_flops_s": 3 * fpt * tokens / per_step["d256_24"],
        "step_floor_s": per_step["d32"],
        "eval_flops_s": 24 * tokens * fpt / max(e[32] - e[8], 1e-3),
        "measured": {
            "wall_s": {**{k: w for k, (w, _) in walls.items()}, "d256_8_warm": warm[0]},
            "step_s": per_step,
            "eval_8_s": e[8],
            "eval_32_s": e[32],
        },  # fmt: skip
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep_file", default="configs/sweeps/claims.py")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--measure", action="store_true")
    p.add_argument("--workdir", default="/tmp/claims_estimate")
    p.add_argument("--rates", default="", help="JSON of the four rates (from an earlier --measure)")
    a = p.parse_args(argv)
    if a.measure:
        rates = measure(Path(a.workdir))
    elif a.rates:
        rates = json.loads(a.rates)
    else:
        raise SystemExit("give --measure (runs five short trainings/scorings) or --rates='{...}'.")
    runs = enumerate_runs(a.sweep_file)
    by_arm: dict[str, list[float]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], []).append(seconds(r, rates))
    warm = {}
    for r in runs:
        warm[r["arm"]] = warm.get(r["arm"], 0) + r["warm"]
    print("| arm | processes (warm cache) | seconds (one at a time) |\n| --- | --- | --- |")
    for arm, xs in by_arm.items():
        print(f"| {arm} | {len(xs)} ({warm[arm]}) | {sum(xs):,.0f} |")
    total = sum(sum(xs) for xs in by_arm.values())
    result = {
        "sweep": a.sweep_file,
        "processes": len(runs),
        "warm_processes": sum(r["warm"] for r in runs),
        "train_steps": sum(r["steps"] for r in runs),
        "serial_h": round(total / 3600, 2),
        "jobs": a.jobs,
        "wall_h": round(total / 3600 / a.jobs, 2),
        "rates": rates,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
