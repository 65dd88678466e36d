"""MaxText's llama2-13b and the project's plain 13B, AOT-compiled side by side for v5p-128 on this CPU host
with the same libtpu, and compared op by op by the TPU compiler's cost model (never a measurement).

    python benchmarks/maxtext_side_by_side.py [--maxtext_python=/work/maxtext-venv/bin/python]
        [--workdir=/tmp/side_by_side] [--reuse] [--sides=maxtext,project] [--json=out.json]
        [--project_flags="--config.model.remat=full ..."] [--maxtext_flags="num_experts=8 ..."]
        [--libtpu_args=maxtext_v5p | --libtpu_args="--xla_... --xla_..."]

Both sides: batch 128 x 4096, fsdp 64 (pure FSDP over the 64 chips), full remat, fp32 weights and Adam,
bf16 compute, the v5p-128 torus (wraparound on every axis, 2x2x1 chips per host), compiled unrolled at 1
and 2 layers; per-layer cost = the difference, extrapolated to 40 layers.
  - MaxText (pip install 'maxtext[tpu]' into a Python 3.12 venv): `maxtext.trainers.pre_train.train_compile`
    with model_name=llama2-13b compile_topology=v5p-128 per_device_batch_size=2 max_target_length=4096
    ici_fsdp_parallelism=64 remat_policy=full override_model_config=true base_num_decoder_layers=N
    scan_layers=false, its cost analysis from its printout, its HLO from XLA's dump.
  - voltron_jax: `launch/aot_compile.py --config=configs/voltron_13b.py:plain,v5p --topology=v5p:4x4x4
    --estimate --dump_dir=...`, run with TPU_LIBRARY_PATH set to MaxText's libtpu.so, so one compiler
    prices both programs.
Prints each side's optimal_seconds at 1 and 2 layers, per layer, rest, estimated 40-layer step, tokens/s
per chip, MFU (the same analytic formula for both: 3 x (2 x 12.852B matmul params + 40 x 2 x 4096 x 5120
causal attention) per token over 64 x 459 TFLOP/s), flops and bytes accessed per layer; then one layer's
cost-model cycles by op class, its collectives' bytes, and the ops (by pass and result type) whose cycles
differ most between the two. --reuse keeps the compiles already in --workdir (each takes minutes).

--moe adds the MoE side by side at equal active parameters (8 experts of d_ff 13824, top-2, on the same
shape, fsdp 64, full remat), each side compiled at 1 layer and its "rest" taken from its own dense
two-depth compiles in the same --workdir (run or reused first):
  - MaxText: the same train_compile with `decoder_block=mixtral num_experts=8 num_experts_per_tok=2
    base_moe_mlp_dim=13824` (its default MoE path: dropless, sparse_matmul with megablox kernels);
  - voltron_jax: the same aot_compile with `--config.model.ffn=moe --config.model.moe.impl=ragged
    --config.mesh.expert=1 --config.model.remat=full --estimate_depths=1 --estimate_rest=<its dense rest>`
    (the MoE alone, dropless per device).
MFU of the MoE rows uses the MoE's analytic FLOPs (21.35B active matmul parameters per token).
Only their times compare: MaxText's grouped matmuls are megablox (Mosaic) kernels, which carry no
per-op cycles in the dump, so the MoE per-op tables leave them out (docs/results.md, issue 27).
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from launch.aot_compile import breakdown_diff, op_breakdown  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS, TOKENS, CHIPS, PEAK = 40, 128 * 4096, 64, 459e12
MATMUL_PARAMS = LAYERS * (4 * 5120**2 + 3 * 5120 * 13824) + 5120 * 32000  # llama2-13b: 12.852B
ATTENTION_FLOPS = LAYERS * 2 * 4096 * 5120  # per token, causal
FLOPS_PER_STEP = 3 * (2 * MATMUL_PARAMS + ATTENTION_FLOPS) * TOKENS
# the MoE: top-2 of 8 experts of d_ff 13824 in place of the MLP, plus the router: 21.35B active
MOE_MATMUL_PARAMS = MATMUL_PARAMS + LAYERS * (5120 * 8 + 3 * 5120 * 13824)
MOE_FLOPS_PER_STEP = 3 * (2 * MOE_MATMUL_PARAMS + ATTENTION_FLOPS) * TOKENS
MAXTEXT_ARGS = (
    "model_name=llama2-13b compile_topology=v5p-128 compile_topology_num_slices=1 per_device_batch_size=2 "
    "max_target_length=4096 ici_fsdp_parallelism=64 remat_policy=full override_model_config=true "
    "scan_layers=false dataset_type=synthetic run_name=side_by_side"
)
MAXTEXT_MOE_ARGS = "decoder_block=mixtral num_experts=8 num_experts_per_tok=2 base_moe_mlp_dim=13824"
PROJECT_MOE_FLAGS = (
    "--config.model.ffn=moe --config.model.moe.impl=ragged --config.mesh.expert=1 --config.model.remat=full"
)
ENV = dict(
    JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", TF_CPP_MIN_LOG_LEVEL="3", ALLOW_MULTIPLE_LIBTPU_LOAD="1"
)
# --libtpu_args=maxtext_v5p: the LIBTPU_INIT_ARGS of MaxText's v5p recipes (its configs/v5p/*.sh, e.g.
# llama2_7b.sh and 128b.sh, export these before train.py / train_compile.py); train_compile itself adds
# only --xla_tpu_spmd_rng_bit_generator_unsafe=true, and the project's AOT tool adds none. The recipes set
# ..._fuse_all_gather=true, which libtpu 0.0.52 refuses for v5p at compile time (FAILED_PRECONDITION:
# "Continuation fusion for AllGather ... not supported/recommended on platforms other than TPU v5e"), so
# the preset sets it false: the rest of the recipe as it is.
LIBTPU_PRESETS = dict(
    maxtext_v5p=" ".join(
        [
            "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=false",  # see above
            "--xla_tpu_megacore_fusion_allow_ags=false",
            "--xla_enable_async_collective_permute=true",
            "--xla_tpu_enable_ag_backward_pipelining=true",
            "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
            "--xla_tpu_data_parallel_opt_different_sized_ops=true",
            "--xla_tpu_enable_async_collective_fusion=true",
            "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
            "--xla_tpu_overlap_compute_collective_tc=true",
            "--xla_enable_async_all_gather=true",
        ]
    ),
)
# + the scoped-VMEM limit of MaxText's benchmark library for dense models (benchmarks/xla_flags_library.py
# DENSE_VMEM_LIMIT_FLAG, 98304 KiB; its v5p "viperfish" configs give 32768, which compiles the same as none)
LIBTPU_PRESETS["maxtext_v5p_vmem"] = LIBTPU_PRESETS["maxtext_v5p"] + " --xla_tpu_scoped_vmem_limit_kib=98304"
# + the library's all-reduce + dynamic-slice = reduce-scatter layout flags (LAYOUT_FOR_ALL_REDUCE_SCATTER)
LIBTPU_PRESETS["maxtext_v5p_rs"] = LIBTPU_PRESETS["maxtext_v5p"] + (
    " --xla_tpu_use_minor_sharding_for_major_trivial_input=true"
    " --xla_tpu_relayout_group_size_threshold_for_reduce_scatter=1"
    " --xla_tpu_assign_all_reduce_scatter_layout=true"
)


def libtpu_init_args(arg: str) -> str:
    """--libtpu_args: a preset's flags, or the flags themselves (each starting with --)."""
    if arg in LIBTPU_PRESETS:
        return LIBTPU_PRESETS[arg]
    if all(f.startswith("--") for f in arg.split()):
        return arg
    raise SystemExit(f"--libtpu_args={arg!r}: not a preset ({', '.join(LIBTPU_PRESETS)}) nor --flags.")


