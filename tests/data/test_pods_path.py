"""docs/pods.md section 0, run as written: raw JSON lines -> to_jsonl -> Beam prepare (DirectRunner) ->
SentencePiece + ArrayRecord token stores -> voltron_jax.main on the 13B preset's data settings with the
model shrunk. Minutes: heavy."""

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHRINK_DATA = "--config.data.spm_vocab_size=800"  # what the preparation and the train loop share
SHRINK_MODEL = " ".join(
    f"--config.{k}={v}"
    for k, v in dict(
        max_steps=1,
        **{
            "data.seq_len": 128,
            "data.batch_size": 8,
            "model.vocab_size": 896,
            "model.d_model": 64,
            "model.n_layers": 2,
            "model.n_heads": 2,
            "model.n_kv_heads": 2,
            "model.head_dim": 32,
            "model.d_ff": 128,
            "model.infini.segment_len": 64,
            "model.dtype": "float32",
            "train.eval_batches": 1,
            "train.loss_chunk": 0,
            "train.ckpt_every": 1,
        },
    ).items()
)


def page_block() -> str:
    text = open(os.path.join(ROOT, "docs", "pods.md")).read()
    m = re.search(r"<!-- pods-data-path -->\s*```bash\n(.*?)```\s*<!-- /pods-data-path -->", text, re.S)
    assert m, "docs/pods.md lost its data-path block"
    return m.group(1)


def raw_c4(folder, n_files=2, per_file=400):
    """C4-shaped raw files: {"text", "url", "timestamp"} JSON lines, gzipped; topical documents."""
    rng = np.random.default_rng(0)
    letters = list("etaoinshrdlcumwfgypbvkjxqz")
    word = lambda: "".join(rng.choice(letters, rng.integers(3, 10)))
    topics = [[word() for _ in range(120)] for _ in range(8)]
    common = [word() for _ in range(400)]
    os.makedirs(folder)
    for f in range(n_files):
        with gzip.open(os.path.join(folder, f"c4-train.{f:05d}-of-{n_files:05d}.json.gz"), "wt") as out:
            for i in range(per_file):
                t = rng.integers(8)
                words = [*rng.choice(topics[t], 60), *rng.choice(common, 60)]
                rng.shuffle(words)
                text = ". ".join(" ".join(words[k : k + 12]).capitalize() for k in range(0, 120, 12)) + "."
                out.write(json.dumps(dict(text=text, url=f"https://ex.com/{f}/{i}", timestamp="2019")) + "\n")


@pytest.mark.heavy
def test_the_pods_data_path_runs_as_written(tmp_path):
    raw, run = tmp_path / "raw", tmp_path / "run"
    raw_c4(str(raw))
    env = dict(
        os.environ,
        RAW=str(raw),
        RUN=str(run),
        DATA_FLAGS=SHRINK_DATA,
        MODEL_FLAGS=SHRINK_MODEL,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",  # the MoE phases' expert axis is 8
        PATH=os.path.dirname(os.path.abspath(sys.executable)) + os.pathsep + os.environ["PATH"],
    )
    script = "set -eo pipefail\n" + page_block()  # as a user shell runs it: unset flags are empty
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    data = run / "data"
    assert (data / "prepare.json").exists() and (data / "spm_800.model").exists()
    (stores,) = (data / "tokens").iterdir()
    assert "-spm-" in stores.name  # tokenised with the SentencePiece model prepare trained
    index = json.loads((stores / "icp" / "index.json").read_text())
    assert index["documents"] > 700 and set(index["segments"]) == {f"cluster_{j}" for j in range(8)}
    phases = sorted(p.name for p in run.iterdir() if re.match(r"\d\d_", p.name))
    assert phases[0] == "00_stable" and (run / "report.md").exists()
    assert (run / "00_stable" / "metrics.jsonl").exists()
