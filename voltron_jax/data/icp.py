"""In-Context Pretraining document ordering: kNN graph, semantic dedup, greedy max-TSP traversal.

Paper: "In-Context Pretraining: Language Modeling Beyond Document Boundaries", Shi et al. 2023,
arXiv 2310.10638 (Algorithm 1), and its released code `sort/sort.py` (techniques-b.md 1.1-1.2).

Implemented, on unit-norm document embeddings (voltron_jax/data/embed.py; inner product = cosine):
  1. kNN with FAISS (`knn_search`): exact `IndexFlatIP` for small corpora, `IndexIVFFlat` or `IndexHNSWFlat`
     (inner-product metric) for large ones; self is excluded.
  2. Semantic dedup (`semantic_dedup`): for every neighbour pair with cosine > tau, the later document
     (input order) is dropped when the earlier one is kept. The paper gives no tau. Checked by eye on
     the stdlib corpus with the tf-idf/SVD-128 embedder: at 0.9 distinct files go (profile.py next to
     cProfile.py, 0.945) and 29% of paragraphs; at 0.99 the file-level drops are the generated codec
     tables (encodings/*) and the paragraph-level ones (10%) short boilerplate (`__lt__` vs `__ge__`
     bodies, `if __name__ == "__main__"` stanzas). Default 0.99 (config.data.icp.dedup_threshold).
  3. Undirected graph (`build_graph`): edge (i, j) if j in kNN(i) or i in kNN(j), weight = cosine.
  4. Greedy traversal (`traverse`, Algorithm 1): start at an unvisited document of minimum degree,
     always move to the unvisited neighbour of HIGHEST similarity (the paper's Algorithm 1 prints
     `arg min`, an erratum: its text says highest weight); a chain ends only when the current document
     has no unvisited neighbour, then the next chain starts at the unvisited document of minimum degree.
     Every kept document is visited exactly once.
  5. The released code's adjacent near-duplicate filter (`adjacent_filter`): a document is dropped when
     the character-3-gram Jaccard similarity of its first 100 characters with the previously emitted
     document exceeds 0.85.

Choices and deviations (why):
  - Chain caps: none. The released code starts at an arbitrary document, follows only `knn[1:10]`, caps
    chains at 21 documents and re-inserts short chains next to their nearest neighbour (`merge`). We
    follow the paper's Algorithm 1 instead: no cap and no merge. The work is already bounded by the
    kNN degree (each step scans one adjacency row), and a cap would only cut coherent chains, which the
    downstream concatenate-and-chunk packing turns into contexts anyway.
  - Degree is the static degree of the kept-document graph (dedup first, then the graph). Ties (equal
    degree, equal similarity) go to the lowest index instead of a random pick, so the order is a
    deterministic function of the inputs and the Apache Beam run reproduces it exactly.
  - The traversal runs per c-BTM cluster (voltron_jax/data/prepare.py); cross-cluster neighbours are
    lost, which makes ICP embarrassingly parallel (techniques-b.md 1.4: partition first, then traverse).
Concatenation, cutting into contexts and the context shuffle (never a document shuffle) are done by the
packing pipeline (voltron_jax/data/pipeline.py) on the ordered document list produced here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import faiss
import numpy as np

INDEXES = ("auto", "flat", "ivf", "hnsw")


def knn_search(
    x: np.ndarray, k: int, *, index: str = "auto", nprobe: int = 16, hnsw_m: int = 32, flat_max: int = 200_000
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product neighbours of every row of x [N, D] among the other rows.

    Returns (sims [N, K], ids [N, K]) sorted by decreasing similarity, K = min(k, N - 1); ids are -1 where
    an approximate index found fewer neighbours. index='auto' is exact up to `flat_max` rows, else HNSW.
    """
    if index not in INDEXES:
        raise ValueError(f"data.icp.index={index!r} is not valid; choose one of {INDEXES}.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    kk = min(k + 1, n)  # +1: the query itself comes back
    if index == "auto":
        index = "flat" if n <= flat_max else "hnsw"
    if index == "flat":
        idx = faiss.IndexFlatIP(d)
    elif index == "ivf":
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
        idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        idx.train(x)
        idx.nprobe = min(nprobe, nlist)
    else:
        idx = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efSearch = max(64, 2 * kk)
    idx.add(x)
    sims, ids = idx.search(x, kk)  # [N, kk]
    # Drop the query itself (or, when an equal vector displaced it, the last column).
    drop = ids == np.arange(n)[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    return sims[keep].reshape(n, kk - 1), ids[keep].reshape(n, kk - 1).astype(np.int64)


def semantic_dedup(sims: np.ndarray, ids: np.ndarray, threshold: float) -> np.ndarray:
    """Keep mask [N]: of every kNN pair with cosine > threshold, the later index goes when the earlier stays.

    Greedy in index order, over pairs found in either document's kNN list, so no two kept documents are
    such a pair.
    """
    rows, cols = np.nonzero((sims > threshold) & (ids >= 0))
    other = ids[rows, cols]
    a, b = np.minimum(rows, other), np.maximum(rows, other)
    keep = np.ones(len(sims), bool)
    for i in np.lexsort((a, b)):  # by the later document, so keep[a] is final when (a, b) is seen
        if keep[a[i]] and a[i] != b[i]:
            keep[b[i]] = False
    return keep


@dataclasses.dataclass(frozen=True)
class Graph:
    """Undirected kNN graph in CSR form; each row's neighbours sorted by decreasing weight, then index."""

    indptr: np.ndarray  # [N + 1]
    nbrs: np.ndarray  # [E]
    weights: np.ndarray  # [E]

    @property
    def degree(self) -> np.ndarray:
        return np.diff(self.indptr)


def build_graph(sims: np.ndarray, ids: np.ndarray, keep: np.ndarray | None = None) -> Graph:
    """Edge (i, j) if j in kNN(i) or i in kNN(j), both kept; weight = cosine (the larger if both listed)."""
    n, k = ids.shape
    keep = np.ones(n, bool) if keep is None else keep
    rows = np.repeat(np.arange(n), k)
    cols, w = ids.ravel(), sims.ravel().astype(np.float32)
    valid = (cols >= 0) & (cols != rows)
    valid[valid] &= keep[rows[valid]] & keep[cols[valid]]
    rows, cols, w = rows[valid], cols[valid], w[valid]
    src, dst, w = np.concatenate([rows, cols]), np.concatenate([cols, rows]), np.concatenate([w, w])
    # One edge per (src, dst): sort by (src, dst, -w) and keep the first (largest weight).
    o = np.lexsort((-w, dst, src))
    src, dst, w = src[o], dst[o], w[o]
    first = np.ones(len(src), bool)
    first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
    src, dst, w = src[first], dst[first], w[first]
    o = np.lexsort((dst, -w, src))  # per row: decreasing weight, ties by lower index
    indptr = np.zeros(n + 1, np.int64)
    np.add.at(indptr, src + 1, 1)
    return Graph(np.cumsum(indptr), dst[o], w[o])


def traverse(graph: Graph, keep: np.ndarray | None = None) -> list[np.ndarray]:
    """Algorithm 1: chains that visit every kept node once (min-degree start, argmax-similarity step)."""
    n = len(graph.indptr) - 1
    keep = np.ones(n, bool) if keep is None else keep
    visited = ~keep
    starts = np.lexsort((np.arange(n), graph.degree))  # by degree, ties by index
    starts = starts[keep[starts]]
    chains, ptr = [], 0
    while True:
        while ptr < len(starts) and visited[starts[ptr]]:
            ptr += 1
        if ptr == len(starts):
            return chains
        d = int(starts[ptr])
        chain = [d]
        visited[d] = True
        while True:
            row = graph.nbrs[graph.indptr[d] : graph.indptr[d + 1]]
            free = np.flatnonzero(~visited[row])
            if not free.size:
                break
            d = int(row[free[0]])  # rows are sorted by similarity: first unvisited = argmax
            chain.append(d)
            visited[d] = True
        chains.append(np.asarray(chain, np.int64))


def _grams(text: str, n: int, chars: int) -> set[str]:
    head = text[:chars]
    return {head[i : i + n] for i in range(max(1, len(head) - n + 1))}


def adjacent_filter(
    order: np.ndarray, texts: Sequence[str], *, threshold: float = 0.85, n: int = 3, chars: int = 100
) -> np.ndarray:
    """Drops a document whose first `chars` characters have n-gram Jaccard > threshold with the previous
    emitted document (released ICP code `sort/sort.py`). Returns the filtered order."""
    out, prev = [], None
    for i in order:
        g = _grams(texts[i], n, chars)
        if prev is not None and len(g | prev) and len(g & prev) / len(g | prev) > threshold:
            continue
        out.append(i)
        prev = g
    return np.asarray(out, np.int64)


def adjacent_cosine(x: np.ndarray, order: np.ndarray) -> tuple[float, int]:
    """(sum of cosines of consecutive documents along `order`, number of pairs)."""
    if len(order) < 2:
        return 0.0, 0
    a, b = x[order[:-1]], x[order[1:]]
    return float(np.einsum("nd,nd->", a.astype(np.float64), b)), len(order) - 1


@dataclasses.dataclass
class OrderResult:
    """One ICP ordering: indices into the input, plus what the stats report needs."""

    order: np.ndarray  # [M] indices of the kept documents, in ICP order
    chain_lengths: np.ndarray  # [C] chain lengths of the traversal (before the adjacent filter)
    n_semantic_dup: int
    n_adjacent_dup: int
    seconds: dict = dataclasses.field(default_factory=dict)  # wall time of knn, dedup, traverse, filter


def order_documents(
    x: np.ndarray,
    texts: Sequence[str],
    *,
    knn: int = 20,
    index: str = "auto",
    dedup_threshold: float = 0.99,
    jaccard_threshold: float = 0.85,
    jaccard_chars: int = 100,
    nprobe: int = 16,
    hnsw_m: int = 32,
    flat_max: int = 200_000,
) -> OrderResult:
    """kNN -> semantic dedup -> graph -> traversal -> adjacent filter, on embeddings x [N, D] of `texts`.

    The keyword arguments are the fields of config.data.icp (`order_documents(x, texts, **cfg.data.icp)`).
    """
    if len(texts) != len(x):
        raise ValueError(f"{len(texts)} texts but {len(x)} embeddings.")
    if len(x) < 2:
        return OrderResult(np.arange(len(x)), np.ones(len(x), np.int64), 0, 0)
    clock = [time.perf_counter()]
    seconds = {}

    def lap(name):
        clock.append(time.perf_counter())
        seconds[name] = clock[-1] - clock[-2]

    sims, ids = knn_search(x, knn, index=index, nprobe=nprobe, hnsw_m=hnsw_m, flat_max=flat_max)
    lap("knn")
    keep = semantic_dedup(sims, ids, dedup_threshold)
    lap("dedup")
    chains = traverse(build_graph(sims, ids, keep), keep)
    order = np.concatenate(chains)
    lap("traverse")
    final = adjacent_filter(order, texts, threshold=jaccard_threshold, chars=jaccard_chars)
    lap("filter")
    return OrderResult(
        final,
        np.asarray([len(c) for c in chains], np.int64),
        int((~keep).sum()),
        len(order) - len(final),
        seconds,
    )
