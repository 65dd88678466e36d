"""The verified-claims GPU preset in one call: WSD vs cosine and the two-stage decay, 10 seeds each,
scored on 128 fixed validation batches, sized for one H100 in <= 12 minutes including every compile.

    python benchmarks/claims_gpu.py [--workdir=runs/claims_gpu] [--jobs=4]
    python benchmarks/claims_gpu.py --smoke      # the same machinery on CPU at configs/tiny.py:test size

Runs `voltron_jax.experiments.ablate --sweep_file=configs/sweeps/claims.py:gpu` (`:gpu_smoke` with
--smoke), writes <workdir>/claims_gpu.md (the two rows with their intervals and minimal detectable
effects) and prints one JSON object: wall seconds, runs, whether it met the 12-minute target, the backend.
`--jobs` runs that many trainings at once (a tiny model leaves most of an H100 idle; the 16 host cores
start the processes). Finished runs are skipped, so a rerun after an interruption resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

from voltron_jax.experiments import ablate

TARGET_S = 12 * 60


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/claims_gpu")
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="CPU check at configs/tiny.py:test size")
    a = p.parse_args(argv)
    sweep = "configs/sweeps/claims.py:" + ("gpu_smoke" if a.smoke else "gpu")
    root = Path(a.workdir)
    out = root / "claims_gpu.md"
    t0 = time.perf_counter()
    ablate.main([f"--sweep_file={sweep}", f"--workdir={root}", f"--claims_out={out}", f"--jobs={a.jobs}"])
    wall = time.perf_counter() - t0
    _, variants, _, _, _ = ablate.load_sweep_file(sweep, None)
    runs = sum(len(v.seeds) for v in variants)
    result = {
        "sweep": sweep,
        "backend": jax.default_backend(),
        "runs": runs,
        "final_eval_batches": max(v.final_eval for v in variants),
        "wall_s": round(wall, 1),
        "target_s": TARGET_S,
        "within_target": wall <= TARGET_S,
        "report": str(out),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