def maxtext_libtpu(python: str) -> tuple[str, str, str]:
    """(libtpu.so path, libtpu version, jax version) of the MaxText venv."""
    code = (
        "import importlib.metadata as m, libtpu, os; print(os.path.join(os.path.dirname(libtpu.__file__), "
        "'libtpu.so'), m.version('libtpu'), m.version('jax'))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return out[0], out[1], out[2]


def compile_maxtext(
    python: str, depth: int, workdir: str, extra: str, reuse: bool, tag: str = "maxtext"
) -> dict:
    """MaxText's train_compile at `depth` layers: its cost analysis and the per-op breakdown of its dump
    (kept in <workdir>/<tag>_<depth>)."""
    dump = os.path.join(workdir, f"{tag}_{depth}")
    log = dump + ".log"
    if not (reuse and os.path.exists(log) and "Cost analysis:" in open(log).read()):
        base = os.path.join(os.path.dirname(os.path.dirname(python)), "lib")
        yml = glob.glob(os.path.join(base, "python3*", "site-packages", "maxtext", "configs", "base.yml"))[0]
        cmd = [python, "-m", "maxtext.trainers.pre_train.train_compile", yml, *MAXTEXT_ARGS.split()]
        cmd += [
            f"base_num_decoder_layers={depth}",
            f"base_output_directory={workdir}/out",
            *shlex.split(extra),
        ]
        env = dict(os.environ, **ENV, XLA_FLAGS=f"--xla_dump_to={dump}")
        t0 = time.time()
        with open(log, "w") as f:
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
        print(f"{tag} {depth} layer(s): compiled in {time.time() - t0:.0f} s", flush=True)
    text = open(log).read()
    cost = ast.literal_eval(re.search(r"Cost analysis: (\{.*\})", text).group(1))
    cost = {k: float(cost[k]) for k in ("optimal_seconds", "flops", "bytes accessed")}
    return dict(cost=cost, ops=op_breakdown(dump))


def compile_project(
    libtpu: str, workdir: str, extra: str, reuse: bool, tag: str = "project", rest: float | None = None
) -> dict:
    """The project's --estimate under MaxText's libtpu, at 1 and 2 layers, or at 1 layer given the `rest`
    of an earlier two-depth estimate: {depth: {cost, ops}} (dump and JSON in <workdir>/<tag>*)."""
    dump = os.path.join(workdir, tag)
    out = os.path.join(workdir, f"{tag}.jsonl")
    if not (reuse and os.path.exists(out)):
        cmd = [sys.executable, os.path.join(ROOT, "launch", "aot_compile.py")]
        cmd += ["--config=configs/voltron_13b.py:plain,v5p", "--topology=v5p:4x4x4", "--estimate"]
        if rest is not None:
            cmd += ["--estimate_depths=1", f"--estimate_rest={rest!r}"]
        cmd += [f"--dump_dir={dump}", f"--json={out}", *shlex.split(extra)]
        env = dict(os.environ, **ENV, TPU_LIBRARY_PATH=libtpu)
        t0 = time.time()
        with open(os.path.join(workdir, f"{tag}.log"), "w") as f:
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=True)
        print(
            f"{tag} {'1 layer' if rest is not None else '1 and 2 layers'}: compiled in "
            f"{time.time() - t0:.0f} s",
            flush=True,
        )
    with open(out) as f:
        e = json.loads(f.read().strip().splitlines()[-1])
    return {
        int(k): dict(cost=e["cost"][k], ops=op_breakdown(os.path.join(dump, f"depth_{k}"))) for k in e["cost"]
    }


