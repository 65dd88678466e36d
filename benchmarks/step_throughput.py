"""Train-step throughput of a config on whatever backend is present: tokens/s, step time, MFU, peak memory.

    python benchmarks/step_throughput.py --config=configs/bench_1b.py [--steps=10] [--config.model.remat=full]

Synthetic batches (no data pipeline, no seqio/TensorFlow); the step is the real one from voltron_jax.train,
sharded over all local devices with the config's mesh. MFU uses the analytic FLOPs per token of the
selected slots (3x forward), never XLA's cost analysis (it undercounts scanned layers).
"""

from __future__ import annotations

import json

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
_JSON = flags.DEFINE_string("json", "", "Also append the result as one JSON line to this file.")


def measure(config, steps: int) -> dict:
    from voltron_jax import testing
    from voltron_jax.models import decoder
    from voltron_jax.run import metrics

    c = config
    b, t = c.data.batch_size, c.data.seq_len
    rt, state, batch = testing.runtime(c, steps + 2)
    state, times, m = testing.timed_steps(rt, state, batch, steps)
    dt = float(np.median(times))
    flops = 3 * decoder.flops_per_token(c.model, t) * b * t
    peak = metrics.peak_flops_per_device(c.train.peak_flops) * jax.device_count()
    mem = jax.devices()[0].memory_stats() or {}
    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "n_devices": jax.device_count(),
        "tokens_per_s": b * t / dt,
        "step_time_s": dt,
        "mfu": flops / dt / peak if peak else None,
        "model_tflops_per_step": flops / 1e12,
        "peak_bytes": mem.get("peak_bytes_in_use"),
        "loss": float(m["loss"]),
    }


def main(argv):
    del argv
    res = measure(_CONFIG.value, _STEPS.value)
    print(json.dumps(res, indent=1))
    if _JSON.value:
        with open(_JSON.value, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    app.run(main)
