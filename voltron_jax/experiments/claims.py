"""Verified claims: paired-seed perplexity comparisons and the rules that decide whether a paper's claim held.

Used by `voltron_jax.experiments.ablate --claims_out`. Every claim compares two arms of a sweep (each
arm trained at its own best learning rate, see `best_lr`) on the same seeds. For each seed s the paired
difference of validation losses d_s = loss_variant(s) - loss_baseline(s) (nats) is a log perplexity
ratio; the row reports the perplexity ratio exp(mean d), its 95% Student-t interval over the paired seeds and
the per-seed extremes. Loss percentages are never reported: perplexity is what the papers quote.

Decision rules (`RULES`):
  - 'better': the paper says the variant lowers perplexity. Held only when the whole interval lies below 1,
    i.e. the direction is seen beyond the seed noise.
  - 'parity': the paper claims the variant is no worse (WSD vs cosine, MoD at equal FLOPs, BitNet's small
    gap). A non-inferiority test, named as such: held when the interval's upper end is below 1 + margin.
  - 'lr_transfer': a width sweep under the tensor-program (MiniCPM) parameterisation keeps the best
    learning rate; held when every arm's best lr is within one grid step of the others.
  - 'isoflop' (`voltron_jax.experiments.ablate`): at each FLOP budget the variant against the best of several
    dense sizes each trained to that budget (the isoFLOP curve's minimum), as a 'parity' comparison;
    held only when it holds at every budget.
  - 'width_transfer': muP's best lr moves less with width than a standard-parameterisation control's,
    beyond the seed noise (`width_transfer`).
A claim may also be declared not testable at this scale (`testable=False` with a reason); fewer than
`MIN_SEEDS` paired seeds make any claim not testable.

Noise. With only the final loss of each seed, the interval is over seeds: the mean paired difference
dbar, its standard error se = sd(d_s, ddof=1) / sqrt(S) and df = S - 1. When both arms were also scored
per batch on one large fixed evaluation set (the same tokens for every arm and seed, `batches=`), the
difference d_sb (seed s, batch b) carries two noises: the seeds (training noise) and the finite
evaluation set, which is shared by every seed and so does not show in the spread over seeds. Then
    dbar = mean_sb d_sb,  v_seed = var_s(mean_b d_sb) / S,  v_eval = var_b(mean_s d_sb) / B,
    se = sqrt(v_seed + v_eval),  df = (v_seed + v_eval)^2 / (v_seed^2 / (S-1) + v_eval^2 / (B-1))
(Welch-Satterthwaite), each var with ddof=1; pairing per batch is by the batch's token fingerprint, so two
arms scored on different tokens are refused, never silently compared.

Power. Every row reports its minimal detectable effect (MDE): the smallest true log-perplexity difference
that the design detects with probability POWER at two-sided level ALPHA,
    MDE = (t_{1 - ALPHA/2, df} + t_{POWER, df}) * se      (nats; as a ratio, x exp(MDE)).
A 'better' row can only hold when the true ratio is beyond x exp(-MDE); a 'parity' row at margin m can only
hold (with that power) when the true ratio is below x exp(log(1 + m) - MDE); where that is below 1 the
design cannot show non-inferiority of an equal arm, and the row says so.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats  # a dependency of jax (pinned in constraints.txt)

MIN_SEEDS = 3
RULES = ("better", "parity", "lr_transfer", "isoflop", "width_transfer")
ALPHA, POWER = 0.05, 0.8  # the design: two-sided 95% intervals, MDE at 80% power

HELD, NOT_HELD, NOT_TESTABLE = "held", "not held", "not testable at this scale"


def t_quantile(p: float, df: float) -> float:
    """The p quantile of Student's t with df (possibly fractional) degrees of freedom."""
    return float(stats.t.ppf(p, df))


def t95(df: float) -> float:
    """Two-sided 95% Student-t quantile."""
    return t_quantile(0.975, df)