def summary(runs: dict, base: dict | None = None, flops_per_step: float = FLOPS_PER_STEP) -> dict:
    """Per layer, rest, 40-layer step, tokens/s per chip and MFU from the 1- and 2-layer compiles; or,
    with `base` (the same system's dense summary), from a 1-layer compile whose rest (embedding, head,
    loss) is the dense one's: one layer = the 1-layer program minus that rest, in time, flops, bytes and
    per-op cycles alike."""
    keys = ("flops", "bytes accessed")
    t1 = runs[1]["cost"]["optimal_seconds"]
    if base is None:
        t2 = runs[2]["cost"]["optimal_seconds"]
        per, rest = t2 - t1, t1 - (t2 - t1)
        layer = {k: runs[2]["cost"][k] - runs[1]["cost"][k] for k in keys}
        ops = breakdown_diff(runs[2]["ops"], runs[1]["ops"], 1)
    else:
        t2, rest = None, base["rest"]
        per = t1 - rest
        layer = {k: runs[1]["cost"][k] - base["rest_cost"][k] for k in keys}
        ops = breakdown_diff(runs[1]["ops"], base["rest_ops"], 1)
    step = rest + LAYERS * per
    return dict(
        t1=t1,
        t2=t2,
        per_layer=per,
        rest=rest,
        step=step,
        tokens_per_s_per_chip=TOKENS / step / CHIPS,
        mfu=flops_per_step / step / (CHIPS * PEAK),
        layer_flops=layer["flops"],
        layer_bytes=layer["bytes accessed"],
        ops=ops,
        # what the 1-layer program holds besides its layer: the base of a 1-layer (MoE) summary
        rest_cost={k: runs[1]["cost"][k] - layer[k] for k in keys},
        rest_ops=breakdown_diff(runs[1]["ops"], ops, 1),
    )


