"""Ablations: sweep config fields, run (or emit) every variant x seed, collect one comparable table.

    python -m voltron_jax.experiments.ablate --config=configs/tiny.py --config.model.linear=dense,bitlinear \
        --config.model.routing='[none, mod]' --config.max_steps=50 --seeds 3 --workdir=runs/abl [--emit]
    python -m voltron_jax.experiments.ablate --sweep_file=configs/sweeps/claims.py \
        --workdir=runs/claims [--claims]
        [--claims_out=docs/claims.md]

The config flags are `voltron_jax.main`'s: `--config.<field>=v1,v2` (a comma list) or
`--config.<field>=[v1, v2]` (a list literal) is a sweep axis, `--config.<field>=v` a setting every run
gets. A comma inside a free-form string field (a mixture spec `data.mixtures.*`, anything under `recipe.`)
is part of its value; sweep those with a list literal (`--config.data.mixtures.decay='["corpus:1.0",
"corpus:0.7,pydoc:0.3"]'`). The older `--sweep field=v1,v2` and `--set field=v` (commands recorded in
docs/results.md) still work.

Sweeps are a grid (every combination of the sweep axes) or listed variants from a sweep file
(`get_sweep() -> {"base": "configs/x.py[:arg]", "variants": {name: {field: value}}, "set": {...}}`).
Each variant x seed trains in its own workdir `<workdir>/<variant>/seed_<s>` through the same command a
pod would run (`python -m voltron_jax.main ...`); finished runs (a `done.json` there) are skipped, so a
sweep resumes. Every run of a sweep shares one persistent XLA compilation cache, `<workdir>/xla_cache`
(`child_env`): the seeds, lr points and scorings of an arm compile the same programs once.
`--emit` prints those commands instead of running them; every variant's config (base, `--set`,
overrides) is built and validated first, so neither a printed command nor a run fails on a bad field or
value. `--claims` writes the sweep file's verified-claims section to `<workdir>/claims.md` (or to
`--claims_out`). The collected results are a
markdown table and a CSV (final and best validation loss and perplexity, mean and spread over seeds,
tokens/s, parameters, FLOPs per token, validation loss at equal FLOPs) and one PNG of every variant's
curves against steps and against training FLOPs.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import datetime
import importlib.util
import io
import itertools
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from voltron_jax import cli
from voltron_jax import config as config_lib
from voltron_jax import recipe as recipe_lib
from voltron_jax.errors import DIVERGED_EXIT, ConfigError, UsageError, VoltronError
from voltron_jax.experiments import claims as claims_lib
from voltron_jax.models import decoder
from voltron_jax.run import report
from voltron_jax.run import workdir as workdir_lib


@dataclass
class Variant:
    name: str
    overrides: dict[str, str]
    seeds: list[int] = field(default_factory=lambda: [0])
    base: str = ""  # its own config file (sweep files only); empty: the sweep's base
    lrs: list[float] = field(default_factory=list)  # learning-rate sweep first (sweep files only)
    arm: str = ""  # the sweep-file entry this run belongs to (an lr-sweep run or the arm at its best lr)
    lr: float | None = None
    evaluate: dict = field(default_factory=dict)  # {'of': arm, 'mode': ...}: re-score that arm's runs
    lr_from: str = ""  # train at the best lr of this other arm's lr sweep (sweep files only)
    lr_seeds: int = 1  # seeds trained at every lr of the sweep (the first seed picks the best lr)
    final_eval: int = 0  # > 0: score every final seed on that many fixed batches, per batch (evaluate.py)
    flops_budget: bool = False  # this arm's training FLOPs are the "val loss at equal FLOPs" budget


# ============================================================================ sweep definition


load_config = config_lib.load  # `configs/x.py[:arg]` -> ConfigDict, as --config= loads it


def check_field(config, key: str) -> None:
    """Raise ConfigError naming the valid fields when `key` (a.b.c) is not a config field."""
    *path, leaf = key.split(".")
    node = config
    for i, p in enumerate(path):
        if p not in node or not hasattr(node[p], "keys"):
            raise ConfigError(
                f"sweep field {key!r}: {'.'.join(path[: i + 1])!r} is not a config section; "
                f"valid: {sorted(node.keys())}."
            )
        node = node[p]
    if leaf not in node:
        raise ConfigError(
            f"sweep field {key!r} does not exist; valid fields of "
            f"{'.'.join(path) or 'the config'}: {sorted(node.keys())}."
        )


def split_config_flags(config, flags: list[tuple[str, str]]) -> tuple[list[tuple[str, list[str]]], dict]:
    """(sweep axes [(field, [value texts])], fixed {field: text}) of `--config.<field>=text` flags (main's
    grammar, collected by cli.split_overrides): a list literal `[a, b]` or a comma list is an axis (not for a
    list/tuple-valued field, whose literal is its value, nor a comma in a free-form string field, see the
    module doc); one value is a fixed setting. Every field is checked against the config."""
    axes, fixed = [], {}
    for key, text in flags:
        check_field(config, key)
        values = sweep_values(config, key, text.strip())
        if values is None:
            fixed[key] = text
        elif len(values) == 1:
            fixed[key] = values[0]
        else:
            axes.append((key, values))
    return axes, fixed


def sweep_values(config, key: str, text: str) -> list[str] | None:
    """The values of sweep text `text` for `key`, or None when it is one value."""
    node = config
    for part in key.split(".")[:-1]:
        node = node[part]
    current = node[key.split(".")[-1]]
    if isinstance(current, list | tuple):
        return None  # `[1, 2]` is the value of a tuple field
    if text.startswith("[") and text.endswith("]"):
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError):  # bare words: [dense, bitlinear]
            items = [x.strip().strip("'\"") for x in text[1:-1].split(",")]
        if not isinstance(items, list) or not items:
            raise ConfigError(f"--config.{key}={text}: a sweep list needs at least one value, e.g. [a, b].")
        return [str(x).lower() if isinstance(x, bool) else str(x) for x in items]
    free_form = isinstance(current, str) and any(p in config_lib.FREE_FORM for p in key.split("."))
    if "," in text and not free_form:
        values = [v.strip() for v in text.split(",")]
        if not all(values):
            raise ConfigError(f"--config.{key}={text}: an empty value in the comma list.")
        return values
    return None


def parse_sweeps(
    config, sweeps: list[str], seeds: int, axes: list[tuple[str, list[str]]] = ()
) -> list[Variant]:
    """Grid over `field=v1,v2` specs (the old --sweep flags) and `axes` [(field, [values])] (the
    `--config.` grammar, split_config_flags); each field checked against the config."""
    axes = [[(k, v) for v in values] for k, values in axes]
    for s in sweeps:
        key, eq, values = s.partition("=")
        if not eq or not values:
            raise ConfigError(f"--sweep {s!r} must look like 'model.linear=dense,bitlinear'.")
        check_field(config, key.strip())
        axes.append([(key.strip(), v.strip()) for v in values.split(",")])
    out = []
    for combo in itertools.product(*axes) if axes else [()]:
        name = "+".join(f"{k.split('.')[-1]}={v}" for k, v in combo) or "base"
        out.append(Variant(name, dict(combo), list(range(seeds))))
    return out


def load_sweep_file(path: str, seeds: int | None) -> tuple[str, list[Variant], dict, dict, str]:
    """(base config spec, variants, fixed overrides, claims, notes) from a sweep file `file.py[:arg]`
    (`get_sweep()` or `get_sweep(arg)`). A variant's `lrs` list asks for a learning-rate sweep first;
    `lr_from: arm` trains it at that arm's best lr instead (a control that changes only the data, whose
    comparison with the arm is then at one shared lr); its `seeds` overrides the sweep's seed count.
    `notes` (markdown, e.g. what the scale can show) heads the claims report. `lr_seeds: n` trains the
    first n seeds at every lr (a width-transfer rule needs the lr curve of several seeds). The sweep's
    `final_eval_batches: N` scores every final run's last checkpoint on N fixed validation batches, per
    batch (an arm may opt out with `final_eval: 0`); `equal_flops_of: arm` sets the budget of the "val
    loss at equal FLOPs" column to that arm's training FLOPs."""
    file, _, arg = path.partition(":")
    if not Path(file).is_file():
        raise ConfigError(f"sweep file {file!r} does not exist (e.g. configs/sweeps/claims.py).")
    spec = importlib.util.spec_from_file_location("sweep", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sw = mod.get_sweep(arg) if arg else mod.get_sweep()
    n = seeds if seeds else sw.get("seeds", 1)
    variants = [
        Variant(
            name,
            {k: str(v) for k, v in ov.items() if k not in _SWEEP_KEYS},
            list(range(ov.get("seeds", n))),
            ov.get("base", ""),
            [float(x) for x in ov.get("lrs", ())],
            name,
            evaluate=dict(ov.get("evaluate", {})),
            lr_from=ov.get("lr_from", ""),
            lr_seeds=int(ov.get("lr_seeds", 1)),
            final_eval=0
            if ov.get("evaluate")
            else int(ov.get("final_eval", sw.get("final_eval_batches", 0))),
            flops_budget=name == sw.get("equal_flops_of"),
        )
        for name, ov in sw["variants"].items()
    ]
    names = [v.name for v in variants]
    swept = {v.name for v in variants if v.lrs}
    for v in variants:
        if v.lr_from and (v.lr_from not in swept or v.lrs):
            raise ConfigError(
                f"variant {v.name!r}: lr_from={v.lr_from!r} must name an arm of {path} with an lr sweep "
                f"(arms with `lrs`: {sorted(swept)}), and an arm cannot have both `lrs` and `lr_from`."
            )
        if v.evaluate and v.evaluate.get("of") not in names:
            raise ConfigError(
                f"variant {v.name!r} evaluates {v.evaluate.get('of')!r}, not a variant of {path}."
            )
    config = load_config(sw["base"])
    for v in variants:
        for k in v.overrides:
            check_field(load_config(v.base) if v.base else config, k)
    for k in sw.get("set", {}):
        check_field(config, k)
    fixed = {k: str(v) for k, v in sw.get("set", {}).items()}
    return sw["base"], variants, fixed, sw.get("claims", {}), sw.get("notes", "")


# ============================================================================ run / emit


_SWEEP_KEYS = ("base", "lrs", "seeds", "evaluate", "lr_from", "lr_seeds", "final_eval")


def variant_config(base: str, overrides: dict):
    """The config one run trains with: `base` plus `overrides` parsed exactly as `voltron_jax.main`
    parses its `--config.<field>=value` flags (recipe fields included)."""
    return cli.load_config(base, [(k, str(v)) for k, v in overrides.items()])


def check_variants(base: str, variants: list[Variant], fixed: dict) -> None:
    """Build and validate every variant's config: a bad value fails here, not in a printed command."""
    for v in variants:
        try:
            config_lib.validate(variant_config(v.base or base, {**fixed, **v.overrides}))
        except ConfigError as e:
            raise ConfigError(f"variant {v.name!r}: {e}") from e


def command(base: str, variant: Variant, seed: int, fixed: dict, workdir: Path) -> list[str]:
    if variant.evaluate:  # re-score a finished run of another arm (voltron_jax/experiments/ensemble.py)
        source = workdir.parent.parent / variant.evaluate["source"] / f"seed_{seed}"
        flags = [f"--{k}={v}" for k, v in variant.evaluate.items() if k not in ("of", "source")]
        return [
            sys.executable,
            "-m",
            "voltron_jax.experiments.ensemble",
            f"--workdir={source}",
            f"--out={workdir}",
            *flags,
        ]
    args = [
        sys.executable,
        "-m",
        "voltron_jax.main",
        f"--config={base}",
        f"--workdir={workdir}",
        f"--config.seed={seed}",
    ]
    args += [f"--config.{k}={v}" for k, v in {**fixed, **variant.overrides}.items()]
    return args


def run_dir(root: Path, variant: Variant, seed: int) -> Path:
    return root / variant.name / f"seed_{seed}"


def at_lr(v: Variant, lr: float, seeds: list[int], final_eval: int = 0) -> Variant:
    """Arm `v` trained at learning rate `lr`: the run directory is named by both."""
    return Variant(
        f"{v.name}@lr={lr:g}", {**v.overrides, "optim.lr": repr(lr)}, seeds, v.base, [], v.name, lr,
        final_eval=final_eval, flops_budget=v.flops_budget,
    )  # fmt: skip


def lr_sweep_runs(variants: list[Variant]) -> list[Variant]:
    """The first `lr_seeds` seeds of every arm at every learning rate of its `lrs` (arms without `lrs`:
    nothing)."""
    return [at_lr(v, lr, v.seeds[: v.lr_seeds]) for v in variants for lr in v.lrs]


def lr_finals_by_seed(v: Variant, root: Path) -> dict[int, dict[float, float]]:
    """{seed: {lr: final validation loss}} of every finished lr-sweep run of arm `v` (inf: diverged)."""
    out: dict[int, dict[float, float]] = {}
    for lv in lr_sweep_runs([v]):
        for s in lv.seeds:
            d = run_dir(root, lv, s)
            if (d / "done.json").exists():
                ev = read_run(d)["eval"]
                out.setdefault(s, {})[lv.lr] = (
                    math.inf if _diverged(d) else ev[-1]["loss"] if ev else math.nan
                )
    return out


def _lr_finals(v: Variant, root: Path) -> dict[float, float]:
    """lr -> final validation loss of the arm's first seed (nan where that run has not finished)."""
    out = {}
    for lv in lr_sweep_runs([v]):
        d = run_dir(root, lv, lv.seeds[0])
        ev = read_run(d)["eval"] if (d / "done.json").exists() else []  # a run in progress: not yet
        out[lv.lr] = math.inf if _diverged(d) else ev[-1]["loss"] if ev else math.nan
    return out


def _diverged(d: Path) -> bool:
    """Whether the run in `d` finished by diverging (a NaN/inf loss; recorded by run_all)."""
    done = d / "done.json"
    return done.exists() and json.loads(done.read_text()).get("diverged", False)


def final_runs(variants: list[Variant], root: Path) -> tuple[list[Variant], list[str]]:
    """Every arm with all its seeds, at its best learning rate when it has an lr sweep (lowest final
    validation loss of the first seed), and the names of arms whose lr sweep has not finished."""
    out, pending = [], []
    by_name = {v.name: v for v in variants}
    for v in variants:
        finals = _lr_finals(by_name[v.lr_from] if v.lr_from else v, root)
        if v.evaluate:
            continue
        if not finals:
            out.append(v)
        elif any(math.isnan(x) for x in finals.values()):
            pending.append(v.name)
        else:
            out.append(at_lr(v, claims_lib.best_lr(finals)[0], v.seeds, v.final_eval))
    resolved = {v.arm or v.name: v for v in out}
    for v in variants:  # re-scoring arms run after the runs they read, on the same seeds
        if v.evaluate and v.evaluate["of"] in resolved:
            src = resolved[v.evaluate["of"]]
            ev = {**v.evaluate, "source": src.name}
            out.append(Variant(v.name, {}, src.seeds, src.base, [], v.name, src.lr, ev, final_eval=0))
    return out, pending


def lr_table(variants: list[Variant], root: Path) -> str:
    """Markdown: final validation perplexity of every arm at every swept lr (first seed); * marks the best,
    and an arm whose best lr is at an end of its grid is flagged (the optimum is not bracketed)."""
    lines = ["| arm | lr: final val ppl (first seed) | optimum bracketed |", "| --- | --- | --- |"]
    for v in variants:
        finals = _lr_finals(v, root)
        if not finals or all(math.isnan(x) for x in finals.values()):
            continue
        best, bracketed = claims_lib.best_lr(finals)
        cells = ", ".join(
            f"{lr:g}: {math.exp(x):.3f}{'*' * (lr == best)}" if math.isfinite(x) else f"{lr:g}: diverged"
            for lr, x in sorted(finals.items())
        )
        lines.append(f"| {v.name} | {cells} | {'yes' if bracketed else 'NO: best lr at the grid edge'} |")
    return "\n".join(lines)


def run_all(
    base: str,
    variants: list[Variant],
    fixed: dict,
    root: Path,
    emit: bool,
    lr_sweep: bool = False,
    jobs: int = 1,
) -> None:
    """Run every variant x seed (skipping finished ones), or print the commands. `lr_sweep`: these are
    points of learning-rate sweeps, where a diverged run is recorded (as infinite loss), not a failure.
    jobs > 1: that many runs at once, each writing its output to `<run dir>/ablate.log`; a failure stops
    new runs from starting and is raised once the running ones end."""
    todo = []
    for v in variants:
        for s in v.seeds:
            d = run_dir(root, v, s)
            cmd = command(v.base or base, v, s, fixed, d)
            if emit:
                print(shlex.join(cmd))
            elif (d / "done.json").exists():
                print(f"[ablate] {v.name} seed {s}: done, skipped", flush=True)
            else:
                todo.append((v, s, d, cmd))
    failed: list[str] = []
    if jobs <= 1:
        for job in todo:
            if STOP.is_set():
                break
            failed += _run_one(*job, lr_sweep=lr_sweep, log=None)
    else:
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(_run_one, *job, lr_sweep=lr_sweep, log="ablate.log") for job in todo]
            for f in futures:
                failed += f.result()
    if STOP.is_set():
        raise Stopped(
            "ablate stopped by a signal: the running trainings were stopped (each saved a "
            "checkpoint); rerun the same command to resume."
        )
    if failed:
        raise VoltronError(
            f"{len(failed)} run(s) failed, recorded in failed.json in their folders: {'; '.join(failed)}. "
            "The other runs went on; fix those and rerun the same ablate command: finished runs are skipped."
        )


