"""The train loop end to end on the tiny test config: learning, exact resume, SIGTERM, resharding,
partial checkpoints, non-finite losses, two-phase recipes, and sharded == single-device steps."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from configs import tiny
from voltron_jax import config as cfglib
from voltron_jax import sharding, testing, train
from voltron_jax.run import checkpoint


def _config(**kw):
    c = tiny.get_config("test")
    c.train.log_every = 1
    c.train.ckpt_every = 2
    c.train.async_save = False
    for k, v in kw.items():
        section, _, field = k.rpartition(".")
        node = c
        for p in filter(None, section.split(".")):
            node = node[p]
        node[field] = v
    return c


def _losses(workdir, phase_folder="00_stable"):
    recs = [json.loads(x) for x in (workdir / phase_folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def _wrap_train_batches(monkeypatch, fn):
    """Call fn(n, batch) -> batch on every training batch drawn (n counts across phases from 1)."""
    from voltron_jax.data import pipeline

    orig, count = pipeline.make_train_iterator, {"n": 0}

    def make(*a, **kw):
        it = orig(*a, **kw)

        class Wrapped:
            def __next__(self):
                count["n"] += 1
                return fn(count["n"], next(it))

            get_state, set_state = it.get_state, it.set_state

        return Wrapped()

    monkeypatch.setattr(pipeline, "make_train_iterator", make)


def _stop_at(monkeypatch, stop_step, use_signal=False):
    """Preempt the loop right after global step `stop_step` (a real SIGTERM when use_signal)."""
    if use_signal:

        def feed(n, batch):
            if n == stop_step:
                os.kill(os.getpid(), signal.SIGTERM)
            return batch

        _wrap_train_batches(monkeypatch, feed)
    else:
        monkeypatch.setattr(checkpoint.PreemptionGuard, "should_stop", lambda self, step: step == stop_step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted two-phase run (8 stable + 4 decay steps)."""
    wd = tmp_path_factory.mktemp("ref")
    results = train.run(_config(), str(wd))
    return wd, results


@pytest.mark.slow
def test_short_run_lowers_validation_loss_and_leaves_artifacts(reference):
    wd, results = reference
    assert results["decay"]["loss"] < np.log(259) - 0.8  # uniform guess is ln(259) = 5.56
    assert results["decay"]["loss"] < results["stable"]["loss"]
    for f in ("config.json", "run_info.json", "report.md", "losses.png"):
        assert (wd / f).exists(), f
    assert list((wd / "00_stable" / "tb").iterdir())
    info = json.loads((wd / "run_info.json").read_text())
    assert info["versions"]["jax"] and info["corpus_manifest"]
    ck = checkpoint.Checkpointer(wd / "01_decay" / "ckpt")
    assert ck.latest_step() == 12  # global steps continue across phases
    meta = ck.restore_meta()
    assert meta["config"]["model"]["d_model"] == 64 and meta["git_commit"]
    ck.close()


@pytest.mark.slow
def test_sigterm_saves_and_resume_is_exact(reference, tmp_path, monkeypatch):
    ref, _ = reference
    _stop_at(monkeypatch, 5, use_signal=True)
    with pytest.raises(SystemExit, match="preempted"):
        train.run(_config(), str(tmp_path))
    # the signal came as batch 5 was drawn, by the prefetch thread (train.prefetch=2) up to 3 steps early;
    # the checkpoint of that step holds the data state of the batches trained on, so resume is exact
    assert 2 <= checkpoint.Checkpointer(tmp_path / "00_stable" / "ckpt").latest_step() <= 5
    monkeypatch.undo()
    train.run(_config(), str(tmp_path))
    assert _losses(tmp_path) == _losses(ref)  # bit-exact on CPU, including the steps after the resume
    assert _losses(tmp_path, "01_decay") == _losses(ref, "01_decay")


