"""Ahead-of-time compile the REAL train step for a TPU topology on a CPU host (libtpu), before renting it.

    python launch/aot_compile.py --config=configs/voltron_13b.py:v4 --topology=v4:4x4x4 [--phase=stable]
        [--step_time=12.5] [--json=out.jsonl] [--config.data.batch_size=256 ...]
    python launch/aot_compile.py --config=configs/voltron_13b.py:plain,v5p --topology=v5p:4x4x4 --estimate

Builds `train.Runtime` for the phase (mesh, model, optimizer, shardings, jitted train step) over the
topology's devices (`jax.experimental.topologies.get_topology_desc`), lowers the step with
`jax.ShapeDtypeStruct` arguments carrying their shardings and compiles it with libtpu. Prints the
parameter count (analytic and from eval_shape), per-device memory against the HBM libtpu reports for the
device, compile time, host RAM used, analytic FLOPs per step (3 x decoder.flops_per_token; XLA's cost
analysis counts a scanned layer once) and the MFU that a measured --step_time would mean.

--estimate: the TPU compiler's cost-model time instead (libtpu's cost_analysis()['optimal_seconds'], an
estimate, never a measurement). It counts a scanned (while-loop) body once, so the step is compiled
unrolled (scan_layers=False) at two small depths of whole super-blocks (--estimate_depths, default 1 and
2: minutes each on a 2-core host, where the 40-layer unrolled step would take far longer); the per-block
cost is their difference, extrapolated to model.n_layers. Prints the estimated step time, tokens/s per
chip and the implied MFU (analytic FLOPs / chip peak / estimated time); refuses to print a number when
the compiler's figures cannot be extrapolated (negative, or not growing with depth). It also prints, per
slice (one device's program), the flops and bytes accessed of each depth and of one block, and the cost
model's per-op breakdown of one block (each scheduled op's estimated_cycles from XLA's dump, by op class
and by pass and result type; the collectives' payload bytes).

Memory, two figures (`judge`): libtpu's heap, from the compile's buffer assignment (parameters + the one
preallocated block of temporaries a TPU program runs in; libtpu refuses a program whose heap exceeds the
HBM with RESOURCE_EXHAUSTED and exactly this figure), which decides "fits"; and the memory analysis sum
(arguments + outputs - aliased + temporaries + code), printed as an upper bound: its temporaries exceed
that block by gigabytes for the 13B configs. A step that does not fit is reported, not raised. Exit
status: 0 fits, 1 does not fit, 2 bad input.

Topologies are libtpu names TYPE:AxB[xC] (chips): v4:2x2x1 (v4-8), v4:4x4x4 (v4-128, 64 chips), v5p:4x4x4
(v5p-128, 64 chips), v5e:2x2, v5e:16x16 (v5e-256), v6e:4x4 ... Devices are what a TPU VM of that type
shows JAX (--chip_config=auto): v4 runs megacore, one device per chip with its 32 GiB (libtpu's own default
for v4 topologies, one device per TensorCore with 16 GiB, is --chip_config=default). The slice is built as
the TPU runtime presents it (`describe`): wraparound links where the pod has them (v4/v5p slices of whole
4x4x4 cubes on every axis, v5e/v6e axes of 16 chips; libtpu alone builds none), 2x2x1 chips per host, and
with --num_slices=N, N slices joined by DCN (the mesh's data axis spans them: --config.mesh.dcn_data=N).

This file is the command line; the work lives beside it: aot_topology.py (the slices), aot_step.py (one
compiled step and its memory verdict), aot_estimate.py (--estimate and the per-op cost model). Their
public names are re-exported here, so `aot_compile.describe`, `.compile_step`, `.estimate` ... keep working.
"""

from __future__ import annotations

import json
import os
import sys

# The sibling modules import one another by name: put launch/ on the path whether this file runs as a
# script, is loaded by path (tests) or imported as launch.aot_compile (benchmarks).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (none of them imports jax at module top)
from aot_estimate import (  # noqa: E402
    breakdown_diff,
    estimate,
    extrapolate,
    op_breakdown,
    op_class,
    op_label,
    render_breakdown,
    render_estimate,
)
from aot_step import (  # noqa: E402
    abstract_batch,
    compile_step,
    cost_of,
    count,
    heap_bytes,
    judge,
    param_counts,
    render,
    select_phase,
)
from aot_topology import (  # noqa: E402
    CHIP_CONFIGS,
    EXAMPLES,
    GIB,
    PEAK_PER_CHIP,
    TORUS_2D_SPAN,
    TORUS_3D,
    Topology,
    TopologyError,
    available_hbm,
    chip_config_for,
    chips,
    describe,
    libtpu_topology,
    query,
    slice_line,
    topology_devices,
)

