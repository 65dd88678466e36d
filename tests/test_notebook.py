"""notebooks/quickstart.ipynb runs end to end against a real (tiny) two-phase training run."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.heavy  # a multi-process end-to-end run: make test-heavy (CI runs it), keeping make test < 15 min
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    workdir = tmp_path / "demo"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "voltron_jax.main",
            "--config=configs/tiny.py:test",
            f"--workdir={workdir}",
            "--config.max_steps=4",
            "--config.train.eval_batches=1",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, XLA_FLAGS=""),
    )
    monkeypatch.setenv("VOLTRON_WORKDIR", str(workdir))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()
    text = "\n".join(
        out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert "01_decay/ckpt step 8" in text  # the last phase with a checkpoint, by default
    assert "'linear': 'dense'" in text and "'stable': 8" in text and "'decay': 4" in text
    # the stored config says which steps ran beside the configured ones (max_steps=4 capped stable's 8)
    assert "steps run (max_steps=4): {'stable': 4, 'decay': 4}" in text
    # only the notebook's own output: no TensorFlow / XLA / absl start-up lines in any cell
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            body = out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
            for noise in ("absl::InitializeLog", "cuda", "oneDNN", "E0000", "I0000", "W0000", "tensorflow"):
                assert noise not in body, (noise, body[:500])
    assert "mean NLL" in text and "{'stable':" in text and "'decay':" in text  # curves of both phases
    assert any(
        out.get("data", {}).get("image/png")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def test_quickstart_notebook_needs_no_path_hack():
    import json

    nb = json.load(open(os.path.join(ROOT, "notebooks", "quickstart.ipynb")))
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "sys.path" not in code and "import voltron_jax" in code  # the installed package
