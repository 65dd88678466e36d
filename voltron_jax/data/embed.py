"""Document embedder shared by In-Context Pretraining and c-BTM: tf-idf -> truncated SVD -> L2 normalise.

c-BTM ("Scaling Expert Language Models with Unsupervised Domain Discovery", Gururangan et al. 2023,
arXiv 2303.14177) clusters documents with exactly this pipeline (released code
`metaseq/scripts/train_clusterer.py`: TfidfVectorizer with English stop words, TruncatedSVD(100),
Normalizer, fit on one data shard). ICP ("In-Context Pretraining: Language Modeling Beyond Document
Boundaries", Shi et al. 2023, arXiv 2310.10638) embeds with Contriever; we reuse the tf-idf embedder
instead, so one fit serves both the kNN graph and the clustering and nothing is downloaded
(techniques-b.md 1.4). Unit-norm rows make inner product = cosine similarity.

Two kinds (config.data.embed.kind):
  - 'tfidf': TfidfVectorizer(sublinear_tf, English stop words, min_df) with a vocabulary capped at
    `max_features` terms, fit on a sample of the corpus.
  - 'hashing': HashingVectorizer(`max_features` buckets) + TfidfTransformer, for streaming corpora: the
    term -> column map is stateless, so only the idf vector and the SVD basis are fit on the sample and
    no vocabulary is held in memory.

Deviations: c-BTM maps tokens that start with a digit to "#NUMBER"; our token pattern drops them (the
single "#NUMBER" term carries almost no idf weight). Tokens are words of >= 2 characters, so code and
prose are both handled. The sample is chosen by a stable hash of the document id (`sample_ids`), not
at random, so an Apache Beam run (voltron_jax/data/beam_pipeline.py) fits the identical embedder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import joblib
import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer, TfidfVectorizer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer
from tqdm.auto import tqdm

KINDS = ("tfidf", "hashing")
# Words of >= 2 characters that do not start with a digit (c-BTM folds numbers into one token).
TOKEN_PATTERN = r"(?u)\b[^\W\d]\w+\b"


def sample_rank(doc_id: str, seed: int) -> int:
    """A stable pseudo-random rank of a document: the fit sample is the docs of smallest rank."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_ids(doc_ids: Sequence[str], n: int, seed: int) -> list[str]:
    """The `n` ids of smallest `sample_rank`, sorted by id (order-free, so any runner gets the same)."""
    ranked = sorted(doc_ids, key=lambda i: sample_rank(i, seed))
    return sorted(ranked[:n])


class Embedder:
    """A fitted text -> unit vector map; picklable, so Beam workers and evaluation can load it."""

    def __init__(self, pipeline: Pipeline, kind: str):
        self.pipeline = pipeline
        self.kind = kind

    @property
    def dim(self) -> int:
        return int(self.pipeline.named_steps["svd"].n_components)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings [N, D] float32; each row depends only on its own text."""
        return np.asarray(self.pipeline.transform(list(texts)), dtype=np.float32)

    def save(self, path: str) -> None:
        joblib.dump({"kind": self.kind, "pipeline": self.pipeline}, path)

    @classmethod
    def load(cls, path: str) -> Embedder:
        blob = joblib.load(path)
        return cls(blob["pipeline"], blob["kind"])


def _term_steps(kind: str, min_df: int, max_features: int) -> list:
    """The sparse term-weighting steps: tf-idf over a capped vocabulary, or hashing + idf."""
    common = dict(stop_words="english", token_pattern=TOKEN_PATTERN)
    if kind == "tfidf":
        vec = TfidfVectorizer(
            sublinear_tf=True, min_df=min_df, max_features=max_features, dtype=np.float32, **common
        )
        return [("tfidf", vec)]
    vec = HashingVectorizer(n_features=max_features, alternate_sign=False, norm=None, **common)
    return [("hash", vec), ("tfidf", TfidfTransformer(sublinear_tf=True))]


def fit_embedder(
    texts: Sequence[str],
    *,
    kind: str = "tfidf",
    dim: int = 128,
    min_df: int = 2,
    max_features: int = 2**17,
    seed: int = 0,
) -> Embedder:
    """Fits tf-idf (or hashing + idf) and a `dim`-component truncated SVD on `texts` (the sample).

    The SVD keeps min(dim, n_terms - 1, len(texts) - 1) components, so tiny corpora still fit.
    """
    if kind not in KINDS:
        raise ValueError(f"data.embed.kind={kind!r} is not valid; choose one of {KINDS}.")
    if len(texts) < 3:
        raise ValueError(
            f"the embedder needs at least 3 sample documents, got {len(texts)}; "
            f"raise data.embed.fit_sample or use a larger corpus."
        )
    steps = _term_steps(kind, min_df, max_features)
    try:
        counts = Pipeline(steps).fit_transform(list(texts))  # [N, V] sparse
    except ValueError as e:  # empty vocabulary: min_df too high for the sample
        raise ValueError(
            f"tf-idf fit failed on {len(texts)} sample docs ({e}); lower data.embed.min_df "
            f"or raise data.embed.fit_sample."
        ) from e
    n_comp = max(1, min(dim, counts.shape[1] - 1, counts.shape[0] - 1))
    svd = TruncatedSVD(n_components=n_comp, algorithm="randomized", n_iter=5, random_state=seed)
    svd.fit(counts)
    pipe = Pipeline(steps + [("svd", svd), ("norm", Normalizer(copy=False))])
    return Embedder(pipe, kind)


def embed_in_batches(
    embedder: Embedder,
    texts: Sequence[str],
    batch_size: int = 4096,
    progress: bool = False,
    desc: str = "embed",
) -> np.ndarray:
    """`embedder.transform` over bounded-memory batches, with an optional tqdm bar. Returns [N, D]."""

    out = np.empty((len(texts), embedder.dim), np.float32)
    starts = range(0, len(texts), batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        out[s : s + batch_size] = embedder.transform(texts[s : s + batch_size])
    return out