__all__ = [
    "CHIP_CONFIGS",
    "EXAMPLES",
    "GIB",
    "PEAK_PER_CHIP",
    "TORUS_2D_SPAN",
    "TORUS_3D",
    "Topology",
    "TopologyError",
    "abstract_batch",
    "available_hbm",
    "breakdown_diff",
    "chip_config_for",
    "chips",
    "compile_step",
    "cost_of",
    "count",
    "describe",
    "estimate",
    "extrapolate",
    "heap_bytes",
    "judge",
    "libtpu_topology",
    "main",
    "op_breakdown",
    "op_class",
    "op_label",
    "param_counts",
    "query",
    "render",
    "render_breakdown",
    "render_estimate",
    "select_phase",
    "slice_line",
    "topology_devices",
]


def main(argv) -> int:
    from absl import flags

    from voltron_jax import cli
    from voltron_jax.errors import UsageError

    cfg = flags.DEFINE_string("config", None, "Config file (configs/*.py[:variant]).")
    topo = flags.DEFINE_string("topology", None, "libtpu topology name, e.g. v4:4x4x4 or v5p:4x4x4.")
    phase = flags.DEFINE_string("phase", "", "Recipe phase to compile (default: the first).")
    step_time = flags.DEFINE_float("step_time", 0.0, "Measured seconds per step, for the MFU it implies.")
    json_out = flags.DEFINE_string("json", "", "Append the result as one JSON line to this file.")
    dump = flags.DEFINE_string("dump_dir", "", "Keep XLA's dump (buffer assignment, HLO) in this folder.")
    est = flags.DEFINE_bool(
        "estimate",
        False,
        "Instead of the full step, compile it unrolled at two depths of super-blocks and print the "
        "compiler's cost-model estimate of the full model's step time, tokens/s per chip and MFU.",
    )
    slices = flags.DEFINE_integer(
        "num_slices",
        1,
        "Slices of --topology joined by DCN (multislice); the mesh's data axis spans them: "
        "--config.mesh.dcn_data=N with mesh.data a multiple of N.",
    )
    est_depths = flags.DEFINE_list("estimate_depths", ["1", "2"], "Super-block depths of --estimate.")
    est_rest = flags.DEFINE_float(
        "estimate_rest",
        None,
        "Seconds of the step outside the layers, from an earlier two-depth --estimate of a model of the same "
        "vocabulary, width and batch; then one --estimate_depths value suffices (half the compiles).",
    )
    chip_config = flags.DEFINE_enum(
        "chip_config",
        "auto",
        list(CHIP_CONFIGS),
        "Devices per chip: auto (as a TPU VM of the type: "
        "megacore on v4), megacore, or default (libtpu's: one device per TensorCore on v4).",
    )
    usage = "usage: python launch/aot_compile.py --config=configs/x.py[:variant] --topology=v4:4x4x4"
    argv, overrides = cli.split_overrides(argv)
    if any(a in cli.HELP_FLAGS for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + flags.FLAGS.main_module_help() + cli.COMMON_HELP)
        return 0
    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        raise UsageError(f"{cli.one_line(e)}; {usage}") from e
    if cfg.value is None or not topo.value:
        raise UsageError(usage)
    config = cli.config_from_argv(cfg.value, overrides)
    # TopologyError, ConfigError: one line from voltron_jax.cli
    if est.value:
        depths = tuple(int(d) for d in est_depths.value)
        try:
            e = estimate(
                config,
                topo.value,
                phase.value,
                chip_config.value,
                depths,
                rest=est_rest.value,
                dump_dir=dump.value,
                num_slices=slices.value,
            )
        except ValueError as err:  # depths that cannot be extrapolated, a compile without cost analysis
            raise UsageError(str(err)) from err
        e["config"] = cfg.value
        e["overrides"] = [f"--config.{k}={v}" for k, v in overrides]
        print(render_estimate(e), flush=True)
        if json_out.value:
            with open(json_out.value, "a") as f:
                f.write(json.dumps(dict(e, kind="compiler cost-model estimate"), default=float) + "\n")
        return 0 if e["valid"] else 1
    r = compile_step(
        config,
        topo.value,
        phase.value,
        step_time.value,
        chip_config.value,
        dump_dir=dump.value,
        num_slices=slices.value,
    )
    r["config"] = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    print(render(r), flush=True)
    if json_out.value:
        with open(json_out.value, "a") as f:
            f.write(json.dumps(r, default=float) + "\n")
    return 0 if r["fits"] else 1


if __name__ == "__main__":
    from voltron_jax import cli

    cli.run(main, absl_flags=False)
