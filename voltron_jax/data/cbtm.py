"""c-BTM balanced k-means: balanced clusters while fitting, nearest centroid for the corpus.

Paper: "Scaling Expert Language Models with Unsupervised Domain Discovery", Gururangan et al. 2023,
arXiv 2303.14177; released code `metaseq/scripts/train_clusterer.py`, `cluster.py` and
`kernelmachine/balanced-kmeans` (techniques-b.md 3.1-3.2).

Implemented:
  - `balanced_assign`: assignment of N points to K clusters with fixed capacities floor(N/K) or
    floor(N/K)+1 (so sizes are exact, +-1) maximising -squared distance, solved with an auction algorithm
    for similar objects (Bertsekas): each unassigned point bids for its best cluster by the margin over
    its second-best option plus eps; a full cluster keeps its `capacity` highest bids and its price is
    the lowest bid it holds. eps = eps_frac * (max - min cost), as in c-BTM (`auction_lap`, range / 50).
  - `fit_balanced_kmeans`: k-means on unit-norm embeddings with squared Euclidean distance, balanced
    assignment at every iteration, centroids = cluster means, init from K random points.
  - `assign`: plain nearest centroid (c-BTM's `predict(balanced=False)`), so corpus clusters are only
    approximately balanced, as in the paper.
  - `ClusterModel`: the fitted embedder + centroids, saved under <workdir>/data/ and loaded for data
    assignment and cluster-routed evaluation; `routing_weights` is c-BTM's sparse-ensemble prior
    p(D=j | x) proportional to top-k exp(-d(x, c_j)^2 / T), renormalised.

Deviations (why): c-BTM fits online over 50,000-document batches, each batch's centroids being that
batch's means; we fit on one sample of `data.embed.fit_sample` documents (the same as their single-batch
case, and it avoids their n < 50,000 crash). The released scorer squares distances that are already
squared (softmax(-d^4 / T)); `routing_weights` uses the paper's d^2. Points in an emptied cluster cannot
occur: every cluster is filled to its capacity by construction.
"""

from __future__ import annotations

import os

import numpy as np

from voltron_jax.data.embed import Embedder

EMBEDDER_FILE = "embedder.joblib"
CENTROIDS_FILE = "centroids.npz"


def sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [N, K] between rows of x [N, D] and centroids c [K, D]."""
    x, c = x.astype(np.float64), c.astype(np.float64)
    d = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None]
    return np.maximum(d, 0.0)


def capacities(n: int, k: int) -> np.ndarray:
    """Cluster sizes of a balanced split: floor(n/k), the first n % k clusters one more."""
    return n // k + (np.arange(k) < n % k)


def _slot_prices(held: list[np.ndarray], cap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest and second-cheapest slot price of each cluster (an empty slot costs 0)."""
    k = len(cap)
    p1, p2 = np.zeros(k), np.zeros(k)
    for j in range(k):
        bids = np.sort(held[j])
        free = cap[j] - len(bids)
        p1[j] = 0.0 if free >= 1 else bids[0]
        rest = np.concatenate([np.zeros(max(free, 0)), bids, [np.inf]])  # slot prices, cheapest first
        p2[j] = rest[1]
    return p1, p2


