"""The end-of-run report's per-cluster table."""

from voltron_jax import report


def test_cluster_table_marks_unmeasured_clusters_and_says_why():
    results = {"stable": {"perplexity": 2.0, "cluster_1/perplexity": 3.0}, "mix": {"perplexity": 1.5}}
    text = report.cluster_table(results, n_clusters=3)
    assert "| phase | overall | cluster_0 | cluster_1 | cluster_2 |" in text
    assert "| stable | 2.000 | - | 3.000 | - |" in text and "| mix | 1.500 | - | - | - |" in text
    assert text.rstrip().splitlines()[-1].startswith("-: not measured")
    full = report.cluster_table({"stable": {"perplexity": 2.0, "cluster_0/perplexity": 3.0}}, n_clusters=1)
    assert "not measured" not in full and "nan" not in full
