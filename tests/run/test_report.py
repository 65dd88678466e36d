"""The end-of-run report's per-cluster table."""

from voltron_jax.run import report


def test_cluster_table_marks_unmeasured_clusters_and_says_why():
    results = {"stable": {"perplexity": 2.0, "cluster_1/perplexity": 3.0}, "mix": {"perplexity": 1.5}}
    text = report.cluster_table(results, n_clusters=3)
    assert "| phase | overall | cluster_0 | cluster_1 | cluster_2 |" in text
    assert "| stable | 2.000 | - | 3.000 | - |" in text and "| mix | 1.500 | - | - | - |" in text
    assert text.rstrip().splitlines()[-1].startswith("-: not measured")
    full = report.cluster_table({"stable": {"perplexity": 2.0, "cluster_0/perplexity": 3.0}}, n_clusters=1)
    assert "not measured" not in full and "nan" not in full


def test_report_puts_the_moe_drop_rate_beside_the_moe_phase_only(tmp_path):
    import json

    from etils import epath

    for phase, extra in (("00_stable", {}), ("01_moe_ft", {"moe_drop_rate": 0.02, "moa_drop_rate": 0.04})):
        d = tmp_path / phase
        d.mkdir()
        recs = [{"kind": "train", "step": s, "loss": 2.0, "tokens_per_s": 10.0, **extra} for s in (1, 2)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    results = {
        "stable": {"loss": 2.0, "perplexity": 7.389},
        # a per-cluster evaluation's rate is not the phase's: it stays out of the column
        "moe_ft": {
            "loss": 1.9,
            "perplexity": 6.686,
            "moe_drop_rate": 0.0,
            "moa_drop_rate": 0.01,
            "cluster_0/moe_drop_rate": 0.5,
        },
    }
    report.write(epath.Path(tmp_path), results)
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[2].endswith("| tokens/s | MoE/MoA drop rate |") and lines[3].count("---") == 7
    assert lines[4].endswith("| 10 | - |")  # the dense phase
    assert lines[5].endswith("| 10 | train MoE 2.00% / MoA 4.00%; eval MoE 0.00% / MoA 1.00% |")
    report.write(epath.Path(tmp_path), {"stable": results["stable"]})  # without an MoE: no column
    (tmp_path / "01_moe_ft" / "metrics.jsonl").unlink()
    report.write(epath.Path(tmp_path), {"stable": results["stable"]})
    assert "drop" not in (tmp_path / "report.md").read_text()


def test_losses_png_has_train_and_validation_of_every_phase_on_one_step_axis(tmp_path):
    import json

    from etils import epath

    def phase(folder, recs, parents=None):
        d = tmp_path / folder
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        if parents:
            (d / "parents.json").write_text(json.dumps({p: {"step": 4} for p in parents}))

    phase(
        "00_stable",
        [
            {"kind": "train", "step": 2, "loss": 5.0},
            {"kind": "eval", "step": 2, "loss": 4.9},
            {"kind": "train", "step": 4, "loss": 4.0},
            {"kind": "eval", "step": 4, "loss": 3.9},
        ],
    )
    phase(
        "01_decay",
        [
            {"kind": "train", "step": 6, "loss": 3.5},
            {"kind": "train", "step": 8, "loss": 3.0},
            {"kind": "eval", "step": 8, "loss": 3.1},
        ],
        parents=["stable"],
    )
    fig = report.plot_losses(epath.Path(tmp_path))
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in fig.axes[0].lines}
    assert lines == {
        "stable train": ([2, 4], [5.0, 4.0]),
        "stable validation": ([2, 4], [4.9, 3.9]),
        # the decay curve starts where stable ended: no gap at the phase boundary
        "decay train": ([4, 6, 8], [4.0, 3.5, 3.0]),
        "decay validation": ([8], [3.1]),
    }
    assert fig.axes[0].get_xlabel() == "global step"
    assert (tmp_path / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
