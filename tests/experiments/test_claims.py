"""Verified-claims machinery: paired perplexity statistics, the decision rules, per-arm lr selection, and
the report that `ablate --claims_out` writes (fabricated runs for speed; one slow real quick sweep)."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from voltron_jax.errors import UsageError
from voltron_jax.experiments import ablate
from voltron_jax.experiments import claims as cl

QUICK = "configs/sweeps/claims.py:quick"


def test_paired_comparison_is_a_perplexity_ratio_with_a_t_interval():
    base = {0: 2.00, 1: 2.10, 2: 1.90, 7: 3.0}  # seed 7 has no partner: ignored
    var = {0: 1.90, 1: 2.02, 2: 1.79}
    c = cl.compare(base, var)
    d = [-0.10, -0.08, -0.11]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert c.seeds == (0, 1, 2)
    assert c.ratio == pytest.approx(math.exp(mean))
    assert c.high == pytest.approx(math.exp(mean + 4.302653 * sd / math.sqrt(3)))
    assert c.low == pytest.approx(math.exp(mean - 4.302653 * sd / math.sqrt(3)))
    assert (c.min, c.max) == pytest.approx((math.exp(-0.11), math.exp(-0.08)))
    assert c.baseline_ppl == pytest.approx(math.exp(2.0)) and c.variant_ppl == pytest.approx(
        math.exp(1.9033333)
    )
    assert "95% CI" in c.describe() and "3 seeds" in c.describe()
    assert cl.compare({0: 1.0}, {1: 1.0}) is None


def test_better_needs_the_whole_interval_below_one():
    clear = cl.compare({0: 2.0, 1: 2.1, 2: 1.9}, {0: 1.9, 1: 2.02, 2: 1.79})
    noisy = cl.compare({0: 2.0, 1: 2.1, 2: 1.9}, {0: 1.9, 1: 2.12, 2: 1.85})  # one seed goes the other way
    worse = cl.compare({0: 2.0, 1: 2.1, 2: 1.9}, {0: 2.1, 1: 2.18, 2: 2.01})
    assert cl.verdict({}, clear)[0] == cl.HELD
    status, why = cl.verdict({"why_not": "too small"}, noisy)
    assert status == cl.NOT_HELD and "includes no difference" in why and "too small" in why
    assert cl.verdict({}, worse) == (cl.NOT_HELD, "higher perplexity across the whole 95% interval. ")


def test_parity_is_non_inferiority_at_a_margin():
    slightly_worse = cl.compare({0: 2.0, 1: 2.1, 2: 1.9}, {0: 2.01, 1: 2.105, 2: 1.912})
    assert slightly_worse.ratio > 1
    assert cl.verdict({"rule": "parity", "margin": 0.05}, slightly_worse)[0] == cl.HELD
    status, why = cl.verdict({"rule": "parity", "margin": 0.001}, slightly_worse)
    assert status == cl.NOT_HELD and "non-inferiority" in why and "not shown" in why
    # an interval wholly above the margin is a refutation at this scale, not a lack of evidence
    clearly_worse = cl.compare({0: 2.0, 1: 2.1, 2: 1.9}, {0: 2.13, 1: 2.25, 2: 2.07})
    assert clearly_worse.low > 1.05
    status, why = cl.verdict({"rule": "parity", "margin": 0.05}, clearly_worse)
    assert status == cl.NOT_HELD and why.startswith("worse than the margin x1.05 across the whole 95%")
    note = cl.power_note({"rule": "parity", "margin": 0.05}, clearly_worse)
    assert "an equal arm cannot pass" in note and "says little" not in note  # low power, yet refuted


def test_too_few_seeds_or_a_declared_limit_is_not_testable():
    two = cl.compare({0: 2.0, 1: 2.1}, {0: 1.0, 1: 1.1})
    assert cl.verdict({}, two) == (cl.NOT_TESTABLE, "2 paired seeds; the rule needs >= 3")
    assert cl.verdict({}, None)[0] == cl.NOT_TESTABLE
    assert cl.verdict({"testable": False, "why": "no ensemble"}, two) == (cl.NOT_TESTABLE, "no ensemble")
    with pytest.raises(ValueError, match="lr_transfer"):
        cl.verdict({"rule": "lr_transfer"}, two)


def test_best_lr_flags_an_unbracketed_optimum_and_lr_transfer_counts_grid_steps():
    assert cl.best_lr({1e-3: 2.0, 2e-3: 1.9, 4e-3: 2.2}) == (2e-3, True)
    assert cl.best_lr({1e-3: 2.0, 2e-3: 1.9, 4e-3: 1.8}) == (4e-3, False)
    assert cl.best_lr({1e-3: 2.0, 2e-3: math.nan}) == (1e-3, False)
    grid = [1e-3, 2e-3, 4e-3, 8e-3]
    assert cl.lr_transfer({"a": 2e-3, "b": 4e-3}, grid)[0] == cl.HELD
    status, why = cl.lr_transfer({"a": 1e-3, "b": 8e-3}, grid)
    assert status == cl.NOT_HELD and "3 grid steps" in why
    assert cl.lr_transfer({"a": 1e-3, "b": 3e-3}, grid)[0] == cl.NOT_TESTABLE
    assert cl.lr_transfer({"a": 1e-3}, grid)[0] == cl.NOT_TESTABLE


def test_minimal_detectable_effect_matches_a_hand_computation():
    """MDE = (t_{0.975, n-1} + t_{0.80, n-1}) * sd / sqrt(n): n=3, sd=0.05 -> (4.303 + 1.061) * 0.0289."""
    assert cl.mde(0.05 / math.sqrt(3), 2) == pytest.approx((4.3027 + 1.0607) * 0.05 / math.sqrt(3), rel=1e-4)
    assert cl.mde(0.05 / math.sqrt(5), 4) == pytest.approx((2.7764 + 0.9410) * 0.05 / math.sqrt(5), rel=1e-4)
    c = cl.compare({0: 2.0, 1: 2.1, 2: 1.9}, {0: 1.9, 1: 2.02, 2: 1.79})
    sd = math.sqrt(sum((x + 0.09667) ** 2 for x in (-0.10, -0.08, -0.11)) / 2)
    assert c.se == pytest.approx(sd / math.sqrt(3), rel=1e-3) and c.df == 2
    assert c.mde == pytest.approx((4.3027 + 1.0607) * sd / math.sqrt(3), rel=1e-3)
    assert f"MDE x{math.exp(c.mde):.3f} at 80% power" in c.describe()
    more = cl.compare({s: 2.0 + 0.01 * s for s in range(5)}, {s: 1.9 + 0.012 * s for s in range(5)})
    assert more.df == 4 and more.mde < (2.7765 + 0.9410) * 0.02  # 5 seeds: t quantiles shrink


def test_seeds_needed_is_the_fewest_seeds_whose_mde_reaches_the_effect():
    # sd 0.05, effect 0.1 nats: n=3 gives (4.303 + 1.061) * 0.05 / 1.732 = 0.155 > 0.1; n=4 gives
    # (3.182 + 0.978) * 0.025 = 0.104 > 0.1; n=5 gives (2.776 + 0.941) * 0.05 / 2.236 = 0.0831 <= 0.1
    assert cl.seeds_needed(0.05, 0.1) == 5
    assert cl.seeds_needed(0.05, 1e-6, limit=50) is None


def test_power_note_says_when_an_equal_arm_cannot_pass_non_inferiority():
    wide = cl.compare({0: 2.0, 1: 2.1, 2: 1.9}, {0: 2.05, 1: 2.05, 2: 1.95})  # sd of d ~ 0.06
    assert "an equal arm cannot pass" in cl.power_note({"rule": "parity", "margin": 0.01}, wide)
    tight = cl.compare({0: 2.0, 1: 2.1, 2: 1.9}, {0: 2.001, 1: 2.1005, 2: 1.9012})
    note = cl.power_note({"rule": "parity", "margin": 0.05}, tight)
    assert "passes with 80% power" in note
    bound = math.exp(math.log(1.05) - tight.mde)
    assert f"x{bound:.3f}" in note and 1 < bound < 1.05


def _batches(seed_shift, batch_effect, n_batches, noise_seed):
    """{seed: {fingerprint: loss}} for 3 seeds: a per-seed offset plus a per-batch term plus noise."""
    rng = np.random.default_rng(noise_seed)
    return {
        s: {
            f"b{b:03d}": 2.0 + seed_shift[s] + batch_effect[b] + 0.001 * rng.normal()
            for b in range(n_batches)
        }
        for s in range(3)
    }


def test_per_batch_pairing_and_the_seed_plus_eval_interval():
    """The interval over seed and evaluation noise: hand-computed v_seed, v_eval and Welch df."""
    rng = np.random.default_rng(0)
    hard = rng.normal(0, 0.3, 128)  # batch difficulty: shared by both arms, cancels in the pairing
    gain = rng.normal(-0.02, 0.018, 128)  # the per-batch difference the variant makes
    base = _batches([0.0, 0.03, -0.02], hard, 128, 1)
    var = _batches([0.0, 0.03, -0.02], hard + gain, 128, 2)
    var = {s: {k: x + (0.004, -0.003, 0.001)[s] for k, x in b.items()} for s, b in var.items()}
    c = cl.compare({s: 0.0 for s in range(3)}, {s: 0.0 for s in range(3)}, base, var)
    keys = sorted(base[0])
    d = np.array([[var[s][k] - base[s][k] for k in keys] for s in range(3)])
    v_seed = d.mean(1).var(ddof=1) / 3
    v_eval = d.mean(0).var(ddof=1) / 128
    df = (v_seed + v_eval) ** 2 / (v_seed**2 / 2 + v_eval**2 / 127)
    assert c.batches == 128 and c.ratio == pytest.approx(math.exp(d.mean()))
    assert c.se == pytest.approx(math.sqrt(v_seed + v_eval)) and c.df == pytest.approx(df)
    assert c.se_eval == pytest.approx(math.sqrt(v_eval)) and c.se_eval > 0.001  # the eval set's own noise
    assert c.high == pytest.approx(math.exp(d.mean() + cl.t95(df) * c.se))
    assert "seed + eval noise over 128 paired batches" in c.describe()
    # batch difficulty (sd 0.3) cancels in the pairing: unpaired, se would be ~0.3 / sqrt(128) ~ 0.027
    assert c.se < 0.01
    # seed noise alone (the final-loss comparison) misses the evaluation set's noise
    alone = cl.compare(
        {s: float(np.mean(list(base[s].values()))) for s in range(3)},
        {s: float(np.mean(list(var[s].values()))) for s in range(3)},
    )
    assert alone.ratio == pytest.approx(c.ratio) and alone.se < c.se


def test_arms_scored_on_different_tokens_are_refused():
    base = {s: {"a": 2.0, "b": 2.1} for s in range(3)}
    var = {s: {"a": 1.9, "c": 2.0} for s in range(3)}
    with pytest.raises(cl.PairingError, match="different evaluation batches"):
        cl.compare({s: 2.0 for s in range(3)}, {s: 2.0 for s in range(3)}, base, var)


def test_every_seed_showing_harm_is_said_even_inside_the_interval():
    hurt = cl.compare({0: 2.0, 1: 2.1, 2: 1.9}, {0: 2.05, 1: 2.25, 2: 1.92})
    assert hurt.low < 1 < hurt.high and hurt.min > 1
    status, why = cl.verdict({"why_not": "short rows"}, hurt)
    assert status == cl.NOT_HELD and "Every seed (3) shows higher perplexity" in why and "hurt" in why


def _lr_curve(opt_log2, grid, curvature=0.05, level=2.0):
    return {lr: level + curvature * (math.log2(lr) - opt_log2) ** 2 for lr in grid}


GRID = [2.0**k for k in range(-12, -3)]  # 2.4e-4 .. 6.3e-2


def test_optimum_log2_lr_is_the_parabola_vertex_and_none_at_an_edge():
    assert cl.optimum_log2_lr(_lr_curve(-7.3, GRID)) == pytest.approx(-7.3)
    assert cl.optimum_log2_lr(_lr_curve(-13.0, GRID)) is None  # below the grid
    assert cl.width_slope({32: -6.0, 64: -7.0, 128: -8.0, 256: -9.0}) == pytest.approx(-1.0)


def _widths(slope, jitter, seed):
    rng = np.random.default_rng(seed)
    return {
        w: _lr_curve(-7 + slope * math.log2(w / 32) + jitter * rng.normal(), GRID) for w in (32, 64, 128, 256)
    }


def test_width_transfer_holds_only_when_mup_moves_less_than_sp_beyond_noise():
    mup = {s: _widths(0.0, 0.1, s) for s in range(2)}
    sp = {s: _widths(-1.0, 0.1, 10 + s) for s in range(2)}
    status, why = cl.width_transfer(mup, sp)
    m = re.search(r"muP ([-+][\d.]+) .*SP ([-+][\d.]+) ", why)
    assert status == cl.HELD and abs(float(m[1])) < 0.1 and abs(float(m[2]) + 1) < 0.1
    # muP moving as much as SP: not held
    assert cl.width_transfer({s: _widths(-1.0, 0.1, s) for s in range(2)}, sp)[0] == cl.NOT_HELD
    # a control that does not move: this regime cannot test muP
    flat = {s: _widths(0.0, 0.1, 20 + s) for s in range(2)}
    assert cl.width_transfer(mup, flat) == (cl.NOT_TESTABLE, cl.width_transfer(mup, flat)[1])
    assert "SP control's optimum does not move" in cl.width_transfer(mup, flat)[1]
    # noisy optima: the same mean gap is not beyond noise
    noisy_m = {s: _widths((-0.1, -0.9)[s], 0.0, s) for s in range(2)}  # muP's seeds disagree
    noisy_s = {s: _widths((-1.0, -1.1)[s], 0.0, s) for s in range(2)}
    assert cl.width_transfer(noisy_m, noisy_s)[0] == cl.NOT_HELD
    # design limits: one seed, a 4x range, an optimum off the grid
    assert cl.width_transfer({0: mup[0]}, sp)[0] == cl.NOT_TESTABLE
    narrow = {s: {w: c for w, c in m.items() if w <= 128} for s, m in mup.items()}
    assert "over >= 8x" in cl.width_transfer(narrow, sp)[1]
    off = {s: {**m, 256: _lr_curve(-2.0, GRID)} for s, m in mup.items()}
    assert "grid edge for width(s) [256]" in cl.width_transfer(off, sp)[1]


def _fake_run(d, losses, train_extra=None, eval_extra=None):
    """A finished run's metrics as train.run writes them (eval records per phase)."""
    p = d / "00_stable" / "metrics.jsonl"
    p.parent.mkdir(parents=True)
    lines = [
        {"kind": "train", "step": i, "loss": x, "tokens_per_s": 1000.0, **(train_extra or {})}
        for i, x in enumerate(losses)
    ]
    lines += [{"kind": "eval", "step": i, "loss": x, **(eval_extra or {})} for i, x in enumerate(losses)]
    (d / "done.json").write_text("{}")  # what ablate writes when the run ends
    p.write_text("\n".join(json.dumps(r) for r in lines) + "\n")


