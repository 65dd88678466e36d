"""c-BTM balanced k-means: optimal balanced assignment, balance while fitting, planted partitions, routing."""

import numpy as np
import pytest
from planted import planted_texts
from scipy.optimize import linear_sum_assignment

from voltron_jax.data import cbtm, embed


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _blobs(sizes, d=24, spread=0.15, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), d))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return _unit(centers[labels] + spread * rng.normal(size=(len(labels), d))), labels


def _ari(a, b) -> float:
    """Adjusted Rand index of two labelings."""
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(a, b)


@pytest.mark.parametrize("n,k,seed", [(60, 3, 0), (50, 4, 1), (33, 5, 2)])
def test_balanced_assignment_is_exactly_balanced_and_near_optimal(n, k, seed):
    cost = np.random.default_rng(seed).random((n, k))
    labels = cbtm.balanced_assign(cost, eps_frac=1e-3)
    np.testing.assert_array_equal(np.bincount(labels, minlength=k), cbtm.capacities(n, k))
    cap = cbtm.capacities(n, k)  # exact optimum: one column per slot
    slots = np.concatenate([np.repeat(cost[:, j : j + 1], cap[j], axis=1) for j in range(k)], axis=1)
    r, c = linear_sum_assignment(slots)
    got = cost[np.arange(n), labels].sum()
    assert got <= slots[r, c].sum() + n * 1e-3 * (cost.max() - cost.min()) + 1e-9  # eps-optimal


def test_balanced_fit_is_within_10_percent_of_n_over_k_on_skewed_data():
    x, _ = _blobs([900, 300, 120, 60, 20], seed=3)
    k = 8
    _, labels = cbtm.fit_balanced_kmeans(x, k, iters=10)
    sizes = np.bincount(labels, minlength=k)
    assert np.abs(sizes - len(x) / k).max() <= 0.1 * len(x) / k, sizes
    _, plain = cbtm.fit_balanced_kmeans(x, k, iters=10, balanced=False)
    plain_sizes = np.bincount(plain, minlength=k)
    assert plain_sizes.max() / max(plain_sizes.min(), 1) > 1.5  # plain k-means follows the skew


def test_nearest_centroid_recovers_planted_blobs():
    x, truth = _blobs([150] * 6, seed=4)
    centroids, fit_labels = cbtm.fit_balanced_kmeans(x, 6, iters=20, seed=1)
    assert _ari(fit_labels, truth) > 0.99
    x2, truth2 = _blobs([150] * 6, seed=4)  # same centers, the assignment of the corpus is argmin
    assert _ari(cbtm.assign(x2, centroids), truth2) > 0.99


def test_routing_weights_are_a_topk_renormalised_prior():
    x, _ = _blobs([30] * 4, seed=5)
    centroids, _ = cbtm.fit_balanced_kmeans(x, 4)
    w = cbtm.routing_weights(x, centroids, temperature=0.1)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(w.argmax(1), cbtm.assign(x, centroids))  # mode = nearest centroid
    w2 = cbtm.routing_weights(x, centroids, temperature=0.1, top_k=2)
    assert ((w2 > 0).sum(1) <= 2).all()
    np.testing.assert_allclose(w2.sum(1), 1.0, atol=1e-5)
    hard = cbtm.routing_weights(x, centroids, top_k=1)
    np.testing.assert_array_equal(hard, np.eye(4, dtype=np.float32)[cbtm.assign(x, centroids)])


def test_cluster_model_saves_and_loads_for_routed_evaluation(tmp_path):
    texts, topics = planted_texts(40, 2)
    emb = embed.fit_embedder(texts, dim=8, min_df=1)
    centroids, _ = cbtm.fit_balanced_kmeans(emb.transform(texts), 2)
    model = cbtm.ClusterModel(emb, centroids)
    model.save(str(tmp_path))
    loaded = cbtm.ClusterModel.load(str(tmp_path))
    np.testing.assert_array_equal(loaded.predict(texts), model.predict(texts))
    np.testing.assert_array_equal(loaded.weights(texts), model.weights(texts))
    assert _ari(loaded.predict(texts), topics) > 0.99  # the two planted topics land apart
    with pytest.raises(FileNotFoundError, match="voltron_jax.data.prepare"):
        cbtm.ClusterModel.load(str(tmp_path / "missing"))