@pytest.mark.slow
def test_resume_onto_a_different_mesh_and_ignore_partial_checkpoint(reference, tmp_path, monkeypatch):
    ref, _ = reference
    _stop_at(monkeypatch, 4)
    with pytest.raises(SystemExit):
        train.run(_config(), str(tmp_path))
    monkeypatch.undo()
    # a save that died mid-write: an uncommitted step folder must never be chosen
    (tmp_path / "00_stable" / "ckpt" / "6.orbax-checkpoint-tmp-1234").mkdir()
    c = _config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
    c.recipe.decay.steps = 0
    c.recipe.decay.stage = "stable"
    train.run(c, str(tmp_path))
    got, want = _losses(tmp_path), _losses(ref)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-4)


@pytest.mark.slow
def test_two_phase_recipe_resumes_in_second_phase(reference, tmp_path, monkeypatch):
    ref, _ = reference
    _stop_at(monkeypatch, 10)
    with pytest.raises(SystemExit):
        train.run(_config(), str(tmp_path))
    assert checkpoint.Checkpointer(tmp_path / "01_decay" / "ckpt").latest_step() == 10
    monkeypatch.undo()
    train.run(_config(), str(tmp_path))
    assert _losses(tmp_path, "01_decay") == _losses(ref, "01_decay")


def _with_later_phases(c):
    """c with its phases after 'stable' replaced by two whose names sort before it ('cont', 'decay')."""
    c.recipe.cont = cfglib.phase(2, mixture="pretrain", init_from=["stable"])
    c.recipe.decay.init.from_ = "cont"
    return c


@pytest.mark.slow
def test_a_phase_trains_the_same_whatever_phases_follow_it(tmp_path):
    """Equal phases under equal seeds give identical batches and params: the 'stable' data order once
    came from the phase's index in the (name-sorted) recipe, so the c-BTX recipe and its ':continue'
    baseline trained different 'stable' phases."""
    from voltron_jax.data import pipeline

    a, b = _config(), _with_later_phases(_config())
    assert list(a.recipe) != list(b.recipe) and a.recipe.stable == b.recipe.stable
    assert train.data_seed(a, "stable", None) == train.data_seed(b, "stable", None)
    assert train.data_seed(a, "stable", None) != train.data_seed(_config(seed=1), "stable", None)
    assert train.data_seed(a, "stable", None) != train.data_seed(a, "decay", None)
    seeds = [train.data_seed(c, "stable", None) for c in (a, b)]
    its = [pipeline.make_train_iterator(c, "pretrain", seed=s) for c, s in zip((a, b), seeds, strict=True)]
    for _ in range(2):
        x, y = (next(it) for it in its)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    params = []
    for name, c in (("a", a), ("b", b)):
        train.run(c, str(tmp_path / name), only_phase="stable")
        (stable,) = [p for p in train.phases(c, tmp_path / name) if p.name == "stable"]
        params.append(train.restore_host(stable)[0])
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    for x, y in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    _wrap_train_batches(monkeypatch, lambda n, b: {**b, "weights": b["weights"] * np.nan} if n >= 3 else b)
    with pytest.raises(train.NonFiniteLoss, match="last good checkpoint"):
        train.run(_config(), str(tmp_path))
    ck = checkpoint.Checkpointer(tmp_path / "00_stable" / "ckpt")
    assert ck.latest_step() == 2
    state, _, _ = ck.restore()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.slow
def test_sharded_step_equals_single_device_step():
    results = {}
    for name, mesh, devices in (
        ("single", dict(data=1, fsdp=1, tensor=1, expert=1), jax.devices()[:1]),
        ("sharded", dict(data=2, fsdp=2, tensor=2, expert=1), jax.devices()),
    ):
        c = _config()
        c.mesh.update(mesh)
        rt = train.Runtime(train.Phase("stable", None, c, None, 0, 2), devices=devices)
        state = rt.scratch()
        batch = testing.synthetic_batch(c)  # [8, 64]
        losses = []
        for _ in range(3):
            state, m = rt.train_step(state, sharding.host_batch_to_global(rt.mesh, batch))
            losses.append(float(m["loss"]))
        results[name] = (losses, float(m["grad_norm"]), jax.device_get(state.params))
    np.testing.assert_allclose(results["single"][0], results["sharded"][0], rtol=1e-5)
    assert results["single"][1] == pytest.approx(results["sharded"][1], rel=1e-4)
    # Adam divides by sqrt(v): reduction-order noise in near-zero gradients shows up as ~1e-5 in params
    for a, b in zip(jax.tree.leaves(results["single"][2]), jax.tree.leaves(results["sharded"][2])):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.slow