@pytest.mark.slow
def test_claims_report_from_runs_each_arm_at_its_own_best_lr(tmp_path, capsys):
    """Arms train their first seed at every lr, then every seed at the best; the report compares those."""
    _fake_run(tmp_path / "dense@lr=0.001" / "seed_0", [3.0, 2.30])
    _fake_run(tmp_path / "dense@lr=0.003" / "seed_0", [3.0, 2.20])  # dense's best
    _fake_run(tmp_path / "denseformer@lr=0.001" / "seed_0", [3.0, 2.10])  # denseformer's best
    _fake_run(tmp_path / "denseformer@lr=0.003" / "seed_0", [3.0, 2.40])
    for s, (d, f) in enumerate([(2.20, 2.10), (2.25, 2.14), (2.18, 2.09)]):
        if s:
            _fake_run(tmp_path / "dense@lr=0.003" / f"seed_{s}", [3.0, d])
            _fake_run(tmp_path / "denseformer@lr=0.001" / f"seed_{s}", [3.0, f])
    out = tmp_path / "claims.md"
    ablate.main([f"--sweep_file={QUICK}", f"--workdir={tmp_path}", "--collect_only", f"--claims_out={out}"])
    text = out.read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "dense (0.003), denseformer (0.001)" in rows["DenseFormer"]
    assert (
        "| held: lower perplexity across the whole 95% interval. Power: an effect beyond x0."
        in rows["DenseFormer"]
    )
    assert "95% CI [" in rows["DenseFormer"] and "seed noise only" in rows["DenseFormer"]
    assert "x0.905" in rows["DenseFormer"]  # exp(mean(-0.10, -0.11, -0.09))
    assert "non-inferiority, margin x1.05" in rows["DenseFormer parity"]
    assert "| held" in rows["DenseFormer parity"]
    assert rows["lr transfer"].endswith(
        "held: best lr within one grid step across widths (dense: 0.003, denseformer: 0.001) |"
    )
    assert "not testable at this scale: not built" in rows["declared"]
    assert "Commit: " in text and "Machine: " in text and "Seeds per arm: 3" in text
    assert "0.001: 8.166*" in text and "0.003: 9.025*" in text  # the lr table stars each arm's best
    assert "drop rate" not in rows["DenseFormer"]  # no arm has an MoE
    capsys.readouterr()