def mde(se: float, df: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimal detectable effect (nats): (t_{1-alpha/2, df} + t_{power, df}) * se (module docstring)."""
    return (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * se


def seeds_needed(sd: float, effect: float, limit: int = 1000) -> int | None:
    """Fewest paired seeds n with mde(sd / sqrt(n), n - 1) <= effect (nats): how many seeds a design with
    paired-difference sd `sd` needs to detect `effect` (None beyond `limit`)."""
    for n in range(2, limit + 1):
        if mde(sd / math.sqrt(n), n - 1) <= effect:
            return n
    return None


def batch_fingerprint(batch: dict, prefix: int = 0) -> str:
    """A hash of a batch's scored tokens (inputs, targets, weights; `prefix`: the unscored leading
    positions of a c-BTM scoring): equal only for the same tokens scored the same way."""
    h = hashlib.sha1(f"prefix={prefix}".encode())
    for k in ("inputs", "targets", "weights"):
        if k in batch:
            h.update(k.encode() + np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()[:16]


class PairingError(ValueError):
    """Two arms' per-batch scores are not on the same evaluation tokens."""


@dataclass(frozen=True)
class Comparison:
    """Perplexities over paired seeds (geometric means), the ratio variant / baseline and its spread."""

    seeds: tuple[int, ...]
    baseline_ppl: float
    variant_ppl: float
    ratio: float
    low: float  # 95% t interval of the ratio (nan below 2 seeds)
    high: float
    min: float  # per-seed extremes of the ratio
    max: float
    se: float = float("nan")  # standard error of the mean log ratio (nats)
    df: float = float("nan")
    batches: int = 0  # evaluation batches paired per batch (0: seed noise only, final losses)
    se_seed: float = float("nan")  # the two parts of se when batches > 0
    se_eval: float = float("nan")

    @property
    def mde(self) -> float:
        """Minimal detectable effect in nats (module docstring); nan below 2 seeds."""
        return mde(self.se, self.df) if math.isfinite(self.se) and self.df > 0 else float("nan")

    def describe(self) -> str:
        pct = f"{self.ratio - 1:+.1%}"
        if len(self.seeds) < 2:
            return f"ppl {self.baseline_ppl:.3f} -> {self.variant_ppl:.3f}: x{self.ratio:.3f} ({pct}), 1 seed"
        noise = "seed noise only"
        if self.batches:
            noise = (
                f"seed + eval noise over {self.batches} paired batches "
                f"(se: seed {self.se_seed:.4f}, eval {self.se_eval:.4f} nats, in quadrature)"
            )
        return (
            f"ppl {self.baseline_ppl:.3f} -> {self.variant_ppl:.3f}: x{self.ratio:.3f} ({pct}), "
            f"95% CI [{self.low:.3f}, {self.high:.3f}] ({noise}), per seed {self.min:.3f}..{self.max:.3f}, "
            f"{len(self.seeds)} seeds; MDE x{math.exp(self.mde):.3f} at {POWER:.0%} power"
        )


def compare(
    baseline: dict[int, float],
    variant: dict[int, float],
    baseline_batches: dict[int, dict[str, float]] | None = None,
    variant_batches: dict[int, dict[str, float]] | None = None,
) -> Comparison | None:
    """Paired comparison of per-seed validation losses (nats); None when no seed is shared.

    With `*_batches` ({seed: {batch fingerprint: loss}}, the large fixed evaluation set) for every paired
    seed of both arms, the per-seed losses are the batch means and the interval combines seed and
    evaluation noise (module docstring); PairingError when the two arms' batches differ."""
    seeds = tuple(sorted(s for s in baseline if s in variant and math.isfinite(baseline[s] + variant[s])))
    if not seeds:
        return None
    if (
        baseline_batches
        and variant_batches
        and all(s in baseline_batches and s in variant_batches for s in seeds)
    ):
        return _compare_batches(seeds, baseline_batches, variant_batches)
    b = np.array([baseline[s] for s in seeds])
    v = np.array([variant[s] for s in seeds])
    return _comparison(seeds, b, v, v - b)


