"""--dry_run: the resolved config and the plan, from the config alone, with nothing written."""

import os
import subprocess
import sys

from voltron_jax import config as config_lib
from voltron_jax.run import plan as plan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_plan_of_the_recipe(tmp_path):
    c = config_lib.load(os.path.join(ROOT, "configs/recipe_tiny.py"))
    c.max_steps = 5
    p = plan_lib.build(c, tmp_path / "run", n_devices=8)
    names = [x.name for x in p.phases]
    assert names == ["stable", "branch", "mix", "moe_ft"]
    stable, branch, mix, moe = p.phases
    assert stable.starts_from.startswith("scratch") and "parents stable" in branch.starts_from
    assert "surgery" in mix.starts_from and branch.members == c.data.n_clusters
    assert all(x.steps == 5 for x in p.phases if x.configured_steps >= 5)
    assert stable.start == 0 and branch.start == 5 and moe.start > branch.start
    # the MoE phase has more parameters than the dense one (experts), its overrides are listed
    assert moe.params > stable.params > 0 and moe.overrides.get("model.ffn") == "moe"
    assert stable.overrides == {}
    assert stable.batch_per_device * stable.mesh["data"] * stable.mesh["fsdp"] == c.data.batch_size
    assert stable.flops_per_token > 2 * stable.params * 0.5  # at least the matmuls' 2 FLOPs per weight
    text = plan_lib.format_plan(p)
    assert "capped by max_steps" in text and "moe_ft" in text and "nothing written" in text
    assert not (tmp_path / "run").exists()


def test_count_params_matches_an_init():
    import jax
    import jax.numpy as jnp

    from voltron_jax import sharding
    from voltron_jax.models import decoder

    c = config_lib.load(os.path.join(ROOT, "configs/tiny.py:test"))
    model = decoder.build_model(c.model)
    params = model.init(jax.random.key(0), jnp.zeros((1, c.data.seq_len), jnp.int32))["params"]
    real = sum(x.size for x in jax.tree.leaves(sharding.unboxed(params)))
    assert plan_lib.count_params(c.model, c.data.seq_len) == real


def test_dry_run_command_writes_nothing(tmp_path):
    workdir = tmp_path / "demo"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "voltron_jax.main",
            "--config=configs/recipe_tiny.py",
            f"--workdir={workdir}",
            "--dry_run",
            "--config.max_steps=3",
            "--config.data.batch_size=32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "max_steps: 3" in text and "batch_size: 32" in text  # the overrides are in the resolved config
    for name in ("stable", "branch", "mix", "moe_ft"):
        assert f". {name}  [" in text
    assert "params:" in text and "flops/token:" in text and "mesh:" in text and "starts from:" in text
    assert not workdir.exists() and not list(tmp_path.iterdir())
    assert "E0000" not in out.stderr and "Traceback" not in out.stderr


def test_plan_for_a_pod_from_any_host_and_the_runs_own_device_checks(tmp_path):
    import pytest

    from voltron_jax.errors import ConfigError

    c = config_lib.load(os.path.join(ROOT, "configs/voltron_13b.py"))
    p = plan_lib.build(c, tmp_path / "run", n_devices=128)
    stable = p.phases[0]
    assert 12e9 < stable.params < 14e9 and stable.batch_per_device == c.data.batch_size // 128
    assert p.phases[-1].params > 5 * stable.params  # the upcycled MoE
    with pytest.raises(ConfigError, match="not divisible"):  # 128 rows cannot split over 256 shards
        plan_lib.build(c, tmp_path / "run", n_devices=256)