def test_moe_drop_rates_stand_beside_every_number_of_an_arm_with_an_moe(tmp_path, capsys):
    """The MoE and MoA drop rates (train and eval) are each averaged per run; each kind's worst seed is
    reported in the claims row and in the results table; per-cluster evaluations stay out."""
    for lr in ("0.001", "0.003"):
        _fake_run(tmp_path / f"dense@lr={lr}" / "seed_0", [3.0, 2.2 if lr == "0.003" else 2.3])
        extra = {"train_extra": {"moe_drop_rate": 0.01, "moa_drop_rate": 0.03}, "eval_extra": {}}
        _fake_run(tmp_path / f"denseformer@lr={lr}" / "seed_0", [3.0, 2.1], **extra)
    for s in (1, 2):
        _fake_run(tmp_path / "dense@lr=0.003" / f"seed_{s}", [3.0, 2.2])
        worse = {"moe_drop_rate": 0.05 * s, "moa_drop_rate": 0.02 * s}
        ev = {"moe_drop_rate": 0.0, "cluster_1/moe_drop_rate": 0.9}
        _fake_run(tmp_path / "denseformer@lr=0.001" / f"seed_{s}", [3.0, 2.1], worse, ev)
    out = tmp_path / "claims.md"
    ablate.main([f"--sweep_file={QUICK}", f"--workdir={tmp_path}", "--collect_only", f"--claims_out={out}"])
    row = next(x for x in out.read_text().splitlines() if x.startswith("| DenseFormer |"))
    # MoE: seeds 1% / 5% / 10%; MoA: 3% / 2% / 4% (each kind's own worst seed); eval: MoE only
    rates = "train MoE 10.00% / MoA 4.00%; eval MoE 0.00%"
    assert f"MoE/MoA drop rate (worst seed): denseformer {rates}" in row
    table = (tmp_path / "results.md").read_text()
    assert f"| {rates} |" in table and table.count("| - |") >= 1  # dense: no MoE
    capsys.readouterr()


