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
A claim may also be declared not testable at this scale (`testable=False` with a reason); fewer than
`MIN_SEEDS` paired seeds make any claim not testable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_SEEDS = 3
RULES = ("better", "parity", "lr_transfer")
# Two-sided 95% Student-t quantiles by degrees of freedom (scipy is not a dependency).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

HELD, NOT_HELD, NOT_TESTABLE = "held", "not held", "not testable at this scale"


def t95(df: int) -> float:
    return _T95.get(df, 1.96 if df > 30 else 2.2)


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

    def describe(self) -> str:
        pct = f"{self.ratio - 1:+.1%}"
        if len(self.seeds) < 2:
            return f"ppl {self.baseline_ppl:.3f} -> {self.variant_ppl:.3f}: x{self.ratio:.3f} ({pct}), 1 seed"
        return (
            f"ppl {self.baseline_ppl:.3f} -> {self.variant_ppl:.3f}: x{self.ratio:.3f} ({pct}), "
            f"95% CI [{self.low:.3f}, {self.high:.3f}], per seed {self.min:.3f}..{self.max:.3f}, "
            f"{len(self.seeds)} seeds"
        )


def compare(baseline: dict[int, float], variant: dict[int, float]) -> Comparison | None:
    """Paired comparison of per-seed validation losses (nats); None when no seed is shared."""
    seeds = tuple(sorted(s for s in baseline if s in variant and math.isfinite(baseline[s] + variant[s])))
    if not seeds:
        return None
    b = np.array([baseline[s] for s in seeds])
    v = np.array([variant[s] for s in seeds])
    d = v - b
    mean = float(d.mean())
    if len(d) > 1:
        half = t95(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
        low, high = math.exp(mean - half), math.exp(mean + half)
    else:
        low = high = float("nan")
    return Comparison(
        seeds, math.exp(b.mean()), math.exp(v.mean()), math.exp(mean), low, high,
        math.exp(d.min()), math.exp(d.max()),
    )  # fmt: skip


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
        return NOT_HELD, "the 95% interval includes no difference. " + claim.get("why_not", "")
    margin = claim.get("margin", 0.01)
    if cmp.high < 1 + margin:
        return HELD, f"non-inferiority: the interval's upper end is below x{1 + margin:g}"
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