def render(sides: dict, top: int) -> str:
    names = list(sides)
    lines = [
        "| system | 1 layer / 2 layers (s) | per layer | rest | est. step (40 layers) | tok/s/chip | MFU "
        "| flops per layer (per chip) | bytes accessed per layer |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, s in sides.items():
        t2 = "-" if s["t2"] is None else f"{s['t2']:.6f}"
        lines.append(
            f"| {n} | {s['t1']:.6f} / {t2} | {s['per_layer']:.6f} | {s['rest']:.6f} "
            f"| {s['step']:.4f} | {s['tokens_per_s_per_chip']:,.0f} | {s['mfu']:.3f} "
            f"| {s['layer_flops']:.4g} | {s['layer_bytes']:.4g} |"
        )
    if len(names) == 2:
        a, b = (sides[n] for n in names)
        ratio = b["tokens_per_s_per_chip"] / a["tokens_per_s_per_chip"]
        lines.append(f"\n{names[1]} / {names[0]} tokens/s: {ratio:.4f}")
    for part, unit, scale in (("classes", "cycles", 1), ("collectives", "GiB", 2**30)):
        keys = sorted({k for s in sides.values() for k in s["ops"][part]})
        lines += ["", f"| one layer: {part} ({unit}) | " + " | ".join(names) + " | difference |"]
        lines.append("| --- |" + " --- |" * (len(names) + 1))
        for k in keys:
            v = [sides[n]["ops"][part].get(k, 0.0) / scale for n in names]
            lines.append(f"| {k} | " + " | ".join(f"{x:,.3f}" for x in v) + f" | {v[-1] - v[0]:+,.3f} |")
    labels = {k for s in sides.values() for k in s["ops"]["labels"]}
    diff = {k: [sides[n]["ops"]["labels"].get(k, 0.0) for n in names] for k in labels}
    lines += ["", f"| one layer: the {top} ops whose cycles differ most (class, pass, result type) | "]
    lines[-1] += " | ".join(names) + " | difference |"
    lines.append("| --- |" + " --- |" * (len(names) + 1))
    for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1][-1] - kv[1][0]))[:top]:
        lines.append(f"| {k} | " + " | ".join(f"{x:,.0f}" for x in v) + f" | {v[-1] - v[0]:+,.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--maxtext_python", default=os.environ.get("MAXTEXT_PYTHON", "/work/maxtext-venv/bin/python")
    )
    ap.add_argument("--workdir", default="/tmp/side_by_side")
    ap.add_argument("--reuse", action="store_true", help="keep compiles already in --workdir")
    ap.add_argument("--sides", default="maxtext,project")
    ap.add_argument("--project_flags", default="", help="extra flags of launch/aot_compile.py")
    ap.add_argument("--maxtext_flags", default="", help="extra key=value overrides of train_compile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument(
        "--moe",
        action="store_true",
        help="also the MoE: MaxText's Mixtral block (megablox, dropless) vs model.moe.impl=ragged",
    )
    ap.add_argument(
        "--libtpu_args",
        default="",
        help="LIBTPU_INIT_ARGS for both sides' compiles (the same on both): flags, or a preset name: "
        + ", ".join(LIBTPU_PRESETS),
    )
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.libtpu_args:
        ENV["LIBTPU_INIT_ARGS"] = libtpu_init_args(args.libtpu_args)
    if not os.path.exists(args.maxtext_python):
        raise SystemExit(
            f"MaxText's Python {args.maxtext_python} is missing: python3.12 -m venv /work/maxtext-venv && "
            "/work/maxtext-venv/bin/pip install 'maxtext[tpu]' (or --maxtext_python=...)."
        )
    os.makedirs(args.workdir, exist_ok=True)
    libtpu, libtpu_version, mt_jax = maxtext_libtpu(args.maxtext_python)
    print(f"libtpu {libtpu_version} ({libtpu}) for both sides; MaxText's jax {mt_jax}", flush=True)
    flags = ENV.get("LIBTPU_INIT_ARGS", os.environ.get("LIBTPU_INIT_ARGS", ""))
    print(f"LIBTPU_INIT_ARGS for both sides: {flags or '(none)'}", flush=True)
    wanted = args.sides.split(",")
    dense, moe = {}, {}
    if "maxtext" in wanted:
        mx = lambda k, extra, tag: compile_maxtext(
            args.maxtext_python, k, args.workdir, extra, args.reuse, tag
        )
        base = dense["MaxText llama2-13b"] = summary(
            {k: mx(k, args.maxtext_flags, "maxtext") for k in (1, 2)}
        )
        if args.moe:
            runs = {1: mx(1, f"{args.maxtext_flags} {MAXTEXT_MOE_ARGS}", "maxtext_moe")}
            moe["MaxText Mixtral block, megablox dropless"] = summary(runs, base, MOE_FLOPS_PER_STEP)
    if "project" in wanted:
        base = dense["voltron_jax plain,v5p"] = summary(
            compile_project(libtpu, args.workdir, args.project_flags, args.reuse)
        )
        if args.moe:
            flags = f"{args.project_flags} {PROJECT_MOE_FLAGS}"
            runs = compile_project(libtpu, args.workdir, flags, args.reuse, "project_moe", base["rest"])
            moe["voltron_jax MoE impl=ragged"] = summary(runs, base, MOE_FLOPS_PER_STEP)
    print(render(dense, args.top))
    if moe:
        print("\nMoE, 8 experts top-2 (1 layer, each side's dense rest):\n" + render(moe, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(libtpu=libtpu_version, libtpu_path=libtpu, libtpu_init_args=flags, sides=dense, moe=moe),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