def test_a_diverged_lr_point_is_infinite_loss_but_a_diverged_final_seed_stops_the_sweep(
    tmp_path, monkeypatch, capsys
):

    from voltron_jax import cli, train
    from voltron_jax.errors import DIVERGED_EXIT, VoltronError

    assert cli.describe(train.NonFiniteLoss("nan"))[1] == DIVERGED_EXIT  # what a diverged run exits with
    monkeypatch.setattr(
        ablate, "_train", lambda cmd, stdout=None, env=None: DIVERGED_EXIT
    )  # the child's exit status
    arm = ablate.Variant("dense", {}, [0, 1, 2], lrs=[1e-3, 3e-3])
    point = ablate.at_lr(arm, 3e-3, [0])
    ablate.run_all("configs/tiny.py:test", [point], {}, tmp_path, emit=False, lr_sweep=True)
    done = json.loads((ablate.run_dir(tmp_path, point, 0) / "done.json").read_text())
    assert done["diverged"] and done["wall_s"] >= 0  # the process's wall time, for claims_doc
    _fake_run(ablate.run_dir(tmp_path, ablate.at_lr(arm, 1e-3, [0]), 0), [3.0, 2.5])
    assert ablate._lr_finals(arm, tmp_path) == {1e-3: 2.5, 3e-3: math.inf}
    assert ablate.final_runs([arm], tmp_path)[0][0].lr == 1e-3
    assert "0.003: diverged" in ablate.lr_table([arm], tmp_path)
    with pytest.raises(VoltronError, match="1 run.s. failed.*dense@lr=0.001 seed 1"):
        ablate.run_all("configs/tiny.py:test", [ablate.at_lr(arm, 1e-3, [1])], {}, tmp_path, emit=False)
    capsys.readouterr()