def _say(line: str) -> None:
    """One progress line, written whole (print's separate newline write interleaves under --jobs)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Stopped(VoltronError):
    """ablate received SIGTERM/SIGINT: its training children were stopped and reaped."""

    exit_status = 143


STOP = threading.Event()  # set by the signal handler: no new run starts
_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()


def _forward_signal(signum, frame) -> None:
    """SIGTERM/SIGINT to ablate: forward SIGTERM to every training child (each saves a checkpoint and
    exits, train.py's PreemptionGuard), start nothing new; `_train` reaps them."""
    del frame
    STOP.set()
    with _CHILDREN_LOCK:
        for proc in _CHILDREN:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)


XLA_CACHE = "xla_cache"  # in a sweep's workdir: the persistent compilation cache all its runs share


def child_env(root: Path) -> dict[str, str]:
    """The environment of a sweep's children: this one's, plus a persistent XLA compilation cache under
    `<root>/xla_cache` shared by every run of the sweep (the seeds, lr points and scorings of an arm compile
    the same programs; a cached program is the same executable, so no result changes), caching every
    program however fast it compiled. A JAX_COMPILATION_CACHE_DIR already set wins (empty: no cache)."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / XLA_CACHE))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


def _train(cmd: list[str], stdout=None, env: dict[str, str] | None = None) -> int:
    """Run one training child to its end and reap it; its exit status."""
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT if stdout else None, env=env)
    with _CHILDREN_LOCK:
        _CHILDREN.add(proc)
    try:
        if STOP.is_set():  # a signal came while it started
            proc.send_signal(signal.SIGTERM)
        return proc.wait()
    except BaseException:  # Ctrl-C or an error in this process: the child must not outlive it
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        with _CHILDREN_LOCK:
            _CHILDREN.discard(proc)


def _run_one(v: Variant, s: int, d: Path, cmd: list[str], lr_sweep: bool, log: str | None) -> list[str]:
    """Train one run; on success (or a diverged lr-sweep point) write its done.json. A failed run is
    recorded in failed.json (command, exit status) and returned as ['name seed s: where its message is'];
    the sweep goes on."""
    if STOP.is_set():
        return []
    where = f" (output: {d / log})" if log else ""
    _say(f"[ablate] {v.name} seed {s}: {shlex.join(cmd[2:])}{where}")
    d.mkdir(parents=True, exist_ok=True)
    env = child_env(d.parent.parent)  # d = <sweep workdir>/<variant>/seed_<s>
    t0 = time.monotonic()
    if log:
        with open(d / log, "w") as f:
            status = _train(cmd, f, env)
    else:
        status = _train(cmd, env=env)
    if STOP.is_set():
        return []  # stopped by a signal: not a result, not a failure; a rerun resumes it
    # A point of an lr sweep that diverges is a result (that lr is too high), not a failure.
    diverged = status == DIVERGED_EXIT and lr_sweep
    if status and not diverged:
        workdir_lib.write_json(d / "failed.json", {"command": cmd, "status": status})
        msg = f"message {'in ' + str(d / log) if log else 'above'}"
        _say(f"[ablate] {v.name} seed {s}: FAILED (exit status {status}; {msg}); recorded, going on")
        return [f"{v.name} seed {s} ({msg})"]
    _say(f"[ablate] {v.name} seed {s}: {'diverged, recorded as infinite loss' if diverged else 'done'}")
    with contextlib.suppress(FileNotFoundError):
        (d / "failed.json").unlink()  # an earlier failure of this run, now fixed
    # wall_s: this process's wall time (a resumed run's last attempt only), for claims_doc's measured hours
    wall = round(time.monotonic() - t0, 1)
    workdir_lib.write_json(d / "done.json", {"command": cmd, "diverged": diverged, "wall_s": wall})
    return []


# ============================================================================ collect


def read_run(d: Path) -> dict:
    """Eval and train records of every phase of one run, in global-step order."""
    evals, trains = [], []
    for folder in workdir_lib.run_dirs(d).values():
        for r in report.read_metrics(folder):  # a torn last line (a killed run) is left out
            (evals if r["kind"] == "eval" else trains).append(r)
    return {"eval": sorted(evals, key=lambda r: r["step"]), "train": sorted(trains, key=lambda r: r["step"])}


def model_stats(base: str, overrides: dict) -> tuple[int, float, int, bool]:
    """(parameter count, forward FLOPs per token, tokens per step, comparable) of a variant's config, for
    the model of its last recipe phase. `comparable` is False when FLOPs do not follow from steps alone:
    a fan-out phase (its members' tokens share the global steps) or a phase that changes the model."""

    c = variant_config(base, overrides)
    names = recipe_lib.phase_order(c.recipe)
    comparable = not any(
        c.recipe[n].fan_out or "model" in c.recipe[n].overrides or c.recipe[n].init.surgery for n in names
    )
    c = config_lib.phase_config(c, names[-1])
    shapes = jax.eval_shape(
        decoder.build_model(c.model).init, jax.random.key(0), jnp.zeros((1, c.data.seq_len), jnp.int32)
    )
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
    return n, decoder.flops_per_token(c.model, c.data.seq_len), c.data.batch_size * c.data.seq_len, comparable


def training_flops(base: str, overrides: dict) -> float:
    """Training FLOPs of a variant's whole recipe: the sum over phases of 3 x the forward FLOPs per token
    of that phase's model x tokens per step x steps x members (fan-out phases train every member)."""
    c = variant_config(base, overrides)
    total = 0.0
    for name in recipe_lib.phase_order(c.recipe):
        pc = config_lib.phase_config(c, name)
        steps = recipe_lib.phase_steps(c.recipe[name], c.max_steps) * max(int(c.recipe[name].fan_out), 1)
        fpt = decoder.flops_per_token(pc.model, pc.data.seq_len)
        total += 3 * fpt * pc.data.batch_size * pc.data.seq_len * steps
    return total


def ensemble_stats(base: str, overrides: dict, evaluate: dict, params: int, fpt: float) -> tuple[int, float]:
    """(parameters, forward FLOPs per token) of what an evaluation arm scores: a c-BTM ensemble holds
    every branch of the recipe's last fan-out phase and runs `top_k` of them per row; 'single' is the run's
    own final model."""
    if evaluate.get("mode") != "cbtm_ensemble":
        return params, fpt
    c = variant_config(base, overrides)
    fanned = [n for n in recipe_lib.phase_order(c.recipe) if c.recipe[n].fan_out]
    branch = config_lib.phase_config(c, fanned[-1])
    shapes = jax.eval_shape(
        decoder.build_model(branch.model).init, jax.random.key(0), jnp.zeros((1, c.data.seq_len), jnp.int32)
    )
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
    per = decoder.flops_per_token(branch.model, branch.data.seq_len)
    return n * int(c.recipe[fanned[-1]].fan_out), per * int(evaluate.get("top_k", 2))


def _median(xs: list[float]) -> float:
    """Median, nan for none (an evaluation-only arm has no training records)."""
    return float(np.median(xs)) if xs else float("nan")


def loss_at_flops(evals: list[dict], flops_per_step: float, budget: float) -> float:
    """Validation loss interpolated at a training-FLOPs budget, only inside the run's measured range:
    nan (n/a) when the budget lies past its last evaluation or before its first (no clamp to the first
    evaluation's loss)."""
    x = np.array([r["step"] * flops_per_step for r in evals])
    y = np.array([r["loss"] for r in evals])
    if not len(x) or not x[0] * (1 - 1e-9) <= budget <= x[-1] * (1 + 1e-9):
        return float("nan")
    return float(np.interp(budget, x, y))


FINAL_EVAL = "final_eval.json"  # in a run's folder: its last checkpoint scored per batch (evaluate.py)


def final_eval_command(d: Path, batches: int) -> list[str]:
    return [
        sys.executable, "-m", "voltron_jax.experiments.evaluate", f"--workdir={d}", f"--batches={batches}",
        "--per_batch", f"--json={d / (FINAL_EVAL + '.part')}",
    ]  # fmt: skip


def run_final_evals(variants: list[Variant], root: Path, emit: bool, jobs: int = 1) -> None:
    """Score each finished final run of an arm with `final_eval` on that many fixed validation batches,
    per batch (skipping runs already scored), `jobs` at once; <run>/final_eval.json is written whole when
    it succeeds."""
    todo = []
    for v in variants:
        for s in v.seeds if v.final_eval else []:
            d = run_dir(root, v, s)
            cmd = final_eval_command(d, v.final_eval)
            if emit:
                print(shlex.join(cmd))
            elif (d / "done.json").exists() and not _scored(d):
                todo.append((v, s, d, cmd))
    with ThreadPoolExecutor(max(jobs, 1)) as pool:
        failed = [x for x in pool.map(lambda job: _final_eval_one(*job), todo) if x]
    if STOP.is_set():
        raise Stopped("ablate stopped by a signal during the final evaluations; rerun the same command.")
    if failed:
        raise VoltronError(f"final evaluation failed: {'; '.join(failed)}; fix and rerun the same command.")


def _scored(d: Path) -> bool:
    """Whether run `d` has a final score newer than its training (a retrained run is scored again)."""
    f, done = d / FINAL_EVAL, d / "done.json"
    return f.exists() and (not done.exists() or f.stat().st_mtime >= done.stat().st_mtime)


def _final_eval_one(v: Variant, s: int, d: Path, cmd: list[str]) -> str:
    """Score one run; '' on success, else where its message is."""
    if STOP.is_set():
        return ""
    part = d / (FINAL_EVAL + ".part")
    with contextlib.suppress(FileNotFoundError):
        part.unlink()  # a killed earlier try: evaluate.py appends
    _say(f"[ablate] {v.name} seed {s}: final evaluation on {v.final_eval} batches")
    t0 = time.monotonic()
    with open(d / "final_eval.log", "w") as f:
        status = _train(cmd, f, child_env(d.parent.parent))
    if STOP.is_set():
        return ""
    if status or not part.exists():
        return f"{v.name} seed {s} (see {d / 'final_eval.log'})"
    record = json.loads(part.read_text().strip().splitlines()[-1])
    record["wall_s"] = round(time.monotonic() - t0, 1)  # the scoring process's wall time
    workdir_lib.write_text(d / FINAL_EVAL, json.dumps(record) + "\n")
    part.unlink()
    return ""


def final_score(d: Path, evals: list[dict]) -> tuple[float, dict[str, float] | None, int | None]:
    """(final validation loss, {batch fingerprint: loss} or None, distinct rows or None) of one run: its
    large fixed-set score
    when it has one (final_eval.json, or an evaluation record carrying `batches`), else the loop's last
    evaluation."""
    if _scored(d):
        r = json.loads((d / FINAL_EVAL).read_text())
        return r["loss"], r["batches"], r.get("distinct_rows")
    last = evals[-1]
    return last["loss"], last.get("batches"), last.get("distinct_rows")


def drop_rate(recs: list[dict], kind: str) -> dict[str, float]:
    """{'MoE': x, 'MoA': y}: per layer kind, the largest over runs of the run's mean drop rate over its
    `kind` ('train' or 'eval') records (report.mean_drop_rates); {} when no record carries one (no MoE)."""
    worst: dict[str, float] = {}
    for r in recs:
        for name, x in report.mean_drop_rates(r[kind]).items():
            worst[name] = max(worst.get(name, 0.0), x)
    return worst


def collect(base: str, variants: list[Variant], fixed: dict, root: Path) -> list[dict]:
    """One row per variant: mean and sample std (ddof=1) over seeds of final/best validation loss, and the
    rest. The final loss is the large fixed-set score where a run has one (final_score). Loss at equal
    FLOPs: at the training-FLOPs total of the arm marked `flops_budget` (the sweep's `equal_flops_of`), else
    the smallest total among the variants that share a base config; n/a (nan) for an arm whose evaluations
    do not span the budget, and for recipes whose FLOPs do not follow from their steps (model_stats)."""
    runs, rows = {}, []
    for v in variants:
        params, fpt, tps, comparable = model_stats(v.base or base, {**fixed, **v.overrides})
        params, fpt = ensemble_stats(v.base or base, {**fixed, **v.overrides}, v.evaluate, params, fpt)
        done = [(s, r) for s in v.seeds if (r := read_run(run_dir(root, v, s)))["eval"]]
        recs = [r for _, r in done]
        runs[v.name] = (recs, 3 * fpt * tps, v.base or base, comparable, v.flops_budget)
        scores = [final_score(run_dir(root, v, s), r["eval"]) for s, r in done]
        if any(b is None for _, b, _ in scores):  # one score for every seed: the loop's when some lack one
            scores = [(r["eval"][-1]["loss"], None, None) for _, r in done]
        trained = recs  # an evaluation-only arm's MoE drop rates are those of the runs it re-scores
        if v.evaluate:
            trained = [read_run(root / v.evaluate["source"] / f"seed_{s}") for s, _ in done]
        rows.append(
            {
                "variant": v.name,
                "arm": v.arm or v.name,
                "lr": v.lr if v.lr is not None else float(load_config(v.base or base).optim.lr),
                "seeds": len(recs),
                "_seeds": [s for s, _ in done],
                "params": params,
                "flops_per_token": fpt,
                "_final": [x for x, _, _ in scores],
                "final_eval_batches": min((len(b) if b else 0 for _, b, _ in scores), default=0),
                "final_eval_rows": min((n for _, _, n in scores if n), default=0),
                "by_batch": {int(s): b for (s, _), (_, b, _) in zip(done, scores) if b},
                "_best": [min(e["loss"] for e in r["eval"]) for r in recs],
                "tokens_per_s": _median([t["tokens_per_s"] for r in recs for t in r["train"]]),
                "steps": recs[0]["eval"][-1]["step"] if recs else 0,
                "train_flops": training_flops(v.base or base, {**fixed, **v.overrides}),
                **{
                    f"drop_rate_{kind}_{name.lower()}": drop_rate(trained, kind).get(name, math.nan)
                    for kind in ("train", "eval")
                    for name in report.drop_metrics().values()
                },
            }
        )
    budgets: dict[str, float] = {}
    chosen = {b for recs, _, b, comparable, mark in runs.values() if recs and comparable and mark}
    for recs, fps, b, comparable, mark in runs.values():
        if recs and comparable and (mark or b not in chosen):
            budgets[b] = min(budgets.get(b, math.inf), recs[0]["eval"][-1]["step"] * fps)
    for row in rows:
        recs, fps, b, comparable, _ = runs[row["variant"]]
        final, best = np.array(row.pop("_final")), np.array(row.pop("_best"))
        at = np.array([loss_at_flops(r["eval"], fps, budgets[b]) if comparable else math.nan for r in recs])
        seeds, by_seed = row.pop("_seeds"), {}
        for key, vals in (("final_loss", final), ("best_loss", best), ("loss_at_equal_flops", at)):
            row[key] = float(np.mean(vals)) if len(vals) else float("nan")
            row[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
            by_seed[key] = {int(s): float(x) for s, x in zip(seeds, vals)}
        row["by_seed"] = by_seed
        row["final_ppl"] = math.exp(row["final_loss"]) if math.isfinite(row["final_loss"]) else float("nan")
    return rows


def spread(row: dict, key: str) -> str:
    """'mean ± std' over seeds; the mean alone for one seed."""
    m = row[key]
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.4f}" if row["seeds"] < 2 else f"{m:.4f} ± {row[key + '_std']:.4f}"


def drops(row: dict) -> str:
    """'train MoE x / MoA y; eval MoE x / MoA y' (worst seed per layer kind) of a row, '' without an MoE."""
    parts = []
    for kind in ("train", "eval"):
        rates = {
            name: x
            for name in report.drop_metrics().values()
            if not math.isnan(x := row.get(f"drop_rate_{kind}_{name.lower()}", math.nan))
        }
        parts.append(f"{kind} {report.format_drop_rates(rates)}")
    return "" if all(p.endswith(" -") for p in parts) else "; ".join(parts)


def markdown(rows: list[dict]) -> str:
    head = (
        "| variant | seeds | params | FLOPs/token | steps | training FLOPs | final val loss | "
        "best val loss | final ppl | val loss at equal FLOPs | final-score batches | "
        "MoE/MoA drop rate, worst seed | tokens/s |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seeds']} | {r['params']:,} | {r['flops_per_token']:.3g} | "
            f"{r['steps']} | {r['train_flops']:.3g} | {spread(r, 'final_loss')} | {spread(r, 'best_loss')} | "
            f"{r['final_ppl']:.3f} | "
            f"{spread(r, 'loss_at_equal_flops')} | {_scored_on(r)} | {drops(r) or '-'} | "
            f"{r['tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def _scored_on(row: dict) -> str:
    """'128 (1,024 distinct rows)', or 'loop' for the loop's own last evaluation."""
    if not row["final_eval_batches"]:
        return "loop"
    rows = f" ({row['final_eval_rows']:,} distinct rows)" if row.get("final_eval_rows") else ""
    return f"{row['final_eval_batches']}{rows}"


def write_outputs(rows: list[dict], base: str, variants: list[Variant], fixed: dict, root: Path) -> None:
    workdir_lib.write_text(root / "results.md", markdown(rows) + "\n")  # each written whole or not at all
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(
        {**r, "by_seed": json.dumps(r["by_seed"]), "by_batch": json.dumps(r["by_batch"])} for r in rows
    )
    workdir_lib.write_text(root / "results.csv", table.getvalue())
    plot(base, variants, fixed, root)


def plot(base: str, variants: list[Variant], fixed: dict, root: Path) -> None:
    import matplotlib  # lazy: matplotlib's backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, v in enumerate(variants):
        _, fpt, tps, comparable = model_stats(v.base or base, {**fixed, **v.overrides})
        for j, s in enumerate(v.seeds):
            ev = read_run(run_dir(root, v, s))["eval"]
            if not ev:
                continue
            x = np.array([r["step"] for r in ev])
            y = [r["loss"] for r in ev]
            kw = dict(color=f"C{i % 10}", alpha=0.85, label=v.name if j == 0 else None)
            a1.plot(x, y, **kw)
            if comparable:  # a recipe with branches or surgery has no single FLOPs-per-step
                a2.plot(x * 3 * fpt * tps, y, **kw)
    a1.set_xlabel("step")
    a2.set_xlabel("training FLOPs")
    a2.set_xscale("log")
    for a in (a1, a2):
        a.set_ylabel("validation loss")
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "losses.png", dpi=110)
    plt.close(fig)


# ============================================================================ claims report


def provenance() -> str:
    """Commit, date and machine lines for a generated report."""

    def git(*args):
        r = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return r.stdout.strip() if r.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " with uncommitted changes"
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, JAX backend {jax.default_backend()}"
    return f"Commit: {commit}. Date: {today}. Machine: {machine}."


def _paired(cl: dict, base: dict | None, var: dict | None) -> tuple[claims_lib.Comparison | None, str]:
    """The paired comparison of two arms' rows (per batch on the large fixed set when both have it) and
    '' or the reason it could not be paired."""
    if not (base and var):
        return None, ""
    metric = cl.get("metric", "final_loss")
    batches = (base["by_batch"], var["by_batch"]) if metric == "final_loss" else (None, None)
    try:
        return claims_lib.compare(base["by_seed"][metric], var["by_seed"][metric], *batches), ""
    except claims_lib.PairingError as e:
        return None, str(e)


def _measure(cl: dict, cmp, base, var, unpaired: str) -> tuple[str, str, str]:
    """(measured text, status, reason) of a 'better'/'parity' claim."""
    status, why = claims_lib.verdict(cl, cmp)
    if unpaired:
        status, why = claims_lib.NOT_TESTABLE, unpaired
    metric = cl.get("metric", "final_loss")
    measured = f"{metric.replace('_', ' ')}: {cmp.describe()}" if cmp else "not run"
    moe = [f"{r['arm']} {d}" for r in (base, var) if r and (d := drops(r))]
    if moe:
        measured += "; MoE/MoA drop rate (worst seed): " + ", ".join(moe)
    if (note := claims_lib.power_note(cl, cmp)) and cl.get("testable", True):
        why = f"{why.strip().rstrip('.')}. {note}"
    return measured, status, why


def _isoflop(cl: dict, by: dict) -> tuple[str, str, str, str]:
    """(arms, measured, status, reason) of an 'isoflop' claim: at each budget the variant against the best
    dense size trained to that budget (lowest mean final loss), as a non-inferiority comparison."""
    parts, statuses, arms = [], [], []
    for label, b in cl["budgets"].items():
        dense = [by[a] for a in b["dense"] if a in by and by[a]["seeds"]]
        var = by.get(b["variant"])
        if not dense or not var:
            parts.append(f"{label}: not run")
            statuses.append(claims_lib.NOT_TESTABLE)
            continue
        best = min(dense, key=lambda r: r["final_loss"])
        cmp, unpaired = _paired(cl, best, var)
        measured, status, why = _measure({**cl, "rule": "parity"}, cmp, best, var, unpaired)
        sizes = ", ".join(f"{r['arm']} {r['final_loss']:.4f}" for r in dense)
        parts.append(
            f"{label}: {var['arm']} vs best dense {best['arm']} (of {sizes}): {measured}; {status}: {why}"
        )
        statuses.append(status)
        arms.append(f"{label}: {var['arm']} ({var['lr']:g}) vs {len(dense)} dense sizes")
    if claims_lib.NOT_TESTABLE in statuses:
        status = claims_lib.NOT_TESTABLE
    else:
        status = claims_lib.HELD if all(s == claims_lib.HELD for s in statuses) else claims_lib.NOT_HELD
    why = "held at every budget" if status == claims_lib.HELD else "not held at every budget"
    return "; ".join(arms) or "not run", " / ".join(parts), status, why


def _width_transfer(cl: dict, curves: dict) -> tuple[str, str, str, str]:
    """(arms, measured, status, reason) of a 'width_transfer' claim from the arms' per-seed lr curves."""
    per = {}
    for name in ("mup", "sp"):
        seeds: dict[int, dict[int, dict[float, float]]] = {}
        for width, arm in cl[name].items():
            for seed, lrs in curves.get(arm, {}).items():
                seeds.setdefault(seed, {})[int(width)] = lrs
        per[name] = seeds
    status, why = claims_lib.width_transfer(per["mup"], per["sp"])
    best = []
    for name in ("mup", "sp"):
        cells = []
        for width, arm in cl[name].items():
            by_seed = curves.get(arm, {})
            got = [f"{claims_lib.best_lr(by_seed[s])[0]:g}" for s in sorted(by_seed) if by_seed[s]]
            cells.append(f"d={width} {'/'.join(got) or '-'}")
        best.append(f"{'muP' if name == 'mup' else 'SP'}: " + ", ".join(cells))
    arms = ", ".join([*cl["mup"].values(), *cl["sp"].values()])
    return arms, "best lr per seed: " + "; ".join(best), status, why


def isoflop_table(rows: list[dict], claims: dict) -> str:
    """Markdown: every arm of each 'isoflop' claim with its training FLOPs and final loss (the isoFLOP
    curves as a table)."""
    by = {r["arm"]: r for r in rows}
    lines = [
        "| budget | arm | params | FLOPs/token | steps | training FLOPs | final val loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cl in claims.values():
        for label, b in cl.get("budgets", {}).items() if cl.get("rule") == "isoflop" else ():
            for a in [*b["dense"], b["variant"]]:
                if (r := by.get(a)) and r["seeds"]:
                    lines.append(
                        f"| {label} | {a} | {r['params']:,} | {r['flops_per_token']:.3g} | {r['steps']} | "
                        f"{r['train_flops']:.3g} | {spread(r, 'final_loss')} |"
                    )
    return "\n".join(lines) if len(lines) > 2 else ""


def isoflop_plot(rows: list[dict], claims: dict, path: Path) -> bool:
    """Final loss against training FLOPs: each dense size across the budgets, the best dense size per
    budget (the isoFLOP minimum) and the routed variant. False when there is nothing to plot."""
    import matplotlib  # lazy: matplotlib's backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use

    by = {r["arm"]: r for r in rows}
    iso = [cl for cl in claims.values() if cl.get("rule") == "isoflop"]
    if not iso:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for cl in iso:
        budgets = [b for b in cl["budgets"].values() if any(by.get(a, {}).get("seeds") for a in b["dense"])]
        best_x, best_y, var_x, var_y = [], [], [], []
        for b in budgets:
            dense = [by[a] for a in b["dense"] if a in by and by[a]["seeds"]]
            for r in dense:
                ax.scatter(r["train_flops"], r["final_loss"], color="0.6", s=14)
                ax.annotate(r["arm"], (r["train_flops"], r["final_loss"]), fontsize=6, color="0.4")
            best = min(dense, key=lambda r: r["final_loss"])
            best_x.append(best["train_flops"])
            best_y.append(best["final_loss"])
            if (v := by.get(b["variant"])) and v["seeds"]:
                var_x.append(v["train_flops"])
                var_y.append(v["final_loss"])
        ax.plot(best_x, best_y, "o-", color="C0", label="best dense size per budget")
        ax.plot(var_x, var_y, "s-", color="C3", label="MoD")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def claims_section(
    rows: list[dict],
    claims: dict,
    cmd: str,
    lrs: str = "",
    notes: str = "",
    curves: dict | None = None,
    plot_name: str = "",
) -> str:
    """Markdown: one row per claim with the arms (each at its own lr), the rule, the paired-seed perplexity
    comparison, its minimal detectable effect and the verdict (voltron_jax/experiments/claims.py); then
    the sweep's notes, the isoFLOP curves (`plot_name`: the PNG beside the report), the lr sweep and every
    arm's numbers. `curves`: {arm: {seed: {lr: final loss}}} for 'width_transfer' rows."""
    by = {r["arm"]: r for r in rows}
    out = [
        "| technique | paper's claim | arms (lr) | rule | our measurement | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for tech, cl in claims.items():
        rule = cl.get("rule", "better")
        if rule == "lr_transfer":
            got = {a: by[a]["lr"] for a in cl["arms"] if a in by and by[a]["seeds"]}
            status, why = claims_lib.lr_transfer(got, cl["grid"])
            arms = ", ".join(cl["arms"])
            measured = "best lr: " + ", ".join(f"{a} {lr:g}" for a, lr in got.items())
        elif rule == "width_transfer":
            arms, measured, status, why = _width_transfer(cl, curves or {})
        elif rule == "isoflop":
            arms, measured, status, why = _isoflop(cl, by)
            rule = f"isoFLOP non-inferiority, margin x{1 + cl.get('margin', 0.01):g}"
        else:
            base, var = by.get(cl["baseline"]), by.get(cl["variant"])
            cmp, unpaired = _paired(cl, base, var)
            measured, status, why = _measure(cl, cmp, base, var, unpaired)
            arms = ", ".join(f"{r['arm']} ({r['lr']:g})" for r in (base, var) if r) or "not run"
            if rule == "parity":
                rule = f"non-inferiority, margin x{1 + cl.get('margin', 0.01):g}"
        if cl.get("margin_why"):
            rule += f" ({cl['margin_why']})"
        if not cl.get("testable", True):
            status, why = claims_lib.NOT_TESTABLE, cl.get("why", "declared not testable")
        out.append(f"| {tech} | {cl['claim']} | {arms} | {rule} | {measured} | {status}: {why.strip()} |")
    seeds = sorted({r["seeds"] for r in rows})
    n_eval = sorted({r["final_eval_batches"] for r in rows if r["seeds"]})
    head = f"Command: `{cmd}`\n\n{provenance()} Seeds per arm: {', '.join(map(str, seeds))}. "
    head += f"Final-score evaluation batches per arm: {', '.join(map(str, n_eval))} (0: the loop's own).\n\n"
    tail = f"\n\n{notes.strip()}" if notes.strip() else ""
    if table := isoflop_table(rows, claims):
        tail += f"\n\nisoFLOP curves (final loss against training FLOPs):\n\n{table}"
        if plot_name:
            tail += f"\n\n![isoFLOP curves]({plot_name})"
    if lrs:
        tail += (
            f"\n\nLearning-rate sweep (each arm's first seed; the table above uses the starred lr):\n\n{lrs}"
        )
    tail += f"\n\nEvery arm at its lr (mean ± sample std over seeds):\n\n{markdown(rows)}"
    return head + "\n".join(out) + tail


def main(argv: list[str] | None = None) -> None:

    argv = list(sys.argv[1:] if argv is None else argv)
    rest, config_flags = cli.split_overrides(argv)  # --config.<field>=... : main's grammar

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--sweep", action="append", default=[], help="old form of --config.field=v1,v2")
    p.add_argument("--sweep_file", default="")
    p.add_argument("--seeds", type=int, default=0, help="seeds per variant (default 1, or the sweep file's)")
    p.add_argument("--set", action="append", default=[], help="old form of --config.field=value")
    p.add_argument("--workdir", required=True)
    p.add_argument("--emit", action="store_true", help="print one launch command per run instead of running")
    p.add_argument("--collect_only", action="store_true")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each logs to <run dir>/ablate.log)")
    p.add_argument(
        "--claims", action="store_true", help="write the verified-claims section to <workdir>/claims.md"
    )
    p.add_argument("--claims_out", default="", help="write the verified-claims section to this markdown file")
    a = p.parse_args(rest)
    a.config_flags = config_flags
    STOP.clear()
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
        previous = {sig: signal.signal(sig, _forward_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _main(a, argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(a, argv) -> None:
    claims, notes = {}, ""
    if a.sweep_file:
        base, variants, fixed, claims, notes = load_sweep_file(a.sweep_file, a.seeds)
        axes, flag_fixed = split_config_flags(load_config(base), a.config_flags)
        if axes:
            raise UsageError(
                f"--config.{axes[0][0]}: a sweep axis on the command line cannot be combined with "
                "--sweep_file (its variants are the sweep); give one value, or add the axis to the file."
            )
    else:
        base = a.config
        axes, flag_fixed = split_config_flags(load_config(base), a.config_flags)
        variants = parse_sweeps(load_config(base), a.sweep, a.seeds or 1, axes)
        fixed = {}
    fixed.update(flag_fixed)
    if (a.claims or a.claims_out) and not claims:
        raise UsageError(
            "--claims needs a --sweep_file whose get_sweep() has 'claims' (configs/sweeps/claims.py)."
        )
    cfg = load_config(base)
    for item in a.set:
        k, _, v = item.partition("=")
        check_field(cfg, k)
        fixed[k] = v
    check_variants(base, variants, fixed)
    root = Path(a.workdir)
    claims_out = a.claims_out or (str(root / "claims.md") if a.claims else "")
    sweep = lr_sweep_runs(variants)  # arms with `lrs` first train their first seed at every lr
    if sweep and not a.collect_only:
        run_all(base, sweep, fixed, root, a.emit, lr_sweep=True, jobs=a.jobs)
    finals, pending = final_runs(variants, root)
    if not a.collect_only:
        run_all(base, finals, fixed, root, a.emit, jobs=a.jobs)
        run_final_evals(finals, root, a.emit, a.jobs)
    if pending and a.emit:
        print(
            f"# then every seed of {', '.join(pending)} at its best lr (rerun without --emit once these ran)"
        )
    if a.emit:
        return
    if pending:
        raise UsageError(
            f"the lr sweep of {', '.join(pending)} has not finished under {root}; run without --collect_only."
        )
    rows = collect(base, finals, fixed, root)
    if not any(r["seeds"] for r in rows):
        raise UsageError(
            f"no run under {root} has finished (no evaluation recorded): nothing to collect. Run without "
            "--collect_only first (or check --workdir)."
        )
    write_outputs(rows, base, finals, fixed, root)
    print(markdown(rows))
    if claims and claims_out:
        cmd = "python -m voltron_jax.experiments.ablate " + " ".join(
            shlex.quote(x) for x in (argv or sys.argv[1:])
        )
        curves = {v.name: lr_finals_by_seed(v, root) for v in variants if v.lrs}
        png = Path(claims_out).with_name(Path(claims_out).stem + "_isoflop.png")
        plotted = isoflop_plot(rows, claims, png)
        text = claims_section(
            rows, claims, cmd, lr_table(variants, root), notes, curves, png.name if plotted else ""
        )
        workdir_lib.write_text(claims_out, text + "\n")
        print(f"[ablate] verified claims written to {claims_out}")


if __name__ == "__main__":
    cli.run(lambda argv: main(argv[1:]), absl_flags=False)
