"""End-of-run report: a per-phase table (report.md) and the train and validation loss of every phase on
one global-step axis (losses.png)."""

from __future__ import annotations

import contextlib
import json

from etils import epath

from voltron_jax import registry
from voltron_jax.errors import VoltronError
from voltron_jax.run import workdir as workdir_lib


def read_metrics(phase_dir: epath.Path) -> list[dict]:
    """The records of a phase's metrics.jsonl. A torn last line (a run killed mid-write; the next resume
    cuts it) is left out; a damaged line before it raises naming the file."""
    f = workdir_lib.metrics_file(phase_dir)
    if not f.exists():
        return []
    lines = [line for line in f.read_bytes().decode("utf-8", errors="replace").splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1:
                break  # torn by a kill: not a record yet
            raise VoltronError(
                f"{f} line {i + 1} is not JSON ({e}); the file is damaged: move it aside (metrics only; "
                "the checkpoints are unaffected) and rerun."
            ) from e
    return out


def cluster_table(results: dict[str, dict], n_clusters: int = 0) -> str:
    """Validation perplexity per data cluster (columns: cluster_0..n_clusters-1, else those measured) for
    every phase (rows); '-' where it was not measured."""
    measured = {
        int(k.split("/")[0].split("_")[1]) for r in results.values() for k in r if k.startswith("cluster_")
    }
    clusters = [f"cluster_{j}" for j in (range(n_clusters) if n_clusters else sorted(measured))]
    if not clusters:
        return ""
    lines = [
        "",
        "Validation perplexity per data cluster:",
        "",
        "| phase | overall | " + " | ".join(clusters) + " |",
        "| --- " * (len(clusters) + 2) + "|",
    ]
    missing = False
    for label, r in results.items():
        cells = [f"{r[k]:.3f}" if (k := f"{c}/perplexity") in r else "-" for c in clusters]
        missing |= "-" in cells
        lines.append(f"| {label} | {r.get('perplexity', float('nan')):.3f} | " + " | ".join(cells) + " |")
    if missing:
        lines += [
            "",
            "-: not measured: less than data.seq_len+1 tokens of validation text routed to the cluster.",
        ]
    return "\n".join(lines) + "\n"


def drop_metrics() -> dict[str, str]:
    """{sown drop-rate metric: the name it is shown under}, as the slot classes declare them
    (registry.Declared.metrics: models/moe.py, models/moa.py)."""
    return registry.metrics()


def mean_drop_rates(records: list[dict]) -> dict[str, float]:
    """{'MoE': x, 'MoA': y}: each layer kind's drop rate averaged over `records`, only the kinds present.
    Whole-set values only: the per-cluster evaluations' `cluster_i/..._drop_rate` are left out."""
    out = {}
    for key, name in drop_metrics().items():
        xs = [r[key] for r in records if key in r]
        if xs:
            out[name] = sum(xs) / len(xs)
    return out


def format_drop_rates(rates: dict[str, float]) -> str:
    """'MoE 8.02% / MoA 1.20%' ('-' for none)."""
    return " / ".join(f"{k} {v:.2%}" for k, v in rates.items()) or "-"


def drop_rates(train: list[dict], final: dict) -> str:
    """'train MoE x / MoA y; eval MoE x / MoA y': a phase's share of dropped token assignments per layer
    kind, averaged over its training records and read from its final evaluation; '-' without an MoE."""
    tr, ev = mean_drop_rates(train), mean_drop_rates([final])
    if not tr and not ev:
        return "-"
    return f"train {format_drop_rates(tr)}; eval {format_drop_rates(ev)}"


def write(workdir: epath.Path, results: dict[str, dict], n_clusters: int = 0) -> None:
    """report.md (phase, steps, final train loss, validation loss and perplexity, and the MoE drop rate
    when a phase has an MoE; per-cluster perplexity for n_clusters clusters) and losses.png."""
    head = "| phase | global step | final train loss | val loss | val perplexity | tokens/s |"
    rows, drops = [], {}
    for label, d in workdir_lib.run_dirs(workdir).items():
        recs = read_metrics(d)
        train = [r for r in recs if r["kind"] == "train"]
        res = results.get(label, {})
        last = train[-1] if train else {}
        drops[label] = drop_rates(train, res)
        rows.append(
            f"| {label} | {last.get('step', '-')} | {last.get('loss', float('nan')):.4f} | "
            f"{res.get('loss', float('nan')):.4f} | {res.get('perplexity', float('nan')):.3f} | "
            f"{last.get('tokens_per_s', float('nan')):,.0f} |"
        )
    if any(x != "-" for x in drops.values()):  # an MoE phase: its drop rate stands beside its numbers
        head += f" {'/'.join(drop_metrics().values())} drop rate |"
        rows = [f"{row} {drop} |" for row, drop in zip(rows, drops.values(), strict=True)]
    rows = [head, "| --- " * (head.count("|") - 1) + "|", *rows]
    text = "# Run report\n\n" + "\n".join(rows) + "\n" + cluster_table(results, n_clusters)
    workdir_lib.write_text(workdir_lib.report_file(workdir), text)
    plot_losses(workdir)
    print("\n".join(rows), flush=True)


def loss_series(workdir: epath.Path) -> dict[str, dict[str, tuple[list, list]]]:
    """{label: {"train": (steps, losses), "validation": (steps, losses)}} of every phase folder, on the
    global step axis. A phase built from a parent (parents.json) starts its train curve at the parent's
    last point, so the curves of a recipe join up instead of leaving a gap at each phase boundary."""
    out = {}
    for label, d in workdir_lib.run_dirs(workdir).items():
        recs = read_metrics(d)
        out[label] = {
            kind: ([r["step"] for r in rs], [r["loss"] for r in rs])
            for kind, rs in (
                ("train", [r for r in recs if r["kind"] == "train"]),
                ("validation", [r for r in recs if r["kind"] == "eval" and "loss" in r]),
            )
        }
        parents_file = workdir_lib.parents_file(d)
        with contextlib.suppress(OSError, ValueError):
            parents = list(json.loads(parents_file.read_text())) if parents_file.exists() else []
            first = parents[0] if parents else None
            if first in out and out[first]["train"][0] and out[label]["train"][0]:
                (px, py), (x, y) = out[first]["train"], out[label]["train"]
                out[label]["train"] = ([px[-1], *x], [py[-1], *y])
    return out


def plot_losses(workdir: epath.Path):
    """losses.png: train (solid) and validation (dashed, markers) loss of every phase against the global
    step, one colour per phase. Returns the matplotlib Figure (closed; its lines hold the plotted data)."""
    import matplotlib  # lazy: matplotlib's backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, series) in enumerate(loss_series(workdir).items()):
        colour = f"C{i % 10}"
        x, y = series["train"]
        if x:
            ax.plot(x, y, color=colour, label=f"{label} train")
        x, y = series["validation"]
        if x:
            ax.plot(x, y, color=colour, linestyle="--", marker="o", markersize=3, label=f"{label} validation")
    ax.set_xlabel("global step")
    ax.set_ylabel("loss (nats/token)")
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with workdir_lib.losses_file(workdir).open("wb") as f:
        fig.savefig(f, dpi=110)
    plt.close(fig)
    return fig