def test_parallel_jobs_run_every_run_once_log_each_and_raise_a_failure(tmp_path, monkeypatch, capsys):

    from voltron_jax.errors import VoltronError

    seen = []

    def fake_train(cmd, stdout=None, env=None):
        seen.append(cmd)
        stdout.write(f"trained {cmd[-1]}\n")
        return int(any("seed_2" in c for c in cmd))  # seed 2 fails

    monkeypatch.setattr(ablate, "_train", fake_train)
    arm = ablate.Variant("dense", {}, [0, 1])
    ablate.run_all("configs/tiny.py:test", [arm], {}, tmp_path, emit=False, jobs=2)
    assert len(seen) == 2
    for s in (0, 1):
        d = ablate.run_dir(tmp_path, arm, s)
        assert (d / "done.json").exists() and "trained" in (d / "ablate.log").read_text()
    ablate.run_all("configs/tiny.py:test", [arm], {}, tmp_path, emit=False, jobs=2)
    assert len(seen) == 2  # finished runs are skipped
    with pytest.raises(VoltronError, match="1 run.s. failed.*x seed 2 .message in .*ablate.log"):
        ablate.run_all("configs/tiny.py:test", [ablate.Variant("x", {}, [2, 3])], {}, tmp_path, False, jobs=2)
    assert (ablate.run_dir(tmp_path, ablate.Variant("x", {}), 3) / "done.json").exists()  # the sweep went on
    capsys.readouterr()


def test_lr_from_trains_a_data_only_control_at_the_other_arms_best_lr(tmp_path):
    from voltron_jax.errors import ConfigError

    sweep = tmp_path / "sweep.py"
    body = (
        "def get_sweep():\n"
        "    return {'base': 'configs/tiny.py:test', 'seeds': 3, 'variants': {\n"
        "        'dense': {'lrs': (1e-3, 3e-3)},\n"
        "        'shuffled': {'data.ordering': 'dedup_random', 'lr_from': %r}}}\n"
    )
    sweep.write_text(body % "dense")
    _, variants, _, _, _ = ablate.load_sweep_file(str(sweep), None)
    assert [v.name for v in ablate.lr_sweep_runs(variants)] == ["dense@lr=0.001", "dense@lr=0.003"]
    assert ablate.final_runs(variants, tmp_path)[1] == ["dense", "shuffled"]  # both wait for dense's sweep
    _fake_run(tmp_path / "dense@lr=0.001" / "seed_0", [3.0, 2.3])
    _fake_run(tmp_path / "dense@lr=0.003" / "seed_0", [3.0, 2.2])
    finals = {v.name: v for v in ablate.final_runs(variants, tmp_path)[0]}
    shuffled = finals["shuffled@lr=0.003"]
    assert shuffled.seeds == [0, 1, 2] and shuffled.overrides["data.ordering"] == "dedup_random"
    sweep.write_text(body % "nope")
    with pytest.raises(ConfigError, match="lr_from='nope' must name an arm .* with an lr sweep"):
        ablate.load_sweep_file(str(sweep), None)


