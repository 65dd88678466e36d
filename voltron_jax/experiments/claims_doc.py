"""docs/claims.md from what a verified-claims sweep has run so far, by one command:

    python -m voltron_jax.experiments.claims_doc --sweep_file=configs/sweeps/claims.py \
        --workdir=/work/claims_runs/claims --out=docs/claims.md --rates='{"overhead_s": ..., ...}'

The full sweep does not fit one session on the 2-core host, so its rows run in groups
(`configs/sweeps/claims.py:<rows>`, the same run folders). This writes, from the sweep's workdir:
  - every row whose arms have all finished (trainings, lr sweeps, final scorings): ablate's own claims
    section (experiments/ablate.py `claims_section`: measurement, interval, MDE, verdict) for those rows;
  - every other row: what the earlier, old-protocol run said (the sweep file's `old_protocol`, marked as
    such, with the verdicts the audit withdrew and why) and what the row still needs: its processes not
    yet finished and their estimated hours (the cost model below, `--rates` from
    `benchmarks/claims_estimate.py --measure`);
  - the remaining total (each arm counted once, rows share arms).

Cost model (also benchmarks/claims_estimate.py's): every process the sweep starts (each arm's lr-sweep
points, its remaining seeds at the best lr, the per-batch final scoring of each final run, the
evaluation-only arms) with its training FLOPs, evaluation FLOPs and steps; seconds per process =
overhead (overhead_warm_s where an earlier process compiled the same programs: the sweep's shared
compilation cache) + steps x max(step floor, train FLOPs per step / train_flops_s) + eval FLOPs /
eval_flops_s.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shlex
import sys
from pathlib import Path

from voltron_jax import cli
from voltron_jax import config as config_lib
from voltron_jax import recipe as recipe_lib
from voltron_jax.errors import ConfigError, UsageError
from voltron_jax.experiments import ablate
from voltron_jax.experiments import claims as claims_lib
from voltron_jax.models import decoder
from voltron_jax.run import workdir as workdir_lib

# ============================================================================ cost model


def run_costs(base: str, v: ablate.Variant, fixed: dict) -> dict:
    """{'train_flops', 'eval_flops', 'steps', 'fpt'} of one training run of variant `v`."""
    c = ablate.variant_config(v.base or base, {**fixed, **v.overrides})
    steps, eval_flops = 0, 0.0
    for name in recipe_lib.phase_order(c.recipe):
        pc = config_lib.phase_config(c, name)
        members = max(int(c.recipe[name].fan_out), 1)
        n = recipe_lib.phase_steps(c.recipe[name], c.max_steps)
        steps += n * members
        evals = (n // pc.train.eval_every + 1) * members
        clusters = 1 + (pc.data.n_clusters if pc.train.eval_clusters else 0)
        tokens = pc.train.eval_batches * pc.data.batch_size * pc.data.seq_len * clusters
        eval_flops += evals * tokens * decoder.flops_per_token(pc.model, pc.data.seq_len)
    fpt = decoder.flops_per_token(c.model, c.data.seq_len)
    train = ablate.training_flops(v.base or base, {**fixed, **v.overrides})
    return {"train_flops": train, "eval_flops": eval_flops, "steps": steps, "fpt": fpt,
            "tokens": c.data.batch_size * c.data.seq_len}  # fmt: skip


def _scorings(arm: str, flops: float, key: tuple, n: int) -> list[dict]:
    """n scoring processes of one arm (one per seed): evaluation FLOPs only."""
    row = {"arm": arm, "kind": "score", "train_flops": 0.0, "eval_flops": flops, "steps": 0, "key": key}
    return [dict(row) for _ in range(n)]


def enumerate_runs(sweep: str) -> list[dict]:
    """Every process the sweep starts: {'arm', 'kind', 'train_flops', 'eval_flops', 'steps', 'warm'}
    ('warm': an earlier process compiled the same programs; see the module docstring)."""
    base, variants, fixed, _, _ = ablate.load_sweep_file(sweep, None)
    by = {v.name: v for v in variants}
    out = []
    for v in variants:
        if v.evaluate:
            src = by[v.evaluate["of"]]
            c = ablate.variant_config(src.base or base, {**fixed, **src.overrides})
            fanned = [n for n in recipe_lib.phase_order(c.recipe) if c.recipe[n].fan_out]
            last = config_lib.phase_config(c, recipe_lib.phase_order(c.recipe)[-1])
            branch = config_lib.phase_config(c, fanned[-1]) if fanned else last
            models = int(c.recipe[fanned[-1]].fan_out) if v.evaluate.get("mode") == "cbtm_ensemble" else 1
            model = branch if models > 1 else last
            tokens = int(v.evaluate.get("batches", 16)) * c.data.batch_size * c.data.seq_len
            flops = models * tokens * decoder.flops_per_token(model.model, c.data.seq_len)
            key = ("ensemble", json.dumps(model.model.to_dict(), sort_keys=True, default=str), models, tokens)
            out += _scorings(v.name, flops, key, len(src.seeds))
            continue
        runs = [(lv, lv.seeds) for lv in ablate.lr_sweep_runs([v])]
        swept = v.lr_seeds if v.lrs else 0
        runs.append((v, v.seeds[swept:]))  # the remaining seeds at the best lr (its lr does not change costs)
        for rv, seeds in runs:
            cost = run_costs(base, rv, fixed)
            # an lr point's seeds share its programs; the finals of an arm with an lr grid train at one of
            # its points (`@best`, compiled by the lr sweep); any other arm's seeds share its first seed's
            key = ("train", rv.name + ("@best" if rv is v and v.lrs else ""))
            out += [{"arm": v.name, "kind": "train", **cost, "key": key} for _ in seeds]
        if v.final_eval:
            cost = run_costs(base, v, fixed)
            flops = v.final_eval * cost["tokens"] * cost["fpt"]
            c = ablate.variant_config(v.base or base, {**fixed, **v.overrides})
            key = ("score", json.dumps(c.model.to_dict(), sort_keys=True, default=str), 1, v.final_eval)
            out += _scorings(v.name, flops, key, len(v.seeds))
    seen = {("train", v.name + "@best") for v in variants if v.lrs}  # compiled by the lr sweep
    for r in out:
        key = r.pop("key")
        r["warm"] = key in seen
        seen.add(key)
    return out


def seconds(run: dict, rates: dict) -> float:
    per_step = run["train_flops"] / run["steps"] if run["steps"] else 0.0
    train = run["steps"] * max(rates["step_floor_s"], per_step / rates["train_flops_s"])
    overhead = rates.get("overhead_warm_s", rates["overhead_s"]) if run["warm"] else rates["overhead_s"]
    return overhead + train + run["eval_flops"] / rates["eval_flops_s"]


# ============================================================================ what has run


def row_arms(claim: dict, variants: dict[str, ablate.Variant]) -> set[str]:
    """The arms a row needs: those it reads, and the arms those re-score or take their lr from."""
    need = set(claims_lib.claim_arms(claim)) & set(variants)
    while True:
        more = {variants[a].evaluate["of"] for a in need if variants[a].evaluate}
        more |= {variants[a].lr_from for a in need if variants[a].lr_from}
        if more <= need:
            return need
        need |= more


def arm_dirs(arm: str, root: Path) -> list[Path]:
    """The run folders of arm `arm` under sweep workdir `root`: its final runs and its lr-sweep points."""
    return [*root.glob(f"{arm}/seed_*"), *root.glob(f"{arm}@lr=*/seed_*")]


def finished(v: ablate.Variant, root: Path) -> dict[str, int]:
    """{'train': trainings finished, 'score': scorings finished} of arm `v` under sweep workdir `root` (its
    lr-sweep points, `<arm>@lr=x/seed_s`, and its final runs; an evaluation-only arm's runs are scorings)."""
    done = [d for d in arm_dirs(v.name, root) if (d / "done.json").exists()]
    if v.evaluate:
        return {"train": 0, "score": len(done)}
    return {"train": len(done), "score": sum(ablate._scored(d) for d in done)}


def remaining(runs: list[dict], variants: dict[str, ablate.Variant], root: Path) -> dict[str, list[dict]]:
    """{arm: the processes of `runs` (enumerate_runs) not yet finished under `root`}: each arm's last ones
    of each kind (the finished ones are its first: the lr sweep runs first, the warm seeds after)."""
    out: dict[str, list[dict]] = {}
    for arm, v in variants.items():
        done = finished(v, root)
        for kind in ("train", "score"):
            mine = [r for r in runs if r["arm"] == arm and r["kind"] == kind]
            out.setdefault(arm, []).extend(mine[min(done[kind], len(mine)) :])
    return out


def recorded(variants: dict[str, ablate.Variant], root: Path) -> list[dict]:
    """{'arm', 'kind', 'wall_s'} of every process under `root` that recorded its wall time (ablate writes
    `wall_s` into done.json and final_eval.json; runs of older versions did not)."""
    out = []
    for arm, v in variants.items():
        for d in arm_dirs(arm, root):
            for name, kind in (
                ("done.json", "score" if v.evaluate else "train"),
                (ablate.FINAL_EVAL, "score"),
            ):
                f = d / name
                wall = json.loads(f.read_text()).get("wall_s") if f.exists() else None
                if wall is not None:
                    out.append({"arm": arm, "kind": kind, "wall_s": float(wall)})
    return out


def measured_line(runs: list[dict], rec: list[dict], rates: dict, jobs: int) -> str:
    """The measured hours of the recorded processes against the cost model's price for the same ones (each
    at its arm and kind's mean modelled time), and the full sweep's model hours scaled by that ratio."""
    if not rec:
        return ""
    model = 0.0
    for r in rec:
        mine = [x for x in runs if x["arm"] == r["arm"] and x["kind"] == r["kind"]]
        model += sum(seconds(x, rates) for x in mine) / max(len(mine), 1)
    wall = sum(r["wall_s"] for r in rec)
    ratio = wall / model if model else float("nan")
    full = _hours(runs, rates) / jobs
    return (
        f"**Measured**: {len(rec)} processes of this workdir ({len({r['arm'] for r in rec})} arms; runs "
        "before ablate recorded it have none) recorded their wall time (ablate's `wall_s`): "
        f"{wall / 3600:.2f} h of process time, {wall / len(rec):.0f} s per process, about "
        f"{wall / 3600 / jobs:.2f} h at --jobs={jobs}; the cost model prices the same processes at "
        f"{model / 3600:.2f} h (measured / model = {ratio:.2f}). The full sweep from nothing ({len(runs)} "
        f"processes): {full:.1f} h at --jobs={jobs} by the model, **{full * ratio:.1f} h** at the measured "
        "ratio (a ratio from these arms' mix of sizes, not the whole sweep's).\n"
    )


# ============================================================================ the document


def _sweep_dict(path: str) -> dict:
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("sweep_doc", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_sweep(arg) if arg else mod.get_sweep()


def _hours(runs: list[dict], rates: dict) -> float:
    return sum(seconds(r, rates) for r in runs) / 3600


def build(sweep_file: str, root: Path, rates: dict, jobs: int, out: Path, cmd: str) -> str:
    """The markdown of docs/claims.md (see the module docstring); writes the isoFLOP plot beside `out`
    when that row has run."""
    if not root.is_dir():
        raise UsageError(f"--workdir={root} does not exist: give the claims sweep's workdir.")
    base, variants, fixed, claims, notes = ablate.load_sweep_file(sweep_file, None)
    old = _sweep_dict(sweep_file).get("old_protocol", {})
    by = {v.name: v for v in variants}
    runs = enumerate_runs(sweep_file)
    left = remaining(runs, by, root)
    arms_of = {row: row_arms(cl, by) for row, cl in claims.items()}
    done_rows = [row for row, arms in arms_of.items() if arms and not any(left[a] for a in arms)]
    todo_rows = [row for row in claims if row not in done_rows]
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# Verified claims\n",
        f"Written by `{cmd}` on {today} from the run folders under `{root}` (they stay there: rerunning a "
        "row group, e.g. `--sweep_file=configs/sweeps/claims.py:cbtx`, with that `--workdir` skips every "
        "finished run). Rules and formulas: voltron_jax/experiments/claims.py; arms, controls and margins: "
        "configs/sweeps/claims.py.\n",
        f"**{len(done_rows)} of {len(claims)} rows ran under the issue-26 protocol**"
        + (f" ({', '.join(done_rows)})" if done_rows else "")
        + (
            f"; the other {len(todo_rows)} show the 2026-12-03 old-protocol run (marked as such) and what "
            "each still needs.\n"
            if todo_rows
            else ".\n"
        ),
    ]
    if done_rows:
        sub = {v.name: v for v in variants if any(v.name in arms_of[r] for r in done_rows)}
        finals, pending = ablate.final_runs(list(sub.values()), root)
        rows = ablate.collect(base, finals, fixed, root)
        sub_claims = {r: claims[r] for r in done_rows}
        curves = {v.name: ablate.lr_finals_by_seed(v, root) for v in sub.values() if v.lrs}
        png = out.with_name(out.stem + "_isoflop.png")
        plotted = ablate.isoflop_plot(rows, sub_claims, png)
        section = ablate.claims_section(
            rows, sub_claims, cmd, ablate.lr_table(list(sub.values()), root) if curves else "", notes, curves,
            png.name if plotted else "",
        )  # fmt: skip
        parts.append("## Rows run under the issue-26 protocol\n\n" + section + "\n")
    if todo_rows:
        lines = [
            "## Rows not yet run under the issue-26 protocol\n",
            "Old protocol (2026-12-03, commit 9fa66e0): 3 seeds, the loop's 4 evaluation batches (8,192 "
            "tokens), intervals over seed noise only, no MDE; its full table is kept in "
            f"{old.get('_record', 'the git history of docs/claims.md')}. Still to run: the row's processes "
            "not finished under the workdir (of them, those that find their programs in the sweep's "
            "compilation cache), hours one at a time by the cost model at the rates below; rows share arms "
            "(dense is in five), so the rows' hours do not add up to the total.\n",
            "| row | 2026-12-03 result (old protocol) | its verdict then | under the new rules | "
            "still to run: processes (warm) | hours, one at a time |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in todo_rows:
            o = old.get(row, {})
            need = [r for a in sorted(arms_of[row]) for r in left[a]]
            lines.append(
                f"| {row} | {o.get('result', 'not run')} | {o.get('verdict', '-')} | "
                f"{o.get('now', 'to be run')} | {len(need)} ({sum(r['warm'] for r in need)}) | "
                f"{_hours(need, rates):.2f} |"
            )
        parts.append("\n".join(lines) + "\n")
    every = [r for rs in left.values() for r in rs]
    warm = sum(r["warm"] for r in every)
    parts.append(
        "**Every process of the sweep has finished under the workdir.** The full sweep, from nothing: "
        "`python -m voltron_jax.experiments.ablate --sweep_file=configs/sweeps/claims.py --workdir=<dir> "
        "--claims_out=<dir>/claims.md --jobs=2`.\n"
        if not every
        else f"**What the whole sweep still needs**: {len(every)} processes ({warm} warm), "
        f"{sum(r['steps'] for r in every):,} training steps: {_hours(every, rates):.1f} h one at a time, "
        f"about {_hours(every, rates) / jobs:.1f} h at --jobs={jobs}, at the rates "
        f"`{json.dumps(rates, sort_keys=True)}` (benchmarks/claims_estimate.py --measure; docs/results.md). "
        "The full sweep, from nothing: `python -m voltron_jax.experiments.ablate "
        "--sweep_file=configs/sweeps/claims.py --workdir=<dir> --claims_out=<dir>/claims.md --jobs=2`.\n"
    )
    parts.append(measured_line(runs, recorded(by, root), rates, jobs))
    return "\n".join(p for p in parts if p)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep_file", default="configs/sweeps/claims.py")
    p.add_argument("--workdir", required=True, help="the claims sweep's workdir (ablate --workdir)")
    p.add_argument("--out", default="docs/claims.md")
    p.add_argument(
        "--rates", required=True, help="JSON of the cost model's rates (claims_estimate --measure)"
    )
    p.add_argument("--jobs", type=int, default=2, help="runs at once, for the wall-time estimate")
    a = p.parse_args(argv)
    try:
        rates = json.loads(a.rates)
    except json.JSONDecodeError as e:
        raise UsageError(f"--rates is not JSON ({e}); e.g. '{{\"overhead_s\": 83.5, ...}}'.") from e
    missing = {"overhead_s", "train_flops_s", "step_floor_s", "eval_flops_s"} - set(rates)
    if missing:
        raise ConfigError(
            f"--rates lacks {sorted(missing)} (benchmarks/claims_estimate.py --measure prints all)."
        )
    out = Path(a.out)
    cmd = "python -m voltron_jax.experiments.claims_doc " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    text = build(a.sweep_file, Path(a.workdir), rates, a.jobs, out, cmd)
    workdir_lib.write_text(out, text)
    print(f"[claims_doc] {out} written")


if __name__ == "__main__":
    cli.run(lambda argv: main(argv[1:]), absl_flags=False)
