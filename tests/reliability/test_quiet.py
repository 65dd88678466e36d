"""Issue 16 item 8: a user sees only the project's own lines by default; --verbose / --debug show the
libraries' logs again."""

from __future__ import annotations

import pytest

from tests.reliability.common import NOISE, one_line_error, run


@pytest.mark.slow
def test_tensorflow_start_up_lines_are_not_shown(tmp_path):
    """evaluate imports TensorFlow (seqio) before it reads the run: the oneDNN / CUDA / absl::InitializeLog
    lines TF writes from C++ at import were ~6 lines on every command."""
    (tmp_path / "config.json").write_text("{}")
    out = run("-m", "voltron_jax.experiments.evaluate", f"--workdir={tmp_path}", "--batches=0")
    line = one_line_error(out, "--batches=0")
    assert not any(n in line for n in NOISE)


@pytest.mark.slow
@pytest.mark.heavy  # a multi-process end-to-end run: make test-heavy (CI runs it), keeping make test < 15 min
def test_export_bitnet_prints_its_own_lines_only(tmp_path):
    """export_bitnet restores an Orbax checkpoint: 67 lines of Orbax INFO before; none now."""
    w = tmp_path / "run"
    train = run(
        "-m",
        "voltron_jax.main",
        "--config=configs/tiny.py:test",
        f"--workdir={w}",
        "--config.model.linear=bitlinear",
        "--config.max_steps=1",
    )
    assert train.returncode == 0 and train.stderr == "", train.stderr[-3000:]
    out = run(
        "-m",
        "voltron_jax.inference.export_bitnet",
        f"--phase_dir={w / '01_decay'}",
        f"--out={tmp_path / 'packed'}",
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr[-3000:]
    assert out.stdout.startswith("linear weights:") and len(out.stdout.splitlines()) == 1
    verbose = run(
        "-m",
        "voltron_jax.inference.export_bitnet",
        f"--phase_dir={w / '01_decay'}",
        f"--out={tmp_path / 'packed2'}",
        "--verbose",
    )
    assert (
        verbose.returncode == 0 and verbose.stderr.count("\n") > 5
    )  # the libraries' INFO is there on request
