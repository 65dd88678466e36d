"""--estimate: the TPU compiler's cost-model step time (libtpu's optimal_seconds, never a measurement).

`estimate` compiles the step unrolled at two small depths of super-blocks and extrapolates
(`extrapolate`) to the model's depth; `op_breakdown` reads the per-op cost model (each scheduled op's
estimated_cycles and the collectives' payload) from XLA's dump, `breakdown_diff` takes one block's share,
`render_estimate` prints it all. The CLI is launch/aot_compile.py --estimate.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import tempfile

from aot_step import compile_step, select_phase
from aot_topology import GIB, PEAK_PER_CHIP, chips, describe, slice_line


def extrapolate(points: dict, n_blocks: float, rest: float | None = None) -> dict:
    """Step time of `n_blocks` super-blocks from compiles at two depths {blocks: seconds}: per-block cost
    = the difference over the depth difference, the rest (embedding, head, loss, the other collectives)
    = the shallow compile minus its blocks. With `rest` given (another model's, same vocabulary, width
    and batch), one depth suffices: per-block = (time - rest) / blocks. 'valid' is False, with the
    reason, when a figure cannot be extrapolated (a negative or non-finite time, a deeper compile not
    slower)."""
    if rest is not None and len(points) == 1:
        ((k1, t1),) = points.items()
        k2, t2 = 0, rest
        per_block = (t1 - rest) / k1
    elif len(points) == 2:
        (k1, t1), (k2, t2) = sorted(points.items())
        per_block = (t2 - t1) / (k2 - k1)
    else:
        raise ValueError(
            f"--estimate needs two different depths (or one and --estimate_rest), got {sorted(points)}."
        )
    base = t1 - k1 * per_block
    out = dict(per_block_s=per_block, base_s=base, step_s=base + n_blocks * per_block, valid=True, why="")
    bad = [k for k, t in points.items() if not math.isfinite(t) or t <= 0]
    if bad:
        why = f"the compiler's optimal_seconds is {points[bad[0]]:.4g} at {bad[0]} blocks"
        out.update(valid=False, why=why)
    elif per_block <= 0:
        why = f"the deeper compile is not slower ({t2:.4g} s at {k2}, {t1:.4g} s at {k1})"
        out.update(valid=False, why=why)
    elif out["step_s"] <= 0:
        out.update(valid=False, why=f"the extrapolated step time is {out['step_s']:.4g} s")
    return out


def estimate(
    config,
    topology: str,
    phase_name: str = "",
    chip_config: str = "auto",
    depths=(1, 2),
    log=print,
    rest: float | None = None,
    dump_dir: str = "",
    num_slices: int = 1,
) -> dict:
    """The TPU compiler's cost-model estimate of the full model's step time (never a measurement): compile
    the step unrolled (scan_layers=False) at two small depths of whole super-blocks, take the per-block
    cost from their optimal_seconds difference and extrapolate to model.n_layers. With `dump_dir`, XLA's
    dump of each depth's compile is kept in <dump_dir>/depth_<k> (to read the unrolled block's HLO)."""
    from voltron_jax.models import decoder

    phase = select_phase(config, phase_name)
    c = phase.config
    m = c.model
    size = decoder.super_block_size(m)
    n_blocks = m.n_layers / size
    points, runs = {}, {}
    if len(set(depths)) != (1 if rest is not None else 2) or min(depths) < 1:
        raise ValueError(
            f"--estimate_depths={list(depths)}: give two different depths >= 1 (e.g. 1,2), or one with "
            "--estimate_rest."
        )
    for k in depths:
        ck = c.copy_and_resolve_references()
        ck.model.n_layers, ck.model.scan_layers = k * size, False
        log(f"estimate: compiling {k} super-block(s) of {size} layer(s), unrolled ...")
        keep = contextlib.nullcontext(os.path.join(dump_dir, f"depth_{k}")) if dump_dir else None
        with keep or tempfile.TemporaryDirectory(prefix="aot_estimate_") as dump:
            r = compile_step(
                config,
                topology,
                phase.name,
                chip_config=chip_config,
                phase_config=ck,
                heap=False,
                dump_dir=dump,
                num_slices=num_slices,
            )
            r["ops"] = op_breakdown(dump)  # the per-op cost model, read before a temporary dump goes
        if not r.get("cost"):
            raise ValueError(f"the compile at {k} super-blocks reported no cost analysis ({r.get('error')}).")
        points[k], runs[k] = r["cost"]["optimal_seconds"], r
        log(f"estimate: {k} super-block(s): optimal_seconds {points[k]:.4g}, compile {r['compile_s']:.0f} s")
    ex = extrapolate(points, n_blocks, rest)
    tokens = c.data.batch_size * c.data.seq_len
    n_chips = num_slices * chips(topology)
    flops = 3 * decoder.flops_per_token(m, c.data.seq_len) * tokens
    peak = n_chips * PEAK_PER_CHIP.get(topology.split(":")[0], float("nan"))
    est = dict(
        topology=topology,
        phase=phase.name,
        super_block=size,
        n_blocks=n_blocks,
        depths=list(depths),
        optimal_seconds={str(k): v for k, v in points.items()},
        compile_s={str(k): runs[k]["compile_s"] for k in depths},
        batch=c.data.batch_size,
        seq_len=c.data.seq_len,
        chips=n_chips,
        flops_per_step=flops,
        peak_flops=peak,
        rest_given=rest,
        num_slices=num_slices,
        descriptor=describe(topology, chip_config, num_slices)._asdict(),
        # per slice (one device's program): the cost model's flops and bytes, per depth and per block
        cost={str(k): runs[k]["cost"] for k in depths},
        ops={str(k): runs[k]["ops"] for k in depths},
        **ex,
    )
    if len(depths) == 2:
        lo, hi = sorted(depths)
        est["cost_per_block"] = {
            key: (runs[hi]["cost"].get(key, 0.0) - runs[lo]["cost"].get(key, 0.0)) / (hi - lo)
            for key in runs[hi]["cost"]
        }
        est["ops_per_block"] = breakdown_diff(runs[hi]["ops"], runs[lo]["ops"], hi - lo)
    if ex["valid"]:
        est.update(tokens_per_s_per_chip=tokens / ex["step_s"] / n_chips, mfu=flops / ex["step_s"] / peak)
    return est


def render_estimate(e: dict) -> str:
    head = (
        f"COMPILER COST-MODEL ESTIMATE (libtpu optimal_seconds, extrapolated; not a measurement): "
        f"{e['topology']}, phase {e['phase']}, batch {e['batch']} x {e['seq_len']}, "
        f"{e['n_blocks']:g} super-blocks of {e['super_block']} layer(s)"
    )
    pts = ", ".join(f"{k} blocks {v:.4g} s" for k, v in e["optimal_seconds"].items())
    lines = [
        head,
        "  " + slice_line(e["descriptor"]),
        f"  compiled unrolled at {pts}; per block {e['per_block_s']:.4g} s, rest {e['base_s']:.4g} s"
        + (" (given: --estimate_rest)" if e.get("rest_given") is not None else ""),
    ]
    if not e["valid"]:
        lines.append(f"  NO ESTIMATE: {e['why']}")
        return "\n".join(lines)
    lines.append(
        f"  estimated step {e['step_s']:.4g} s, {e['tokens_per_s_per_chip']:,.0f} tokens/s per chip, "
        f"implied MFU {e['mfu']:.3f} (analytic {e['flops_per_step']:.3e} FLOPs / {e['peak_flops']:.3e} "
        "FLOP/s peak / estimated time)"
    )
    return "\n".join(lines + render_breakdown(e))


def render_breakdown(e: dict, top: int = 12) -> list[str]:
    """Per slice (one device): flops and bytes of each depth and per block; the per-op cost model of one
    block (estimated cycles by class and the largest ops by source path) and its collectives' bytes."""
    lines = []
    for k, cost in e.get("cost", {}).items():
        lines.append(
            f"  per slice, {k} block(s): {cost.get('flops', 0):.4g} flops, "
            f"{cost.get('bytes accessed', 0):.4g} bytes accessed"
        )
    per = e.get("ops_per_block")
    if not per:
        return lines
    cb = e["cost_per_block"]
    lines.append(
        f"  per block: {cb.get('flops', 0):.4g} flops, {cb.get('bytes accessed', 0):.4g} bytes accessed"
    )
    total = sum(per["classes"].values()) or 1.0
    by_class = sorted(per["classes"].items(), key=lambda kv: -kv[1])
    lines.append(
        "  per block, cost-model cycles by op class: "
        + ", ".join(f"{k} {v:,.0f} ({100 * v / total:.1f}%)" for k, v in by_class)
    )
    coll = sorted(per["collectives"].items(), key=lambda kv: -kv[1])
    lines.append(
        "  per block, collective payload: " + (", ".join(f"{k} {v / GIB:.3f} GiB" for k, v in coll) or "none")
    )
    deep = e["ops"][str(max(int(k) for k in e["ops"]))]
    if deep.get("unpriced"):
        lines.append(f"  ops priced at a sentinel (left out of the cycles): {deep['unpriced']}")
    lines.append(f"  per block, the {top} costliest ops (cycles, class | pass and result type):")
    for k, v in sorted(per["labels"].items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {v:12,.0f}  {k}")
    return lines


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    "bf16": 2,
    "f16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "s8": 1,
    "u8": 1,
    "pred": 1,
    "f64": 8,
    "s64": 8,
}
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w-]*)\((.*)$")


def op_class(opcode: str, line: str) -> str:
    """A scheduled op's class, comparable across codebases: matmul (a fusion around a convolution/dot),
    elementwise, reduction, kernel (Mosaic custom call: splash attention), copy, collective, other."""
    if opcode == "fusion":
        kind = re.search(r"kind=(k\w+)", line)
        kind = kind.group(1) if kind else ""
        return {"kOutput": "matmul", "kLoop": "elementwise", "kInput": "reduction"}.get(
            kind, f"fusion {kind}"
        )
    if opcode == "custom-call":
        return "kernel" if "tpu_custom_call" in line else "custom-call"
    if any(opcode.startswith(c) for c in COLLECTIVES):
        return "collective"
    return "copy" if opcode in ("copy", "copy-start", "transpose") else "other"


def _bytes_of(shape: str) -> int:
    """Bytes of an HLO result type such as 'bf16[2,4096,5120]{...}' or a tuple of them."""
    total = 0
    for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
        if dt in DTYPE_BYTES:
            total += DTYPE_BYTES[dt] * math.prod(int(x) for x in dims.split(",") if x)
    return total


def op_label(shape: str, line: str) -> str:
    """An op's identity that two codebases' programs share: its pass (fwd, remat = the forward that full
    remat recomputes in the backward, bwd) and result type without layout, e.g. 'bwd bf16[2,4096,5120]';
    a Mosaic kernel adds its name (splash attention's fwd/dq/dkv)."""
    m = re.search(r'op_name="([^"]*)"', line)
    name = m.group(1) if m else ""
    phase = "remat" if "rematted_computation" in name or "remat" in name.split("/")[-2:-1] else ""
    phase = phase or ("bwd" if "transpose(" in name else "fwd")
    kernel = re.search(r'kernel_name\s*=\s*\\?"([\w-]+)', line)
    types = re.findall(r"\b([a-z]+\d*\[[\d,]*\])", shape)
    return f"{phase} {' '.join(types[:3]) or '?'}" + (f" {kernel.group(1)}" if kernel else "")


def op_breakdown(dump_dir: str) -> dict:
    """The TPU compiler's per-op cost model of a compiled program, from XLA's dump (after codegen): each
    scheduled op's estimated_cycles (fusions, copies, kernels), summed by class and by source path, and
    the payload bytes of each kind of collective. The cycles are the cost model's, per op, before the
    overlap the schedule gives; they do not add up to optimal_seconds. Ops priced at a sentinel (2^63
    cycles: libtpu's custom fusions such as the MoE dispatch's sorts) are counted under 'unpriced'."""
    paths = sorted(glob.glob(os.path.join(dump_dir, "*after_codegen.txt")), key=os.path.getsize)
    if not paths:
        return {}
    classes: dict[str, float] = {}
    labels: dict[tuple[str, str], float] = {}
    coll: dict[str, float] = {}
    unpriced: dict[str, int] = {}
    with open(paths[-1]) as f:  # the largest: the train step (not a small helper program)
        for line in f:
            m = _INSTR.match(line)
            if not m:
                continue
            shape, opcode = m.group(2), m.group(3)
            if any(opcode == c or opcode == c + "-start" for c in COLLECTIVES):
                coll[opcode.removesuffix("-start")] = coll.get(opcode.removesuffix("-start"), 0) + _bytes_of(
                    shape
                )
            c = re.search(r'"estimated_cycles":"(\d+)"', line)
            if not c:
                continue
            cls, cycles = op_class(opcode, line), float(c.group(1))
            if cycles >= 2**50:  # a sentinel (2^63 ...), not a cost: counted apart, never summed
                unpriced[f"{cls} | {op_label(shape, line)}"] = (
                    unpriced.get(f"{cls} | {op_label(shape, line)}", 0) + 1
                )
                continue
            classes[cls] = classes.get(cls, 0.0) + cycles
            key = (cls, op_label(shape, line))
            labels[key] = labels.get(key, 0.0) + cycles
    labels_ = {f"{k[0]} | {k[1]}": v for k, v in labels.items()}
    return dict(classes=classes, labels=labels_, collectives=coll, unpriced=unpriced)


def breakdown_diff(deep: dict, shallow: dict, blocks: float) -> dict:
    """Per-block figures: (deep - shallow) / blocks for every key of classes, labels and collectives."""
    out = {}
    for part in ("classes", "labels", "collectives"):
        keys = set(deep.get(part, {})) | set(shallow.get(part, {}))
        out[part] = {k: (deep[part].get(k, 0.0) - shallow[part].get(k, 0.0)) / blocks for k in keys}
    return out
