"""Schedules: WSD shape and continuity (MiniCPM, techniques-b.md 2.1/2.5), decay start from the recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from voltron_jax import config as cfglib
from voltron_jax import schedules

PEAK, W, T, D, HALF = 1e-2, 10, 50, 40, 10


def values(fn, steps):
    """fn at each step, evaluated under jit with a traced int32 step (as inside the train step)."""
    return np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(steps, jnp.int32)))


def test_wsd_exp_paper_properties():
    fn = schedules.wsd(PEAK, W, T, D, "exp", half_life=HALF)
    lr = values(fn, np.arange(T + D + 20))
    np.testing.assert_allclose(lr[: W + 1], PEAK * np.arange(W + 1) / W, rtol=1e-6)  # warmup, lr(W) = peak
    assert np.all(lr[W:T] == np.float32(PEAK))  # constant on [W, T)
    assert np.all(np.diff(lr[T:]) <= 0)  # monotone after T
    assert np.all(np.diff(lr[T : T + D + 1]) < 0)  # strictly decaying inside the window
    for n in range(D // HALF + 1):
        np.testing.assert_allclose(lr[T + n * HALF], PEAK * 0.5**n, rtol=1e-6)  # half-life form
    assert np.all(lr[T + D :] == lr[T + D])  # holds the end value after the window


@pytest.mark.parametrize("shape", ["exp", "linear", "cosine"])
def test_wsd_continuity_and_end(shape):
    fn = schedules.wsd(PEAK, W, T, D, shape, half_life=0, final_frac=0.1)
    lr = values(fn, np.arange(T + D + 5))
    # continuous at the boundaries: one step moves the lr by at most one warmup increment / decay slope
    for b in (W, T, T + D):
        assert abs(lr[b] - lr[b - 1]) <= PEAK / W + 1e-9
    assert lr[T] == np.float32(PEAK) and lr[T - 1] == np.float32(PEAK)
    np.testing.assert_allclose(lr[T + D], 0.1 * PEAK, rtol=1e-5)  # all shapes land on final_frac * peak
    half = {"exp": np.sqrt(0.1), "linear": 0.55, "cosine": 0.55}[shape]  # value half way through the decay
    np.testing.assert_allclose(lr[T + D // 2], half * PEAK, rtol=1e-5)
    assert np.all(np.diff(lr[T:]) <= 0)


def test_wsd_resume_bitwise_and_python_int():
    fn = schedules.wsd(PEAK, W, T, D, "exp", half_life=HALF)
    full = values(fn, np.arange(T + D))
    step_fn = jax.jit(fn)
    for s in (0, W - 1, W, T - 1, T, T + 7, T + D - 1):
        resumed = np.asarray(step_fn(jnp.int32(s)))  # a fresh evaluation at the resume step
        assert resumed.tobytes() == full[s].tobytes()
        np.testing.assert_allclose(np.asarray(fn(s)), full[s], rtol=1e-6)  # python int, eager


def test_cosine_and_constant():
    lr = values(schedules.cosine(PEAK, W, 110, final_frac=0.1), np.arange(120))
    np.testing.assert_allclose(lr[W], PEAK, rtol=1e-6)
    np.testing.assert_allclose(lr[60], 0.55 * PEAK, rtol=1e-5)  # half way: floor + half the range
    np.testing.assert_allclose(lr[110:], 0.1 * PEAK, rtol=1e-5)
    assert np.all(np.diff(lr[W:]) <= 0)
    c = values(schedules.constant(PEAK, warmup=4), np.arange(8))
    np.testing.assert_allclose(c, PEAK * np.minimum(np.arange(8), 4) / 4, rtol=1e-6)


def test_bad_schedules_fail_clearly():
    with pytest.raises(cfglib.ConfigError, match="final_frac"):
        schedules.wsd(PEAK, W, T, D, "exp", half_life=0, final_frac=0.0)
    with pytest.raises(cfglib.ConfigError, match="decay_shape"):
        schedules.wsd(PEAK, W, T, D, "step")
    with pytest.raises(cfglib.ConfigError, match="schedule.total"):
        schedules.cosine(PEAK, 10, 10)


def tiny_config(**kw):
    c = tiny.get_config("test")  # recipe: stable 8 steps -> decay 4 steps, warmup 2
    c.schedule.half_life = 1
    for k, v in kw.items():
        c[k] = v
    return c


def test_decay_start_derived_from_recipe():
    c = tiny_config()
    assert schedules.decay_window(c, "decay") == (8, 4)
    assert schedules.decay_window(c, "stable") == (0, 0)
    lr = values(schedules.lr_schedule(c, "decay"), np.arange(14))
    np.testing.assert_allclose(lr[2:9], c.optim.lr, rtol=1e-6)  # warmup 2; decay from the phase's start 8
    np.testing.assert_allclose(lr[8:13], c.optim.lr * 0.5 ** np.arange(5), rtol=1e-6)
    assert lr[13] == lr[12]  # held after the decay phase's 4 steps
    stable = values(schedules.lr_schedule(c, "stable"), np.arange(14))
    np.testing.assert_allclose(stable[2:], c.optim.lr, rtol=1e-6)  # a stable phase never decays


def test_decay_start_with_max_steps_capping():
    c = tiny_config(max_steps=3)  # every phase capped at 3 steps: decay = global steps [3, 6)
    assert schedules.decay_window(c, "decay") == (3, 3)
    lr = values(schedules.lr_schedule(c, "decay"), np.arange(8))
    np.testing.assert_allclose(lr[3:7], c.optim.lr * 0.5 ** np.arange(4), rtol=1e-6)


def test_phase_after_decay_keeps_end_of_decay_lr():
    c = tiny_config()
    c.recipe.sft = cfglib.phase(5, mixture="decay", stage="stable", init_from=["decay"])
    assert schedules.decay_window(c, "sft") == (8, 4)
    lr = values(schedules.lr_schedule(c, "sft"), np.arange(12, 17))
    np.testing.assert_allclose(lr, c.optim.lr * 0.5**4, rtol=1e-6)
    assert schedules.recipe_total_steps(c) == 17


def test_bitnet_two_stage_lr_and_wd_switch():
    c = tiny_config()
    c.schedule.name = "constant"
    c.schedule.warmup = 0
    c.optim.lr_stage2_step, c.optim.lr_stage2_factor = 6, 2 / 3
    c.optim.weight_decay, c.optim.wd_zero_step = 0.1, 5
    lr = values(schedules.lr_schedule(c, "stable"), np.arange(10))
    np.testing.assert_allclose(lr, c.optim.lr * np.where(np.arange(10) >= 6, 2 / 3, 1.0), rtol=1e-6)
    wd = values(schedules.wd_schedule(c), np.arange(10))
    np.testing.assert_allclose(wd, np.where(np.arange(10) >= 5, 0.0, 0.1), rtol=1e-6)
    c.optim.wd_zero_step = -1
    assert np.all(values(schedules.wd_schedule(c), np.arange(10)) == np.float32(0.1))


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_jitted_decay_to_zero_never_goes_negative(shape):
    """XLA rewrites `/ decay_steps` as `* (1 / decay_steps)`: unclamped, a linear decay to 0 ended at
    -5.2e-08 and stayed there for every later phase."""
    fn = jax.jit(schedules.wsd(1.0, 0, 0, 30, shape, 0.0, 0.0))
    lr = np.array([float(fn(s)) for s in range(0, 60)])
    assert lr.min() >= 0.0 and lr[30] == 0.0 and np.all(lr[30:] == 0.0)
    assert np.all(np.diff(lr[:31]) < 0)  # still strictly decaying inside the window
