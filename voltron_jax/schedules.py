"""Learning-rate and weight-decay schedules: pure functions of the GLOBAL step.

A schedule here is `fn(step) -> float32 scalar` with `step` a Python int or a traced int32. It holds
no state, so a resumed run (or a phase that starts from another phase's checkpoint) computes the
same value at the same step, bit for bit, and the lr is a traced scalar inside the jitted step:
branching or resuming never recompiles.

WSD (Warmup-Stable-Decay) follows MiniCPM, arXiv 2404.06395 (techniques-b.md 2.1):
    lr(s) = (s/W) * peak                 s < W
          = peak                         W <= s < T
          = f(s - T) * peak              T <= s,   f decreasing, f(0) = 1
with the exponential half-life form f(n) = 0.5 ** (n / T_half) (the paper's `0.5^((s-S)/T)` is a
notation slip for this), or a linear / cosine tail to `final_frac * peak`. Deviations and choices:
  - After the decay window (T + decay_steps) the lr holds its end value, so a phase that follows a
    decay phase (e.g. SFT "at the end-of-decay lr", paper 2.2) keeps it instead of jumping back.
  - `half_life=0` picks the half-life that lands exactly on `final_frac * peak` at the end of the
    decay window: T_half = decay_steps * ln 2 / ln(1 / final_frac).
  - Cosine is the intended 0.1-floor form `floor + (1 - floor) * (1 + cos(pi p)) / 2`, not the
    paper's literal `0.9 cos(pi s / T) + 0.1` (which goes negative; see techniques-b.md 2.1).

The decay start T is not a number in the config: it is the global start step of the phase with
stage='decay' (voltron_jax/recipe.py phase_start), and the decay length is that phase's steps, both
after `config.max_steps` capping. BitNet b1.58's two-stage lr (techniques-a.md 1.5) multiplies any
schedule by `optim.lr_stage2_factor` from `optim.lr_stage2_step`; its weight-decay switch to 0 is
`wd_schedule`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from voltron_jax import recipe
from voltron_jax.errors import ConfigError

NAMES = ("constant", "cosine", "wsd")  # schedule.name

Schedule = Callable[[int | jax.Array], jax.Array]
DECAY_SHAPES = ("exp", "linear", "cosine")


def _steps(step) -> jax.Array:
    return jnp.asarray(step, jnp.int32)


def _warmup(peak: float, warmup: int, s: jax.Array) -> jax.Array:
    """peak * s / W before W, exactly peak from W on (and when W == 0)."""
    if warmup <= 0:
        return jnp.full((), peak, jnp.float32)
    ramp = jnp.float32(peak) * (s.astype(jnp.float32) / jnp.float32(warmup))
    # `where`, not min(s, W) / W: XLA may fold the constants and miss peak by an ulp in the stable phase
    return jnp.where(s >= warmup, jnp.float32(peak), ramp)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def constant(peak: float, warmup: int = 0) -> Schedule:
    """`peak` after an optional linear warmup of `warmup` steps."""
    _check(warmup >= 0, f"schedule.warmup={warmup} must be >= 0.")
    return lambda step: _warmup(peak, warmup, _steps(step))


def cosine(peak: float, warmup: int, total: int, final_frac: float = 0.1) -> Schedule:
    """Linear warmup, then a cosine from peak at `warmup` to final_frac * peak at `total`, held after."""
    _check(
        0 <= warmup < total,
        f"cosine schedule: need 0 <= warmup ({warmup}) < total ({total}); set "
        "schedule.total (0 = the recipe's total steps) or shorten schedule.warmup.",
    )
    _check(0.0 <= final_frac <= 1.0, f"schedule.final_frac={final_frac} must be in [0, 1].")

    def fn(step):
        s = _steps(step)
        p = jnp.clip(s - warmup, 0, total - warmup).astype(jnp.float32) / jnp.float32(total - warmup)
        f = 1.0 - (1.0 - final_frac) * 0.5 * (1.0 - jnp.cos(jnp.pi * p))  # exactly 1 at p = 0
        return _warmup(peak, warmup, s) * f.astype(jnp.float32)

    return fn


def wsd(
    peak: float,
    warmup: int,
    decay_start: int,
    decay_steps: int,
    shape: str = "exp",
    half_life: float = 0.0,
    final_frac: float = 0.1,
) -> Schedule:
    """Warmup-Stable-Decay. `decay_steps <= 0` means no decay (warmup + stable only).

    Args:
      peak: the stable learning rate.
      warmup: linear warmup steps (lr(0) = 0, lr(warmup) = peak).
      decay_start: global step T at which the decay begins (lr(T) = peak).
      decay_steps: length of the decay window; the lr holds its end value afterwards.
      shape: 'exp' (half-life), 'linear' or 'cosine' (both reach final_frac * peak at the window's end).
      half_life: exp only; steps per halving; 0 picks the one ending at final_frac * peak.
      final_frac: end-of-decay lr as a fraction of peak (linear, cosine, and exp when half_life=0).
    """
    _check(
        shape in DECAY_SHAPES, f"schedule.decay_shape={shape!r} is not valid; choose one of {DECAY_SHAPES}."
    )
    _check(warmup >= 0 and half_life >= 0, "schedule.warmup and schedule.half_life must be >= 0.")
    _check(0.0 <= final_frac <= 1.0, f"schedule.final_frac={final_frac} must be in [0, 1].")
    if shape == "exp" and half_life == 0 and decay_steps > 0:
        _check(
            0.0 < final_frac < 1.0,
            f"exp decay with schedule.half_life=0 derives the half-life from "
            f"schedule.final_frac={final_frac}, which must be in (0, 1); "
            "set schedule.half_life instead.",
        )
        half_life = decay_steps * math.log(2.0) / math.log(1.0 / final_frac)

    def fn(step):
        s = _steps(step)
        base = _warmup(peak, warmup, s)
        if decay_steps <= 0:
            return base
        n = jnp.clip(s - decay_start, 0, decay_steps).astype(jnp.float32)  # steps into the decay
        if shape == "exp":
            f = jnp.power(jnp.float32(0.5), n / jnp.float32(half_life))
        else:
            ramp = n / decay_steps if shape == "linear" else 0.5 * (1.0 - jnp.cos(jnp.pi * n / decay_steps))
            # Never below the end value: under jit XLA turns `/ decay_steps` into `* (1 / decay_steps)`,
            # so a linear decay to 0 ended at -5e-8 and stayed there for every later phase.
            f = jnp.maximum(1.0 - (1.0 - final_frac) * ramp, final_frac)
        return base * f.astype(jnp.float32)

    return fn


def two_stage(fn: Schedule, stage2_step: int, factor: float) -> Schedule:
    """`fn` times `factor` from global step `stage2_step` on (BitNet b1.58 two-stage lr)."""
    one, f = jnp.float32(1.0), jnp.float32(factor)
    return lambda step: fn(step) * jnp.where(_steps(step) >= stage2_step, f, one)


# --------------------------------------------------------------------------------------------- from config


def recipe_total_steps(config) -> int:
    """The longest global step count over the recipe's phases (end of the last phase of any chain)."""
    r = config.recipe
    return max(
        recipe.phase_start(r, n, config.max_steps) + recipe.phase_steps(r[n], config.max_steps) for n in r
    )


def decay_window(config, phase_name: str) -> tuple[int, int]:
    """(global start, steps) of the WSD decay that governs `phase_name`, or (0, 0) if none does.

    The governing decay is that of the phase itself if its stage is 'decay', else that of its nearest
    ancestor (first-parent chain) with stage 'decay': a phase after the decay keeps the end-of-decay lr.
    """
    r, name = config.recipe, phase_name
    if name not in r:
        raise ConfigError(f"phase {name!r} is not in config.recipe; phases are {list(r.keys())}.")
    while True:
        if r[name].stage == "decay":
            return (
                recipe.phase_start(r, name, config.max_steps),
                recipe.phase_steps(r[name], config.max_steps),
            )
        ps = recipe.parents(r[name])
        if not ps:
            return 0, 0
        name = ps[0]


def lr_schedule(config, phase_name: str) -> Schedule:
    """The learning rate of `phase_name` as a function of the global step (config.schedule, optim.lr)."""
    s, peak = config.schedule, config.optim.lr
    _check(peak > 0, f"optim.lr={peak} must be positive.")
    if s.name == "constant":
        fn = constant(peak, s.warmup)
    elif s.name == "cosine":
        fn = cosine(peak, s.warmup, s.total or recipe_total_steps(config), s.final_frac)
    elif s.name == "wsd":
        start, steps = decay_window(config, phase_name)
        fn = wsd(peak, s.warmup, start, steps, s.decay_shape, s.half_life, s.final_frac)
    else:
        raise ConfigError(f"schedule.name={s.name!r} is not valid; choose one of {NAMES}.")
    if config.optim.lr_stage2_step >= 0:
        fn = two_stage(fn, config.optim.lr_stage2_step, config.optim.lr_stage2_factor)
    return fn


def wd_schedule(config) -> Schedule:
    """optim.weight_decay, dropping to 0 from global step optim.wd_zero_step when that is >= 0."""
    wd, zero = config.optim.weight_decay, config.optim.wd_zero_step
    _check(wd >= 0, f"optim.weight_decay={wd} must be >= 0.")
    if zero < 0:
        return lambda step: jnp.full((), wd, jnp.float32)
    return lambda step: jnp.where(_steps(step) >= zero, jnp.float32(0.0), jnp.float32(wd))
