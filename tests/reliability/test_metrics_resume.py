"""Issue 16 item 6: a resumed phase drops the metric records past the restored step, from metrics.jsonl
and from the TensorBoard event files, so both hold one curve (fast: on files; the kill -9 run that
produces them is in test_process_faults.py)."""

import json

from tests.reliability.common import event_steps
from voltron_jax.run import metrics


def _jsonl(path, rows, torn=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


def test_jsonl_keeps_records_up_to_the_restored_step(tmp_path):
    rows = [{"step": s, "kind": "train", "loss": 1.0 / s} for s in range(1, 14)]
    rows.insert(10, {"step": 10, "kind": "eval", "loss": 0.5})
    _jsonl(tmp_path / "metrics.jsonl", rows, torn='{"step": 14, "ki')  # kill -9 mid-line
    dropped = metrics.truncate_jsonl(tmp_path / "metrics.jsonl", resume=10, end=20)
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:11] and dropped == 4  # 11..13 and the torn line; step 10's eval stays
    assert metrics.truncate_jsonl(tmp_path / "metrics.jsonl", resume=10, end=20) == 0  # idempotent
    assert metrics.truncate_jsonl(tmp_path / "missing.jsonl", resume=1, end=2) == 0


def test_final_eval_is_dropped_when_resuming_at_the_end(tmp_path):
    rows = [{"step": 8, "kind": "train"}, {"step": 8, "kind": "eval"}]
    _jsonl(tmp_path / "metrics.jsonl", rows)
    metrics.truncate_jsonl(tmp_path / "metrics.jsonl", resume=8, end=8)  # a rerun of a finished phase
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(rows[0]) + "\n"


def test_writer_of_a_resumed_phase_leaves_one_curve(tmp_path):
    w = metrics.MetricWriter(tmp_path, "stable", total_steps=20, start_step=0, resume_step=0)
    for s in range(1, 14):
        w.write(s, {"loss": float(s)})
    w.close()
    w = metrics.MetricWriter(tmp_path, "stable", total_steps=20, start_step=0, resume_step=10)  # resume at 10
    for s in range(11, 21):
        w.write(s, {"loss": float(s)})
    w.close()
    steps = [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(1, 21))
    tb = [s for tag, s in event_steps(tmp_path / "tb") if tag == "train/loss"]
    assert sorted(tb) == list(range(1, 21))
