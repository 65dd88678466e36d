"""ICP ordering: kNN, dedup, the Algorithm 1 traversal and its quality on planted topics."""

import numpy as np
import pytest
from planted import planted_records, planted_texts

from voltron_jax.data import embed, icp


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _lists(edges: dict[tuple[int, int], float], n: int, k: int):
    """kNN-style lists (sims, ids) [n, k] with -1 padding from an undirected edge dict (listed one way)."""
    sims, ids = np.zeros((n, k), np.float32), -np.ones((n, k), np.int64)
    fill = [0] * n
    for (a, b), w in edges.items():
        sims[a, fill[a]], ids[a, fill[a]] = w, b
        fill[a] += 1
    return sims, ids


def test_traversal_follows_min_degree_start_and_argmax_step_exactly():
    # Degrees: 0:2 1:3 2:3 3:3 4:2 5:1 6:1 7:1. Start = 5 (min degree, lowest index among 5, 6, 7).
    # From 3 the unvisited neighbours are 1 (0.7) and 2 (0.6): argmax takes 1 (the paper's misprinted
    # argmin would take 2). The chain ends at 2 (no unvisited neighbour); the next starts at 6.
    edges = {
        (0, 1): 0.9,
        (1, 2): 0.8,
        (1, 3): 0.7,
        (2, 3): 0.6,
        (3, 4): 0.5,
        (5, 4): 0.3,
        (0, 2): 0.4,
        (6, 7): 0.2,
    }
    sims, ids = _lists(edges, 8, 3)
    graph = icp.build_graph(sims, ids)
    np.testing.assert_array_equal(graph.degree, [2, 3, 3, 3, 2, 1, 1, 1])
    chains = icp.traverse(graph)
    assert [c.tolist() for c in chains] == [[5, 4, 3, 1, 0, 2], [6, 7]]


def test_traversal_skips_dropped_documents():
    edges = {(0, 1): 0.9, (1, 2): 0.8, (1, 3): 0.7, (2, 3): 0.6, (3, 4): 0.5, (5, 4): 0.3, (0, 2): 0.4}
    sims, ids = _lists(edges, 6, 3)
    keep = np.array([True, False, True, True, True, True])  # 1 dropped: degrees 0:1 2:2 3:2 4:2 5:1
    chains = icp.traverse(icp.build_graph(sims, ids, keep), keep)
    assert [c.tolist() for c in chains] == [[0, 2, 3, 4, 5]]


def test_greedy_invariant_on_a_random_knn_graph():
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(300, 16)))
    sims, ids = icp.knn_search(x, 5, index="flat")
    graph = icp.build_graph(sims, ids)
    chains = icp.traverse(graph)
    order = np.concatenate(chains)
    assert sorted(order.tolist()) == list(range(300))
    visited = np.zeros(300, bool)
    deg = graph.degree
    nbrs = lambda d: graph.nbrs[graph.indptr[d] : graph.indptr[d + 1]]
    for chain in chains:
        assert deg[chain[0]] == deg[~visited].min()  # a chain starts at a min-degree unvisited doc
        for prev, nxt in zip(chain[:-1], chain[1:], strict=True):
            visited[prev] = True
            free = [u for u in nbrs(prev) if not visited[u]]
            assert nxt == max(free, key=lambda u: (float(x[prev] @ x[u]), -u))  # argmax similarity
        visited[chain[-1]] = True
        assert all(visited[u] for u in nbrs(chain[-1]))  # breaks only when no neighbour is left


def test_knn_flat_is_exact_and_approximate_indexes_recall():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(20, 32))
    x = _unit(centers[rng.integers(0, 20, 2000)] + 0.3 * rng.normal(size=(2000, 32)))
    sims, ids = icp.knn_search(x, 10, index="flat")
    assert sims.shape == ids.shape == (2000, 10)
    assert not (ids == np.arange(2000)[:, None]).any()  # self excluded
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # sorted by decreasing similarity
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    ref = np.sort(full, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(sims, ref, atol=1e-5)
    for index in ("ivf", "hnsw"):
        _, approx = icp.knn_search(x, 10, index=index, nprobe=8)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, ids, strict=True)])
        assert recall > 0.9, (index, recall)


def _embedded(texts, dim=32):
    e = embed.fit_embedder(texts, dim=dim, min_df=1)
    return e.transform(texts)


def test_output_is_a_permutation_of_the_kept_documents():
    recs, _ = planted_records(240, 8, 0)
    texts = [r["text"] for r in recs]
    x = _embedded(texts)
    res = icp.order_documents(x, texts, knn=10)
    order = res.order.tolist()
    assert len(order) == len(set(order))  # each document at most once
    sims, ids = icp.knn_search(x, 10)
    kept = np.flatnonzero(icp.semantic_dedup(sims, ids, 0.99))
    assert set(order) <= set(kept.tolist())
    assert len(order) + res.n_semantic_dup + res.n_adjacent_dup == len(texts)  # the rest: every kept doc
    assert res.chain_lengths.sum() == len(kept)


def test_icp_order_is_far_more_coherent_than_random_on_planted_topics():
    texts, topics = planted_texts(400, 10)
    x = _embedded(texts)
    res = icp.order_documents(x, texts, knn=10)
    s, n = icp.adjacent_cosine(x, res.order)
    perm = np.random.default_rng(0).permutation(res.order)
    s_rand, n_rand = icp.adjacent_cosine(x, perm)
    assert s / n > 0.6 and s / n > 4 * (s_rand / n_rand), (s / n, s_rand / n_rand)
    same_topic = np.mean(topics[res.order[:-1]] == topics[res.order[1:]])
    assert same_topic > 0.9  # random order: ~0.1


def test_planted_near_duplicates_never_both_survive():
    recs, pairs = planted_records(240, 8, 0)
    texts = [r["text"] for r in recs]
    res = icp.order_documents(_embedded(texts), texts, knn=10)
    out = {recs[i]["id"] for i in res.order}
    for a, b in [*pairs, ("doc0005", "doc0013")]:
        assert not (a in out and b in out), (a, b)
        assert a in out or b in out  # one of each pair stays
    assert res.n_semantic_dup == 4  # the planted pairs and nothing else


@pytest.mark.parametrize(
    "threshold,expect",
    [(0.85, ([0, 1, 2], [0, 1, 3], [0])), (0.99, ([0, 1, 2, 3], [0, 2, 1, 3], [0]))],
)
def test_adjacent_filter_uses_3gram_jaccard_of_the_first_100_chars(threshold, expect):
    head = ("def function_name(argument):\n    return argument * 2  # the same first hundred chars " * 2)[
        :100
    ]
    texts = [head + " tail one", "an unrelated document", head[:97] + "XYZ tail two", head + " tail three"]
    # 2 vs 0 (or 3): 3 of 98 grams differ, Jaccard ~0.94; 3 vs 0: identical heads, Jaccard 1.
    for order, want in zip(([0, 1, 2, 3], [0, 2, 1, 3], [0, 3]), expect, strict=True):
        assert icp.adjacent_filter(np.array(order), texts, threshold=threshold).tolist() == want
