"""Everything pinned in constraints.txt imports together (the seqio / apache-beam / protobuf trap)."""

import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = [
    "jax",
    "flax",
    "optax",
    "orbax.checkpoint",
    "ml_collections",
    "seqio",
    "tensorflow",
    "tensorflow_datasets",
    "sentencepiece",
    "apache_beam",
    "grain",
    "array_record.python.array_record_module",
    "faiss",
    "sklearn",
    "libtpu",
    "matplotlib",
    "tqdm",
    "nbclient",
]


def test_constraints_pin_the_core_stack():
    pins = {
        k.lower().replace("_", "-"): v
        for k, v in (
            line.strip().split("==") for line in open(os.path.join(ROOT, "constraints.txt")) if "==" in line
        )
    }
    for name in (
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "seqio",
        "tensorflow",
        "tensorflow-datasets",
        "ml-collections",
        "sentencepiece",
        "apache-beam",
        "grain",
        "array-record",
        "libtpu",
        "protobuf",
    ):
        assert name in pins, name
    assert pins["sentencepiece"] == "0.2.0"  # 0.2.3 needs protobuf 7; apache-beam caps protobuf < 7


@pytest.mark.slow
def test_everything_imports_together():
    code = "; ".join(f"import {m}" for m in MODULES) + "; print('ok')"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.slow
def test_models_and_bench_import_without_tensorflow_or_seqio():
    code = (
        "import sys; import voltron_jax.models.decoder, voltron_jax.registry; "
        "from voltron_jax import config; c = config.load('configs/bench_1b.py'); "
        "from voltron_jax.models import decoder; decoder.build_model(c.model); "
        "bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    importlib.import_module("voltron_jax")