def _comparison(seeds, b, v, d, se=None, df=None, batches=0, se_seed=math.nan, se_eval=math.nan):
    mean = float(d.mean())
    if se is None and len(d) > 1:
        se, df = float(d.std(ddof=1)) / math.sqrt(len(d)), len(d) - 1
    if se is not None and len(seeds) > 1:
        half = t95(df) * se
        low, high = math.exp(mean - half), math.exp(mean + half)
    else:
        low = high = se = df = float("nan")
    return Comparison(
        seeds, math.exp(b.mean()), math.exp(v.mean()), math.exp(mean), low, high,
        math.exp(d.min()), math.exp(d.max()), se, df, batches, se_seed, se_eval,
    )  # fmt: skip


def _compare_batches(seeds, baseline_batches, variant_batches) -> Comparison:
    keys = sorted(baseline_batches[seeds[0]])
    for arm in (baseline_batches, variant_batches):
        for s in seeds:
            if sorted(arm[s]) != keys:
                raise PairingError(
                    f"seed {s}: the two arms were scored on different evaluation batches (token "
                    f"fingerprints differ); score both on the same fixed set (same data config and batches)."
                )
    b = np.array([[baseline_batches[s][k] for k in keys] for s in seeds])  # [S, B]
    v = np.array([[variant_batches[s][k] for k in keys] for s in seeds])
    d = v - b
    n_s, n_b = d.shape
    v_seed = float(d.mean(axis=1).var(ddof=1)) / n_s if n_s > 1 else math.nan
    v_eval = float(d.mean(axis=0).var(ddof=1)) / n_b if n_b > 1 else 0.0
    se, df = None, None
    if n_s > 1:
        se = math.sqrt(v_seed + v_eval)
        den = v_seed**2 / (n_s - 1) + (v_eval**2 / (n_b - 1) if n_b > 1 else 0.0)
        df = (v_seed + v_eval) ** 2 / den if den > 0 else float(n_s - 1)
    return _comparison(
        seeds, b.mean(axis=1), v.mean(axis=1), d.mean(axis=1), se, df, n_b,
        math.sqrt(v_seed), math.sqrt(v_eval),
    )  # fmt: skip


def power_note(claim: dict, cmp: Comparison | None) -> str:
    """What the design could detect, in words (module docstring: Power)."""
    if cmp is None or not math.isfinite(cmp.mde):
        return ""
    if claim.get("rule", "better") == "parity":
        bound = math.exp(math.log1p(claim.get("margin", 0.01)) - cmp.mde)
        if bound < 1:
            refuted = cmp.low > 1 + claim.get("margin", 0.01)  # verdict(): beyond the margin, not unshown
            return (
                f"Power: non-inferiority is shown with {POWER:.0%} power only for a true ratio below "
                f"x{bound:.3f}, i.e. an equal arm cannot pass"
                + ("." if refuted else "; a 'not held' says little.")
            )
        return f"Power: a true ratio below x{bound:.3f} passes with {POWER:.0%} power."
    return (
        f"Power: an effect beyond x{math.exp(-cmp.mde):.3f} / x{math.exp(cmp.mde):.3f} is detected with "
        f"{POWER:.0%} power."
    )


def _all_seeds(cmp: Comparison) -> str:
    """' but every seed (n) shows ...' when all per-seed ratios lie on one side of 1."""
    if cmp.min > 1:
        return (
            f" Every seed ({len(cmp.seeds)}) shows higher perplexity (x{cmp.min:.3f}..x{cmp.max:.3f}): "
            "the variant hurt here, though not beyond the 95% interval."
        )
    if cmp.max < 1:
        return (
            f" Every seed ({len(cmp.seeds)}) shows lower perplexity (x{cmp.min:.3f}..x{cmp.max:.3f}), "
            "though not beyond the 95% interval."
        )
    return ""