def balanced_assign(cost: np.ndarray, eps_frac: float = 0.02, max_rounds: int = 100_000) -> np.ndarray:
    """Labels [N] minimising total cost [N, K] subject to sizes `capacities(N, K)` (auction algorithm)."""
    n, k = cost.shape
    if n < k:
        raise ValueError(f"balanced assignment needs at least as many points ({n}) as clusters ({k}).")
    benefit = -cost.astype(np.float64)
    eps = max(eps_frac * float(benefit.max() - benefit.min()), 1e-9)
    cap = capacities(n, k)
    labels = np.full(n, -1)
    bid_of = np.zeros(n)
    members = [np.zeros(0, np.int64) for _ in range(k)]
    for _ in range(max_rounds):
        free = np.flatnonzero(labels < 0)
        if not free.size:
            return labels
        p1, p2 = _slot_prices([bid_of[m] for m in members], cap)
        v = benefit[free] - p1[None]  # [U, K] value of each cluster's cheapest slot
        best = v.argmax(1)
        v_best = v[np.arange(len(free)), best]
        v[np.arange(len(free)), best] = benefit[free, best] - p2[best]  # its second slot competes too
        v_second = v.max(1)
        v_second = np.where(np.isfinite(v_second), v_second, v_best)  # no alternative: bid p1 + eps
        bid_of[free] = benefit[free, best] - v_second + eps  # = p1 + (v_best - v_second) + eps
        labels[free] = best
        for j in np.unique(best):
            cand = np.concatenate([members[j], free[best == j]])
            if len(cand) > cap[j]:  # keep the highest bids; ties keep the earlier holder / lower index
                order = np.lexsort((np.arange(len(cand)), -bid_of[cand]))
                labels[cand[order[cap[j] :]]] = -1
                cand = cand[order[: cap[j]]]
            members[j] = cand
    raise RuntimeError(
        f"balanced assignment did not converge in {max_rounds} rounds; raise "
        f"data.cbtm.eps_frac (now {eps_frac})."
    )


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest-centroid labels [N] (c-BTM assigns the corpus this way, unbalanced)."""
    return sq_dists(x, centroids).argmin(1)


def fit_balanced_kmeans(
    x: np.ndarray, k: int, *, iters: int = 20, eps_frac: float = 0.02, seed: int = 0, balanced: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """K-means on x [N, D]; returns (centroids [K, D] float32, fit-set labels [N]).

    balanced=True solves a balanced assignment every iteration (sizes floor(N/K) or +1).
    """
    n = len(x)
    if n < k:
        raise ValueError(f"c-BTM needs at least data.n_clusters={k} documents to fit, got {n}.")
    rng = np.random.default_rng(seed)
    c = x[rng.choice(n, size=k, replace=False)].astype(np.float64)
    labels = np.full(n, -1)
    for _ in range(iters):
        d = sq_dists(x, c)
        new = balanced_assign(d, eps_frac) if balanced else d.argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            pts = x[labels == j]
            c[j] = pts.mean(0) if len(pts) else x[rng.integers(n)]  # empty only when unbalanced
    return c.astype(np.float32), labels


def routing_weights(
    x: np.ndarray, centroids: np.ndarray, temperature: float = 0.1, top_k: int = 0
) -> np.ndarray:
    """c-BTM prior p(D=j | x) [N, K]: softmax(-d^2 / T), keeping the top_k largest (0 = all), renormalised."""
    logits = -sq_dists(x, centroids) / temperature
    if 0 < top_k < logits.shape[1]:
        kth = np.sort(logits, axis=1)[:, -top_k][:, None]
        logits = np.where(logits >= kth, logits, -np.inf)
    w = np.exp(logits - logits.max(1, keepdims=True))
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


class ClusterModel:
    """The fitted embedder and centroids: route texts to clusters (data assignment, routed eval)."""

    def __init__(self, embedder: Embedder, centroids: np.ndarray):
        self.embedder = embedder
        self.centroids = np.asarray(centroids, np.float32)

    @property
    def n_clusters(self) -> int:
        return len(self.centroids)

    def predict(self, texts) -> np.ndarray:
        """Nearest-centroid cluster of each text [N]."""
        return assign(self.embedder.transform(texts), self.centroids)

    def weights(self, texts, temperature: float = 0.1, top_k: int = 0) -> np.ndarray:
        """c-BTM routing prior [N, K] for each text (see `routing_weights`)."""
        return routing_weights(self.embedder.transform(texts), self.centroids, temperature, top_k)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.embedder.save(os.path.join(directory, EMBEDDER_FILE))
        np.savez(os.path.join(directory, CENTROIDS_FILE), centroids=self.centroids)

    @classmethod
    def load(cls, directory: str) -> ClusterModel:
        """Loads what `save` wrote (e.g. <workdir>/data after `prepare`)."""
        paths = [os.path.join(directory, f) for f in (EMBEDDER_FILE, CENTROIDS_FILE)]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(
                f"no fitted clusterer in {directory} (missing {missing}); run "
                f"`python -m voltron_jax.data.prepare --config=... --workdir=...` first."
            )
        with np.load(paths[1]) as f:
            centroids = f["centroids"]
        return cls(Embedder.load(paths[0]), centroids)
