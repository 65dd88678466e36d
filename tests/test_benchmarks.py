"""The prepared benchmark scripts: the one-call GPU ratios script, the MaxText side-by-side's arithmetic."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from voltron_jax.config import validate
from voltron_jax.models import decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(rel):
    spec = importlib.util.spec_from_file_location(os.path.basename(rel)[:-3], os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu = load("benchmarks/gpu_ratios.py")
aot = load("launch/aot_compile.py")


def test_gpu_ratios_variants_are_dense_each_technique_alone_and_an_equal_active_moe():
    v = gpu.variants(smoke=False)
    assert set(v) == {"dense", *gpu.TECHNIQUES, "moe-capacity", "moe-dropless"}
    dense = v["dense"].model
    assert (dense.d_model, dense.n_layers, dense.d_ff, v["dense"].data.seq_len) == (2048, 24, 5632, 2048)
    slots = dict(
        bitlinear=("linear", "bitlinear"),
        infini=("memory", "infini"),
        denseformer=("residual", "denseformer"),
        mod=("routing", "mod"),
        moa=("attention", "moa"),
    )
    for name, (slot, choice) in slots.items():
        m = v[name].model
        assert m[slot] == choice and dense[slot] != choice
        others = [s for s, _ in slots.values() if s != slot]
        assert all(m[s] == dense[s] for s in others) and m.ffn == "mlp", name
    for impl in ("capacity", "dropless"):
        m = v[f"moe-{impl}"].model
        assert (m.ffn, m.moe.impl, m.moe.n_experts, m.moe.top_k, m.d_ff) == ("moe", impl, 8, 2, 5632 // 2)
        # equal active parameters: the router is the only extra matmul
        extra = decoder.flops_per_token(m, 2048) / decoder.flops_per_token(dense, 2048) - 1
        assert 0 < extra < 0.01
    for c in gpu.variants(smoke=True).values():
        validate(c, n_devices=8)


@pytest.mark.slow
def test_gpu_ratios_smoke_runs_and_writes_the_ratios(tmp_path):
    """--smoke on CPU: dense, one variant, dense again and the plain-JAX anchor run in one call and the
    JSON holds every ratio (the anchor only where it is reachable from the repository)."""
    out = tmp_path / "r.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "gpu_ratios.py"),
        "--smoke",
        "--only=moe-capacity",
    ]
    p = subprocess.run([*cmd, f"--out={out}"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert set(r["variants"]) == {"dense", "moe-capacity", "dense (again, last)"} and r["smoke"]
    assert all(v["tokens_per_s"] > 0 for v in r["variants"].values())
    assert r["ratio_to_dense"]["dense"] == 1.0 and r["ratio_to_dense"]["moe-capacity"] > 0
    assert r["dense_drift"] is not None and r["skipped"] == []
    if gpu.find_anchor(""):
        assert r["plain_jax"]["dense_remat_dots"]["tokens_per_s"] > 0 and r["dense_over_plain_jax"] > 0
    else:
        assert r["plain_jax"] == {"error": "not found"} and r["dense_over_plain_jax"] is None


def test_op_breakdown_reads_cycles_by_class_and_collective_bytes(tmp_path):
    """The per-op cost model from a dump: estimated_cycles summed by class and by (pass, result type), and
    collectives' payload bytes; one block's figures are the difference of two depths."""

    def op(name, shape, kind, path, cycles):
        meta = f'metadata={{op_name="{path}"}}'
        cost = f'backend_config={{"window_config":{{"estimated_cycles":"{cycles}"}}}}'
        return f"  %{name} = {shape}{{2,1,0}} fusion(%p), kind={kind}, {meta}, {cost}"

    lines = [
        op("fusion.1", "bf16[2,4096,5120]", "kOutput", "jit(f)/dot_general", 100),
        op("fusion.2", "bf16[2,4096,5120]", "kOutput", "jit(f)/transpose(jvp())/dot_general", 300),
        op("fusion.3", "f32[8]", "kLoop", "jit(f)/add", 7),
        op("fusion.4", "s32[64]", "kCustom", "jit(f)/sort", 2**63),  # a sentinel, not a cost
        "  %all-gather-start.1 = (f32[80,5120]{1,0}, f32[5120,5120]{1,0}) all-gather-start(%x)",
        "  %all-reduce.2 = bf16[1024]{0} all-reduce(%y), to_apply=%add",
        "  %param.1 = f32[8]{0} parameter(0)",
    ]
    (tmp_path / "module_0001.jit_step.after_codegen.txt").write_text("\n".join(lines) + "\n")
    b = aot.op_breakdown(str(tmp_path))
    assert b["classes"] == {"matmul": 400.0, "elementwise": 7.0}
    assert b["labels"] == {
        "matmul | fwd bf16[2,4096,5120]": 100.0,
        "matmul | bwd bf16[2,4096,5120]": 300.0,
        "elementwise | fwd f32[8]": 7.0,
    }
    assert b["collectives"] == {"all-gather": 4 * (80 + 5120) * 5120, "all-reduce": 2 * 1024}
    assert b["unpriced"] == {"fusion kCustom | fwd s32[64]": 1}
    one = dict(classes={"matmul": 100.0}, labels={}, collectives={})
    per = aot.breakdown_diff(b, one, 2)
    assert per["classes"] == {"matmul": 150.0, "elementwise": 3.5}


def test_side_by_side_summary_extrapolates_both_systems_alike():
    sbs = load("benchmarks/maxtext_side_by_side.py")
    ops = lambda n: dict(classes={"matmul": n}, labels={"matmul | fwd bf16[2]": n}, collectives={})
    run = lambda t, f: dict(cost={"optimal_seconds": t, "flops": f, "bytes accessed": 2 * f}, ops=ops(f))
    s = sbs.summary({1: run(0.077106, 10.0), 2: run(0.130780, 15.0)})  # the MaxText figures
    assert s["per_layer"] == pytest.approx(0.053674) and s["rest"] == pytest.approx(0.023432)
    assert s["step"] == pytest.approx(0.023432 + 40 * 0.053674)
    assert s["tokens_per_s_per_chip"] == pytest.approx(128 * 4096 / s["step"] / 64)
    assert round(s["tokens_per_s_per_chip"]) == 3774 and s["mfu"] == pytest.approx(0.676, abs=1e-3)
    assert (s["layer_flops"], s["layer_bytes"]) == (5.0, 10.0)
    text = sbs.render({"a": s, "b": s}, top=5)
    assert "b / a tokens/s: 1.0000" in text and "| matmul | 5.000 | 5.000 | +0.000 |" in text


def test_side_by_side_moe_rows_take_the_dense_rest_of_the_same_system():
    """--moe: one 1-layer compile per side; its layer is that program minus the side's dense rest, in time,
    flops, bytes and per-op cycles; MFU from the MoE's analytic FLOPs (top-2 of 8 experts, 21.35B active)."""
    sbs = load("benchmarks/maxtext_side_by_side.py")
    assert sbs.MOE_MATMUL_PARAMS == pytest.approx(21.35e9, rel=1e-3)
    assert sbs.MOE_FLOPS_PER_STEP == pytest.approx(6.979e16, rel=1e-3)
    ops = lambda n: dict(
        classes={"matmul": n}, labels={"matmul | fwd bf16[2]": n}, collectives={"all-gather": n}
    )
    run = lambda t, f: dict(cost={"optimal_seconds": t, "flops": f, "bytes accessed": 2 * f}, ops=ops(f))
    dense = sbs.summary({1: run(0.077106, 10.0), 2: run(0.130780, 15.0)})  # MaxText's dense figures
    assert dense["rest_cost"]["flops"] == 5.0 and dense["rest_ops"]["classes"]["matmul"] == 5.0
    s = sbs.summary({1: run(0.129717, 30.0)}, dense, sbs.MOE_FLOPS_PER_STEP)  # its Mixtral block, 1 layer
    assert s["t2"] is None and s["rest"] == dense["rest"]
    assert s["per_layer"] == pytest.approx(0.106285) and s["step"] == pytest.approx(4.2748, abs=1e-4)
    assert round(s["tokens_per_s_per_chip"]) == 1916 and s["mfu"] == pytest.approx(0.556, abs=1e-3)
    assert (s["layer_flops"], s["layer_bytes"]) == (25.0, 50.0)
    assert s["ops"]["classes"] == {"matmul": 25.0} and s["ops"]["collectives"] == {"all-gather": 25.0}
    text = sbs.render({"a": s, "b": s}, top=5)
    assert "| a | 0.129717 / - | 0.106285 |" in text and "b / a tokens/s: 1.0000" in text