def verdict(claim: dict, cmp: Comparison | None) -> tuple[str, str]:
    """(status, reason) of a 'better' or 'parity' claim given its paired comparison."""
    rule = claim.get("rule", "better")
    if rule not in ("better", "parity"):
        raise ValueError(f"rule {rule!r}: verdict() decides 'better' and 'parity' claims")
    if not claim.get("testable", True):
        return NOT_TESTABLE, claim.get("why", "declared not testable")
    if cmp is None or len(cmp.seeds) < MIN_SEEDS:
        n = 0 if cmp is None else len(cmp.seeds)
        return NOT_TESTABLE, f"{n} paired seeds; the rule needs >= {MIN_SEEDS}"
    if rule == "better":
        if cmp.high < 1:
            return HELD, "lower perplexity across the whole 95% interval"
        if cmp.low > 1:
            return NOT_HELD, "higher perplexity across the whole 95% interval. " + claim.get("why_not", "")
        return NOT_HELD, "the 95% interval includes no difference." + _all_seeds(cmp) + " " + claim.get(
            "why_not", ""
        )
    margin = claim.get("margin", 0.01)
    if cmp.high < 1 + margin:
        return HELD, f"non-inferiority: the interval's upper end is below x{1 + margin:g}"
    if cmp.low > 1 + margin:  # not merely unshown: worse than the margin allows, beyond the noise
        return NOT_HELD, (
            f"worse than the margin x{1 + margin:g} across the whole 95% interval (lower end "
            f"x{cmp.low:.3f}). " + claim.get("why_not", "")
        )
    return NOT_HELD, (
        f"non-inferiority at margin x{1 + margin:g} not shown (upper end x{cmp.high:.3f}). "
        + claim.get("why_not", "")
    )


def best_lr(losses: dict[float, float]) -> tuple[float, bool]:
    """(lr with the lowest loss, whether the grid brackets it: it is not the smallest or largest lr)."""
    finite = {lr: x for lr, x in losses.items() if math.isfinite(x)}
    if not finite:
        raise ValueError(f"no finite loss among learning rates {sorted(losses)}")
    best = min(finite, key=finite.get)
    grid = sorted(losses)
    return best, grid[0] < best < grid[-1]


def lr_transfer(best: dict[str, float], grid: list[float]) -> tuple[str, str]:
    """Held when the arms' best learning rates lie within one step of a shared grid."""
    if len(best) < 2:
        return NOT_TESTABLE, "fewer than two widths ran"
    if off := sorted(arm for arm, lr in best.items() if lr not in grid):
        return NOT_TESTABLE, f"{', '.join(off)} did not sweep the grid {sorted(grid)}"
    idx = {arm: sorted(grid).index(lr) for arm, lr in best.items()}
    spread = max(idx.values()) - min(idx.values())
    text = ", ".join(f"{arm}: {lr:g}" for arm, lr in best.items())
    if spread <= 1:
        return HELD, f"best lr within one grid step across widths ({text})"
    return NOT_HELD, f"best lr moves {spread} grid steps across widths ({text})"


def optimum_log2_lr(losses: dict[float, float]) -> float | None:
    """log2 of the best learning rate, refined between grid points: the vertex of the parabola through the
    grid's best point and its two neighbours in (log2 lr, loss), which lies within one grid step of the best
    point. None when the best point is at an end of the grid (the optimum is not bracketed)."""
    best, bracketed = best_lr(losses)
    if not bracketed:
        return None
    grid = sorted(losses)
    i = grid.index(best)
    x = np.log2(grid[i - 1 : i + 2])
    y = np.array([losses[lr] if math.isfinite(losses[lr]) else 1e9 for lr in grid[i - 1 : i + 2]])
    a, b, _ = np.polyfit(x, y, 2)  # a > 0: the middle point is the lowest of the three
    return float(np.clip(-b / (2 * a), x[0], x[2]))


def width_slope(optima: dict[int, float]) -> float:
    """Least-squares slope of log2(best lr) on log2(width): 0 when the optimum does not move, -1 when it
    falls as 1/width (what a standard parameterisation's Adam lr does for the hidden matrices)."""
    w = np.log2(sorted(optima))
    y = np.array([optima[k] for k in sorted(optima)])
    return float(np.polyfit(w, y, 1)[0])