def test_emit_lists_the_lr_sweep_then_says_what_follows(tmp_path, capsys):
    ablate.main([f"--sweep_file={QUICK}", f"--workdir={tmp_path}", "--emit"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("# then every seed of dense, denseformer")
    assert sum("--config.optim.lr=0.003" in x for x in lines) == 2
    assert all("--config.seed=0" in x for x in lines[:4])


def test_collect_only_before_the_lr_sweep_finished_is_one_clear_error(tmp_path):
    with pytest.raises(UsageError, match="lr sweep of dense, denseformer has not finished"):
        ablate.main([f"--sweep_file={QUICK}", f"--workdir={tmp_path}", "--collect_only"])


@pytest.mark.slow
@pytest.mark.heavy  # minutes: make test-heavy
def test_quick_claims_sweep_runs_end_to_end(tmp_path):
    out = tmp_path / "claims.md"
    ablate.main([f"--sweep_file={QUICK}", f"--workdir={tmp_path}", f"--claims_out={out}"])
    text = out.read_text()
    assert text.count("| ") > 6 and "Seeds per arm: 3" in text
    assert (
        sum((tmp_path / "dense@lr=0.001").exists() + (tmp_path / "dense@lr=0.003").exists() for _ in [0]) == 2
    )


def test_equal_flops_column_interpolates_only_inside_each_arms_measured_range():
    evals = [{"step": 16, "loss": 3.0}, {"step": 32, "loss": 2.6}, {"step": 48, "loss": 2.4}]
    assert ablate.loss_at_flops(evals, 10.0, 240.0) == pytest.approx(2.8)  # between steps 16 and 32
    assert ablate.loss_at_flops(evals, 10.0, 160.0) == pytest.approx(3.0)  # at the first evaluation
    assert math.isnan(ablate.loss_at_flops(evals, 10.0, 90.0))  # before the first eval: n/a, no clamp
    assert math.isnan(ablate.loss_at_flops(evals, 10.0, 500.0))  # past the end
    assert math.isnan(ablate.loss_at_flops([], 10.0, 100.0))


def _sweep_file(tmp_path, variants: str, claims: str, extra: str = "") -> str:
    sweep = tmp_path / "sweep.py"
    sweep.write_text(
        "def get_sweep():\n"
        f"    return {{'base': 'configs/tiny.py:test', 'seeds': 3, {extra}\n"
        f"            'variants': {{{variants}}}, 'claims': {{{claims}}}}}\n"
    )
    return str(sweep)


def _fake_final_eval(d, batches: dict[str, float]):
    loss = float(np.mean(list(batches.values())))
    (d / "final_eval.json").write_text(json.dumps({"loss": loss, "batches": batches}))


@pytest.mark.slow
def test_final_scores_on_the_fixed_set_pair_per_batch_with_ddof1_std(tmp_path, monkeypatch, capsys):
    """final_eval_batches: ablate scores each final run per batch (evaluate.py --per_batch), the report's
    final loss is that score, the interval combines seed and eval noise, and std is the sample std."""
    sweep = _sweep_file(
        tmp_path / "..",
        "'dense': {}, 'denseformer': {'model.residual': 'denseformer'}",
        "'DenseFormer': dict(baseline='dense', variant='denseformer', claim='lower')",
        "'final_eval_batches': 4,",
    )
    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for s in range(3):
        for arm in ("dense", "denseformer"):
            _fake_run(root / arm / f"seed_{s}", [3.0, 9.0])  # the loop's own (ignored) final loss: 9.0
    emitted = []

    def fake_eval(cmd, stdout=None, env=None):
        emitted.append(cmd)
        d = Path(cmd[3].split("=", 1)[1])
        shift = -0.05 if d.parent.name == "denseformer" else 0.0
        batches = {f"b{k}": 2.0 + 0.1 * k + shift + 0.01 * rng.normal() for k in range(4)}
        Path(cmd[-1].split("=", 1)[1]).write_text(
            json.dumps({"loss": np.mean(list(batches.values())), "batches": batches, "distinct_rows": 32})
            + "\n"
        )
        return 0

    monkeypatch.setattr(ablate, "_train", fake_eval)
    out = tmp_path / "claims.md"
    ablate.main([f"--sweep_file={sweep}", f"--workdir={root}", f"--claims_out={out}"])
    assert len(emitted) == 6 and all("--per_batch" in c and "--batches=4" in c for c in emitted)
    assert all(
        json.loads((root / a / f"seed_{s}" / "final_eval.json").read_text())["wall_s"] >= 0
        for a in ("dense", "denseformer")
        for s in range(3)
    )
    ablate.main([f"--sweep_file={sweep}", f"--workdir={root}", f"--claims_out={out}"])
    assert len(emitted) == 6  # scored runs are not scored again
    rows = ablate.collect("configs/tiny.py:test", ablate.load_sweep_file(sweep, None)[1], {}, root)
    dense = rows[0]
    finals = [
        json.loads((root / "dense" / f"seed_{s}" / "final_eval.json").read_text())["loss"] for s in range(3)
    ]
    assert dense["final_loss"] == pytest.approx(np.mean(finals)) and dense["final_eval_batches"] == 4
    assert dense["final_loss_std"] == pytest.approx(np.std(finals, ddof=1))
    text = out.read_text()
    assert (
        "seed + eval noise over 4 paired batches" in text
        and "Final-score evaluation batches per arm: 4" in text
    )
    assert "| 4 (32 distinct rows) | - |" in text  # the final-score batches column
    capsys.readouterr()


@pytest.mark.slow
def test_isoflop_and_width_transfer_rows_from_runs(tmp_path, capsys):
    """The isoFLOP row compares MoD with the best dense size at each budget; the width row applies the
    muP-vs-SP decision rule to each arm's per-seed lr curves (lr_seeds=2); the isoFLOP plot is written."""
    grid = tuple(2.0**k for k in range(-10, -3))
    arm = f"{{'lrs': {grid}, 'lr_seeds': 2, 'seeds': 2}}"
    widths = "".join(f"'mup_{w}': {arm}, 'sp_{w}': {arm}," for w in (16, 32, 64, 128))
    sweep = _sweep_file(
        tmp_path / "..",
        "'d1': {'model.n_layers': 1}, 'd2': {}, 'mod': {'model.routing': 'mod'}, " + widths,
        "'MoD': dict(rule='isoflop', margin=0.01, claim='parity', budgets={'B1': {'variant': 'mod', "
        "'dense': ['d1', 'd2']}}), "
        "'width': dict(rule='width_transfer', claim='transfer', "
        "mup={w: f'mup_{w}' for w in (16, 32, 64, 128)}, sp={w: f'sp_{w}' for w in (16, 32, 64, 128)})",
        "'equal_flops_of': 'mod',",
    )
    root = tmp_path / "runs"
    for s in range(3):
        _fake_run(root / "d1" / f"seed_{s}", [3.0, 2.50 + 0.01 * s])
        _fake_run(root / "d2" / f"seed_{s}", [3.0, 2.40 + 0.01 * s])  # the best dense size
        _fake_run(root / "mod" / f"seed_{s}", [3.0, 2.30 + 0.012 * s])
    for w in (16, 32, 64, 128):
        for s in range(2):
            for name, opt in (("mup", -7.0 + 0.05 * s), ("sp", -5.3 - math.log2(w / 16) + 0.05 * s)):
                for lr, x in _lr_curve(opt, grid).items():
                    _fake_run(root / f"{name}_{w}@lr={lr:g}" / f"seed_{s}", [3.0, x])
    out = tmp_path / "claims.md"
    ablate.main([f"--sweep_file={sweep}", f"--workdir={root}", "--collect_only", f"--claims_out={out}"])
    text = out.read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "B1: mod vs best dense d2 (of d1 2.5100, d2 2.4100)" in rows["MoD"]
    assert "isoFLOP non-inferiority, margin x1.01" in rows["MoD"] and rows["MoD"].endswith(
        "held: held at every budget |"
    )
    assert "| held: muP's optimum moves less than SP's beyond noise" in rows["width"]
    assert "SP: d=16 0.03125/0.03125" in rows["width"] and "muP: d=16 0.0078125/0.0078125" in rows["width"]
    assert "isoFLOP curves" in text and (tmp_path / "claims_isoflop.png").stat().st_size > 1000
    capsys.readouterr()


def test_the_claims_sweep_is_the_protocol_the_report_describes():
    """configs/sweeps/claims.py: isoFLOP dense sizes trained to each budget, a width range >= 8x with an SP
    control and 2 seeds at every lr, 5 seeds for the cheap rows, a reason for every margin, 128 fixed
    final-score batches, and the rows the data cannot show declared not testable."""
    from configs.sweeps import claims as sweep

    sw = sweep.get_sweep()
    v, claims = sw["variants"], sw["claims"]
    assert sw["seeds"] == 5 and sw["final_eval_batches"] >= 128 and sw["equal_flops_of"] == "mod"
    assert v["dense"]["data.val_fraction"] == 0.03  # 128 x 8 validation rows, all distinct (measured)
    for label, steps in sweep.ISO_BUDGETS.items():
        budget = steps * sweep.flops_per_token(sweep.MOD)
        for n in sweep.ISO_DEPTHS:
            arm = v[f"iso{label}_L{n}"]
            total = arm["recipe.stable.steps"] + arm["recipe.decay.steps"]
            used = total * sweep.flops_per_token({"model.n_layers": n})
            assert used == pytest.approx(budget, rel=0.03) and arm["recipe.decay.steps"] >= 1
    iso = claims["Mixture-of-Depths isoFLOP"]
    assert iso["rule"] == "isoflop" and len(iso["budgets"]) >= 2
    assert all(len(b["dense"]) >= 3 for b in iso["budgets"].values())
    width = claims["MiniCPM width scaling"]
    assert width["rule"] == "width_transfer" and max(width["sp"]) >= 8 * min(width["sp"])
    for arm in [*width["mup"].values(), *width["sp"].values()]:
        assert v[arm]["lr_seeds"] >= 2 and v[arm]["seeds"] >= 2
    assert "model.dim_model_base" in v["mup_32"] and "model.dim_model_base" not in v["sp_32"]
    for name, claim in claims.items():
        if claim.get("rule") in ("parity", "isoflop"):
            assert "techniques-" in claim["margin_why"], name  # the paper's parity statement, cited
    for name in ("Infini-attention vs full attention", "In-Context Pretraining"):
        assert claims[name]["testable"] is False and len(claims[name]["why"]) > 40
    assert v["cbtx_dense"]["base"].endswith("continue,flops_matched") and v["cbtm"]["base"].endswith("cbtm")
    assert v["cbtm_ensemble"]["evaluate"]["of"] == "cbtm"


def test_cbtx_controls_match_training_flops():
    """recipe_tiny.py: the dense continuation with flops_matched and the c-BTM control's branch decays
    cost c-BTX's training FLOPs (within a step's rounding); the ensemble row counts its own 8 branches."""
    base = "configs/recipe_tiny.py"
    cbtx = ablate.training_flops(base, {})
    dense = ablate.training_flops(base + ":continue,flops_matched", {})
    same_tokens = ablate.training_flops(base + ":continue", {})
    cbtm = ablate.training_flops(base + ":cbtm", {})
    assert same_tokens < 0.95 * cbtx  # the audit's ~10% gap without the match
    assert dense == pytest.approx(cbtx, rel=0.01) and cbtm == pytest.approx(cbtx, rel=0.03)
    params, fpt, _, _ = ablate.model_stats(base + ":cbtm", {})
    n, f = ablate.ensemble_stats(base + ":cbtm", {}, {"mode": "cbtm_ensemble", "top_k": 2}, params, fpt)
    assert (n, f) == (8 * params, 2 * fpt)
    assert ablate.ensemble_stats(base, {}, {"mode": "single"}, 5, 7.0) == (5, 7.0)


def test_gpu_preset_is_ten_seeds_of_the_cheap_rows_without_an_lr_sweep():
    from configs.sweeps import claims as sweep

    gpu, smoke = sweep.get_sweep("gpu"), sweep.get_sweep("gpu_smoke")
    assert (
        gpu["seeds"] == 10 and gpu["final_eval_batches"] == 128 and set(gpu["claims"]) == set(smoke["claims"])
    )
    assert not any("lrs" in a for a in gpu["variants"].values())
    assert smoke["base"] == "configs/tiny.py:test" and smoke["final_eval_batches"] < 8


@pytest.mark.slow
@pytest.mark.heavy  # 18 short processes: make test-heavy
def test_gpu_preset_smoke_runs_on_cpu_and_reports_both_rows(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "benchmarks/claims_gpu.py", "--smoke", f"--workdir={tmp_path}", "--jobs=2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["runs"] == 9 and result["backend"] == "cpu" and result["final_eval_batches"] == 4
    text = (tmp_path / "claims_gpu.md").read_text()
    assert "| MiniCPM WSD |" in text and "| MiniCPM two-stage data |" in text
    assert text.count("seed + eval noise over 4 paired batches") == 2


def _estimator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("claims_estimate", "benchmarks/claims_estimate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # builds every config of the full sweep (~280)
def test_claims_estimate_counts_every_process_and_prices_it_from_the_rates():
    ce = _estimator()
    small = ce.enumerate_runs("configs/sweeps/claims.py:two_stage")
    assert sum(r["kind"] == "train" for r in small) == 10 and sum(r["kind"] == "score" for r in small) == 10
    assert sum(r["steps"] for r in small) == 10 * 64
    runs = ce.enumerate_runs("configs/sweeps/claims.py")
    per = {}
    for r in runs:
        per.setdefault((r["arm"], r["kind"]), []).append(r)
    assert len(per["dense", "train"]) == 5 + 4 and len(per["dense", "score"]) == 5  # lr sweep + 4 more seeds
    assert len(per["sp_32", "train"]) == 8 * 2 and ("sp_32", "score") not in per  # 2 seeds at 8 lrs
    assert len(per["mup_32", "train"]) == 6 * 2  # SP's grid reaches two points lower (configs/sweeps)
    assert len(per["cbtm_ensemble", "score"]) == 3 and len(per["decay_same_mix", "train"]) == 5
    dense = per["dense", "train"][0]
    rates = {"overhead_s": 10.0, "train_flops_s": 1e10, "step_floor_s": 0.5, "eval_flops_s": 2e10}
    by_hand = 10.0 + 64 * max(0.5, dense["train_flops"] / 64 / 1e10) + dense["eval_flops"] / 2e10
    assert ce.seconds(dense, rates) == pytest.approx(by_hand)
    assert dense["train_flops"] == pytest.approx(3 * 7.47e6 * 2048 * 64, rel=0.01)
    # warm: an earlier process compiled the same programs (the shared cache): every lr point and the first
    # scoring of a model shape are cold, the 4 further seeds at the best lr warm; sp_32's 2nd seed per lr
    assert [r["warm"] for r in per["dense", "train"]] == [False] * 5 + [True] * 4
    assert [r["warm"] for r in per["dense", "score"]] == [False] + [True] * 4
    assert all(r["warm"] for r in per["cosine", "score"])  # the same model shape as dense's: same programs
    assert [r["warm"] for r in per["sp_32", "train"]] == [False, True] * 8
    assert ce.seconds(per["dense", "train"][5], {**rates, "overhead_warm_s": 4.0}) == pytest.approx(
        by_hand - 6.0
    )


def test_row_presets_run_only_their_rows_with_the_full_sweeps_arms():
    """`claims.py:cbtx` etc.: the rows' arms under the full sweep's names and settings (so their run
    folders resume the full sweep), plus the arms those score or take their lr from."""
    from configs.sweeps import claims as sweep

    full = sweep.get_sweep()
    cbtx = sweep.get_sweep("cbtx")
    assert set(cbtx["claims"]) == {"c-BTX vs dense", "c-BTX vs c-BTM ensemble"}
    assert set(cbtx["variants"]) == {"cbtx", "cbtx_dense", "cbtm", "cbtx_scored", "cbtx_dense_scored",
                                     "cbtm_ensemble"}  # fmt: skip
    assert all(cbtx["variants"][k] == full["variants"][k] for k in cbtx["variants"])
    assert "equal_flops_of" not in cbtx  # mod is not among its arms
    assert set(sweep.get_sweep("cbtx_vs_dense")["variants"]) == {"cbtx", "cbtx_dense", "cbtx_scored",
                                                                 "cbtx_dense_scored"}  # fmt: skip
    iso = sweep.get_sweep("mod_isoflop")
    assert set(iso["variants"]) == {"mod", "mod_128"} | {
        f"iso{b}_L{n}" for b in ("B1", "B2") for n in (1, 2, 4)
    }
    assert iso["equal_flops_of"] == "mod"
    with pytest.raises(ValueError, match="cbtx_vs_dense"):
        sweep.get_sweep("cbtxx")
    # every row has a group of its own, and the groups together are the whole sweep
    assert set().union(*(sweep.ROWS.values())) == set(full["claims"])
    assert set().union(*(sweep.get_sweep(k)["variants"] for k in sweep.ROWS)) == set(full["variants"])
    assert set(sweep.get_sweep("two_stage_data")["variants"]) == {"dense", "decay_same_mix"}