def test_moe_drop_rates_reach_the_train_metrics_and_the_evaluation():
    """Every MoE / MoA layer sows its drop rate; the step and the evaluation report the mean over layers,
    and a dropless capacity factor (n_experts / top_k) reports exactly 0."""
    batch = testing.synthetic_batch(_config(), batch_size=4)  # [4, 64]: 256 tokens
    rates = {}
    for factor in (0.25, 2.0):  # 4 experts, top-2: factor 2 gives C = A slots, nothing can drop
        c = _config(**{"model.ffn": "moe", "model.attention": "moa"})
        for m in (c.model.moe, c.model.moa):
            m.update(n_experts=4, top_k=2, capacity_factor=factor)
        rt = train.Runtime(train.Phase("stable", None, c, None, 0, 2), devices=jax.devices()[:1])
        state, m = rt.train_step(rt.scratch(), sharding.host_batch_to_global(rt.mesh, batch))
        ev = train.evaluate(rt, state, [batch])
        rates[factor] = (float(m["moe_drop_rate"]), float(m["moa_drop_rate"]), ev["moe_drop_rate"])
    assert rates[2.0] == (0.0, 0.0, 0.0)
    # C = ceil(0.25 * 256 * 2 / 4) = 32 slots per expert for 512 assignments: at least 3/4 are dropped
    assert all(r >= 0.75 for r in rates[0.25]), rates


def test_unwritable_workdir_fails_clearly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(cfglib.ConfigError, match="not writable"):
        train.run(_config(), str(blocker / "run"))


@pytest.mark.slow
def test_loop_feeds_the_global_step_to_the_state_collection():
    """BitNet warm-in reads the step from the 'state' collection: the same params evaluate differently
    at step 0 (lambda = 0, full precision) and at the end of the ramp (lambda = 1, quantised)."""
    c = _config(**{"model.linear": "bitlinear", "model.bitlinear.warmin_steps": 10})
    rt = train.Runtime(train.Phase("stable", None, c, None, 0, 2))
    state = rt.scratch()
    batch = testing.synthetic_batch(c)  # [8, 64]
    at = {
        s: train.evaluate(rt, state.replace(step=jax.numpy.asarray(s, jax.numpy.int32)), [batch])["loss"]
        for s in (0, 5, 10, 20)
    }
    assert at[0] != at[10] and at[5] not in (at[0], at[10]) and at[10] == at[20]


def test_relative_workdir_checkpoints(tmp_path, monkeypatch):
    """`make demo` passes a relative workdir; Orbax's writer needs absolute paths."""
    monkeypatch.chdir(tmp_path)
    ck = checkpoint.Checkpointer("runs/demo/00_stable/ckpt", async_save=True)
    ck.save(3, {"w": jax.numpy.arange(4.0)}, {"epoch": 0}, {"phase": "stable"})
    ck.wait()
    state, data, meta = ck.restore()
    np.testing.assert_array_equal(state["w"], np.arange(4.0))
    assert (data, meta, ck.latest_step()) == ({"epoch": 0}, {"phase": "stable"}, 3)
    ck.close()
    assert train.check_workdir("runs/demo") == tmp_path / "runs" / "demo"


def test_device_memory_reports_the_largest_peak_and_nothing_on_cpu():
    """The loop logs hbm_peak_gib (the figure to hold against aot_compile's heap) on backends that keep
    memory statistics, the largest over the host's devices; CPU keeps none, so nothing is logged."""
    from voltron_jax.run import metrics

    class Dev:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    gib = 2**30
    devs = [Dev({"peak_bytes_in_use": 3 * gib, "bytes_in_use": gib}), Dev({"peak_bytes_in_use": 5 * gib})]
    assert metrics.device_memory(devs) == {"hbm_peak_gib": 5.0, "hbm_in_use_gib": 1.0}
    assert metrics.device_memory([Dev(None)]) == {}
    assert metrics.device_memory() == {}  # this CPU host