def width_transfer(
    mup: dict[int, dict[int, dict[float, float]]], sp: dict[int, dict[int, dict[float, float]]]
) -> tuple[str, str]:
    """Decision rule of 'width_transfer': {seed: {width: {lr: final loss}}} for muP and for the SP control.

    Per seed and parameterisation, k = width_slope of the parabola-refined optimum (optimum_log2_lr). With
    S_m, S_s seeds: the shifts |mean k_m| and |mean k_s|, their standard error
    se = sqrt(var(k_m)/S_m + var(k_s)/S_s) (ddof=1) and Welch's df. Rules, in order:
      - not testable: fewer than 2 seeds or 3 widths per parameterisation, a width range under 8x, or any
        optimum at a grid edge (named);
      - not testable: the SP control's optimum does not move beyond its own noise
        (|mean k_s| <= t95(S_s - 1) * sd(k_s) / sqrt(S_s)): this regime cannot tell muP from SP;
      - held when |mean k_s| - |mean k_m| > t95(df) * se: muP's optimum moves less than SP's beyond noise;
      - else not held.
    """
    slopes: dict[str, list[float]] = {}
    for name, runs in (("muP", mup), ("SP", sp)):
        if len(runs) < 2:
            return NOT_TESTABLE, f"{name}: {len(runs)} seed(s); the rule needs >= 2"
        ks = []
        for seed, by_width in sorted(runs.items()):
            widths = sorted(by_width)
            if len(widths) < 3 or widths[-1] < 8 * widths[0]:
                return NOT_TESTABLE, f"{name} seed {seed}: widths {widths}; the rule needs >= 3 over >= 8x"
            optima = {w: optimum_log2_lr(by_width[w]) for w in widths}
            if edge := [w for w, o in optima.items() if o is None]:
                return NOT_TESTABLE, f"{name} seed {seed}: best lr at the grid edge for width(s) {edge}"
            ks.append(width_slope(optima))
        slopes[name] = ks
    km, ks_ = np.array(slopes["muP"]), np.array(slopes["SP"])
    vm, vs = km.var(ddof=1) / len(km), ks_.var(ddof=1) / len(ks_)
    per_seed = {name: ", ".join(f"{k:+.2f}" for k in ks) for name, ks in slopes.items()}
    text = (
        f"log2(best lr) per doubling of width: muP {km.mean():+.2f} (seeds {per_seed['muP']}), "
        f"SP {ks_.mean():+.2f} (seeds {per_seed['SP']})"
    )
    if abs(ks_.mean()) <= t95(len(ks_) - 1) * math.sqrt(vs):
        return NOT_TESTABLE, f"the SP control's optimum does not move beyond noise ({text})"
    se = math.sqrt(vm + vs)
    den = vm**2 / (len(km) - 1) + vs**2 / (len(ks_) - 1)
    df = (vm + vs) ** 2 / den if den > 0 else len(km) + len(ks_) - 2
    gap = abs(ks_.mean()) - abs(km.mean())
    if gap > t95(df) * se:
        return (
            HELD,
            f"muP's optimum moves less than SP's beyond noise (gap {gap:.2f} > {t95(df) * se:.2f}; {text})",
        )
    return NOT_HELD, f"muP's optimum does not move less than SP's beyond noise (gap {gap:.2f}; {text})"


def claim_arms(claim: dict) -> set[str]:
    """The arms one claim row reads: its baseline and variant, an isoflop rule's variant and dense arms
    per budget, a width-transfer rule's muP and SP arms, an lr-transfer rule's arms."""
    arms = {claim.get("baseline"), claim.get("variant"), *claim.get("arms", ())}
    for b in claim.get("budgets", {}).values():
        arms |= {b["variant"], *b["dense"]}
    arms |= set(claim.get("mup", {}).values()) | set(claim.get("sp", {}).values())
    return {a for a in arms if a}
