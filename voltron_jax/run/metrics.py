"""Metric sinks for the train loop: console progress, TensorBoard events and a JSONL log per phase.

The JSONL file (`metrics.jsonl` in each phase folder) is what report and ablation tools read; TensorBoard
is for people. Only process 0 writes.

Resume (issue 16): a run killed after its last checkpoint logged steps it will train again. The writer
of a resumed phase first drops every record past the restored step, from metrics.jsonl and from the
TensorBoard event files (rewritten without them), so both hold one curve; the final evaluation at the
phase's last step is dropped too when the phase resumes there (it is written again). A torn last line
(kill -9 mid-write) is dropped with them.
"""

from __future__ import annotations

import json
import math
import time

import jax
from etils import epath

from voltron_jax.run import events
from voltron_jax.run import workdir as workdir_lib

PEAK_FLOPS = {  # dense bf16 per device (datasheets); used for MFU when train.peak_flops is 0
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v6": 918e12,
}


def peak_flops_per_device(configured: float) -> float:
    """Configured peak, else a datasheet guess from the device kind, else 0 (MFU not reported)."""
    if configured > 0:
        return configured
    kind = jax.devices()[0].device_kind.lower()
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), 0.0)


def device_memory(devices=None) -> dict[str, float]:
    """Peak and current device memory in GiB, the largest over this host's devices (the number to hold
    against launch/aot_compile.py's heap figure); {} where the backend keeps no statistics (CPU)."""
    stats = [d.memory_stats() for d in (jax.local_devices() if devices is None else devices)]
    stats = [s for s in stats if s and "peak_bytes_in_use" in s]
    if not stats:
        return {}
    gib = 2**30
    return {
        "hbm_peak_gib": max(s["peak_bytes_in_use"] for s in stats) / gib,
        "hbm_in_use_gib": max(s.get("bytes_in_use", 0) for s in stats) / gib,
    }


def fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _past(step: int, kind: str, resume: int, end: int) -> bool:
    """Whether a record logged at `step` will be logged again by a run resuming at `resume`."""
    return step > resume or (step == resume == end and kind == "eval")


def truncate_jsonl(path: epath.Path, resume: int, end: int) -> int:
    """Drop the records of metrics.jsonl that a run resuming at step `resume` writes again (and torn
    lines); returns how many were dropped. Atomic: the kept lines go to a new file renamed over it."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            drop = _past(int(rec["step"]), rec.get("kind", "train"), resume, end)
        except (ValueError, KeyError, TypeError):
            drop = True  # a torn line from a killed write
        if drop:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
    return dropped


def truncate_events(tb_dir: epath.Path, resume: int, end: int) -> int:
    """Rewrite the TensorBoard event files of `tb_dir` without the summaries a run resuming at `resume`
    writes again (the effect of a summary writer's purge_step, for every reader); returns how many. A torn
    last record (kill -9 mid-write) counts as one dropped."""
    total = 0
    for path in events.event_files(tb_dir):
        records, intact = events.read_records(path)
        kept, dropped = [], 0 if intact else 1
        for raw in records:
            event = events.event_pb2.Event.FromString(raw)
            tags = [v.tag for v in event.summary.value]
            kind = "eval" if tags and all(t.startswith("eval/") for t in tags) else "train"
            if tags and _past(event.step, kind, resume, end):
                dropped += 1
            else:
                kept.append(raw)
        if dropped:
            events.write_records(path, kept)
            total += dropped
    return total


class MetricWriter:
    """Writes scalars to the console, TensorBoard (tb/) and metrics.jsonl of one phase folder.

    `resume_step`: the step the phase starts (or resumes) at; records past it are dropped first.
    `tracker`: optional experiment tracker (run/tracking.py: log(step, scalars, kind), close()).
    """

    def __init__(
        self,
        phase_dir,
        label: str,
        total_steps: int,
        start_step: int,
        resume_step: int | None = None,
        tracker=None,
    ):
        self.label, self.total, self.start, self.tracker = label, total_steps, start_step, tracker
        self.enabled = jax.process_index() == 0
        self.t0, self.step0 = time.time(), None
        self._tb = None
        if self.enabled:
            if resume_step is not None:
                phase_dir = epath.Path(phase_dir)
                end = start_step + total_steps
                dropped = truncate_jsonl(workdir_lib.metrics_file(phase_dir), resume_step, end)
                truncate_events(workdir_lib.tb_dir(phase_dir), resume_step, end)
                if dropped:
                    past = resume_step - start_step
                    print(f"[{label}] metrics: dropped {dropped} records past step {past}", flush=True)

            self._tb = events.EventWriter(workdir_lib.tb_dir(phase_dir))
            self._jsonl = workdir_lib.metrics_file(phase_dir).open("a")

    def write(self, step: int, scalars: dict[str, float], kind: str = "train"):
        if not self.enabled:
            return
        for k, v in scalars.items():
            self._tb.scalar(f"{kind}/{k}", v, step)
        self._tb.flush()
        self._jsonl.write(json.dumps({"step": step, "kind": kind, **scalars}) + "\n")
        if self.tracker is not None:
            self.tracker.log(step, scalars, kind)
        self._jsonl.flush()

    def progress(self, step: int, scalars: dict[str, float]):
        """One console line: phase, step/total, loss, lr, grad norm, tokens/s, MFU, ETA."""
        if not self.enabled:
            return
        if self.step0 is None:
            self.step0, self.t0 = step, time.time()
        done = step - self.start
        rate = (step - self.step0) / max(time.time() - self.t0, 1e-9)
        if rate > 0:
            eta = (self.total - done) / rate
        else:  # the first line: the window's own step time (compile excluded) until a rate is measured
            eta = (self.total - done) * scalars.get("step_time_s", float("nan"))
        parts = [
            f"[{self.label}] step {done}/{self.total}",
            f"loss {scalars['loss']:.4f}",
            f"lr {scalars['lr']:.2e}",
            f"|g| {scalars['grad_norm']:.3f}",
            f"tok/s {scalars['tokens_per_s']:,.0f}",
        ]
        if scalars.get("mfu"):
            parts.append(f"mfu {scalars['mfu']:.3f}")
        parts.append(f"ETA {fmt_time(eta)}")
        print("  ".join(parts), flush=True)

    def close(self):
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
        if self.tracker is not None:
            self.tracker.close()