def test_side_by_side_libtpu_presets_are_maxtexts_v5p_flags_that_libtpu_accepts():
    """--libtpu_args: MaxText's v5p recipe flags with the one libtpu 0.0.52 refuses on v5p
    (fuse_all_gather=true: FAILED_PRECONDITION) turned off; the other presets extend it; raw flags pass
    through; anything else is one error naming the presets."""
    sbs = load("benchmarks/maxtext_side_by_side.py")
    flags = dict(f.removeprefix("--").split("=") for f in sbs.libtpu_init_args("maxtext_v5p").split())
    assert len(flags) == 10 and flags.pop("xla_tpu_enable_async_collective_fusion_fuse_all_gather") == "false"
    assert flags.pop("xla_tpu_megacore_fusion_allow_ags") == "false"
    assert set(flags.values()) == {"true"} and "xla_tpu_enable_async_collective_fusion" in flags
    for name in ("maxtext_v5p_vmem", "maxtext_v5p_rs"):
        assert sbs.libtpu_init_args(name).startswith(sbs.LIBTPU_PRESETS["maxtext_v5p"] + " --")
    assert "--xla_tpu_scoped_vmem_limit_kib=98304" in sbs.libtpu_init_args("maxtext_v5p_vmem")
    assert sbs.libtpu_init_args("--a=1 --b=2") == "--a=1 --b=2"
    with pytest.raises(SystemExit, match="maxtext_v5p"):
        sbs.libtpu_init_args("maxtext_v6e")


def test_side_by_side_help_names_the_moe_mode():
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "maxtext_side_by_side.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--moe" in p.stdout and "impl=ragged" in p.stdout and "decoder_block=mixtral" in p.stdout
