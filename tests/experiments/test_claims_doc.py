"""docs/claims.md from a partly run claims sweep (claims_doc): finished rows get ablate's new-protocol
section, the others their old-protocol record and what they still need (fabricated runs for speed)."""

import json

import pytest

from voltron_jax.errors import ConfigError
from voltron_jax.experiments import claims_doc

RATES = {"overhead_s": 100.0, "overhead_warm_s": 40.0, "train_flops_s": 1e10, "step_floor_s": 0.5,
         "eval_flops_s": 1e10}  # fmt: skip


def _run(d, loss):
    p = d / "00_stable" / "metrics.jsonl"
    p.parent.mkdir(parents=True)
    recs = [{"kind": "train", "step": 1, "loss": loss, "tokens_per_s": 1000.0}, {"kind": "eval", "step": 1,
            "loss": loss}]  # fmt: skip
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (d / "done.json").write_text("{}")


@pytest.fixture
def sweep(tmp_path):
    f = tmp_path / "sweep.py"
    f.write_text(
        "def get_sweep():\n"
        "    return {'base': 'configs/tiny.py:test', 'seeds': 3,\n"
        "            'variants': {'dense': {}, 'denseformer': {'model.residual': 'denseformer'},\n"
        "                         'mod': {'model.routing': 'mod'}},\n"
        "            'claims': {\n"
        "                'DenseFormer': dict(baseline='dense', variant='denseformer', claim='lower'),\n"
        "                'MoD': dict(baseline='dense', variant='mod', claim='lower')},\n"
        "            'old_protocol': {\n"
        "                'MoD': dict(result='x0.764', verdict='held', now='**withdrawn**: why')}}\n"
    )
    return str(f)


def test_finished_rows_get_the_new_section_the_others_their_old_record_and_cost(sweep, tmp_path):
    root = tmp_path / "runs"
    for s, (d, f) in enumerate([(2.20, 2.10), (2.25, 2.14), (2.18, 2.09)]):
        _run(root / "dense" / f"seed_{s}", d)
        _run(root / "denseformer" / f"seed_{s}", f)
    _run(root / "mod" / "seed_0", 2.3)  # 1 of mod's 3 seeds
    out = tmp_path / "claims.md"
    rates = f"--rates={json.dumps(RATES)}"
    claims_doc.main([f"--sweep_file={sweep}", f"--workdir={root}", f"--out={out}", rates, "--jobs=2"])
    text = out.read_text()
    assert "**1 of 2 rows ran under the issue-26 protocol** (DenseFormer)" in text
    new, old = text.split("## Rows not yet run under the issue-26 protocol")
    assert "| DenseFormer | lower |" in new and "95% CI" in new and "held" in new  # ablate's own rows
    assert "| MoD |" not in new
    row = next(line for line in old.splitlines() if line.startswith("| MoD |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["x0.764", "held", "**withdrawn**: why"]
    # mod still needs 2 trainings (both warm: seed 0 compiled its programs) and no scoring
    runs = claims_doc.enumerate_runs(sweep)
    mod = [r for r in runs if r["arm"] == "mod"]
    assert cells[4] == "2 (2)"
    assert float(cells[5]) == pytest.approx(
        sum(claims_doc.seconds(r, RATES) for r in mod[1:]) / 3600, abs=0.006
    )
    assert "**What the whole sweep still needs**: 2 processes (2 warm)" in text


def test_rates_must_name_every_rate(sweep, tmp_path):
    with pytest.raises(ConfigError, match="lacks.*step_floor_s"):
        claims_doc.main([f"--sweep_file={sweep}", f"--workdir={tmp_path}", "--rates={\"overhead_s\": 1, "
                         "\"train_flops_s\": 1, \"eval_flops_s\": 1}"])  # fmt: skip


def test_measured_hours_set_against_the_models_price_of_the_same_processes(sweep, tmp_path):
    root = tmp_path / "runs"
    for s in range(3):
        _run(root / "dense" / f"seed_{s}", 2.2)
    for s, wall in enumerate([300.0, 500.0]):  # two of the runs recorded their wall time; one is older
        (root / "dense" / f"seed_{s}" / "done.json").write_text(json.dumps({"wall_s": wall}))
    out = tmp_path / "claims.md"
    claims_doc.main([f"--sweep_file={sweep}", f"--workdir={root}", f"--out={out}",
                     f"--rates={json.dumps(RATES)}", "--jobs=2"])  # fmt: skip
    line = next(x for x in out.read_text().splitlines() if x.startswith("**Measured**"))
    runs = claims_doc.enumerate_runs(sweep)
    dense = [r for r in runs if r["arm"] == "dense" and r["kind"] == "train"]
    model = 2 * sum(claims_doc.seconds(r, RATES) for r in dense) / len(dense)
    ratio = 800.0 / model
    full = sum(claims_doc.seconds(r, RATES) for r in runs) / 3600 / 2
    assert "2 processes of this workdir (1 arms;" in line and "400 s per process" in line
    assert f"(measured / model = {ratio:.2f})" in line
    assert f"**{full * ratio:.1f} h** at the measured ratio" in line
