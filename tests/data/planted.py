"""Synthetic corpora with planted topics and planted near-duplicates, shared by the data-prep tests."""

import numpy as np


def planted_texts(
    n: int, n_topics: int, seed: int = 0, topic_words: int = 150, own: int = 25, shared: int = 15
) -> tuple[list[str], np.ndarray]:
    """n documents; doc i draws `own` words from topic i % n_topics's vocabulary and `shared` common words.

    Returns (texts, topic of each text). Topic vocabularies are disjoint, so same-topic documents are
    far more similar than cross-topic ones, but no two documents are near-duplicates.
    """
    rng = np.random.default_rng(seed)
    vocab = [[f"topic{t}word{i}" for i in range(topic_words)] for t in range(n_topics)]
    common = [f"common{i}" for i in range(300)]
    topics = np.arange(n) % n_topics
    texts = [" ".join([*rng.choice(vocab[t], own), *rng.choice(common, shared)]) for t in topics]
    return texts, topics


def planted_records(
    n: int, n_topics: int, n_val: int, seed: int = 0
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Records {index, id, text, split} with one exact and three near-duplicate pairs planted in train.

    Returns (records, near-duplicate id pairs).
    """
    texts, _ = planted_texts(n + n_val, n_topics, seed)
    recs = [
        dict(index=i, id=f"doc{i:04d}", text=t, split="train" if i < n else "validation")
        for i, t in enumerate(texts)
    ]
    recs[5]["text"] = recs[13]["text"]  # exact duplicate
    pairs = []
    for a, b in ((21, 37), (40, 3), (60, 61)):
        recs[b]["text"] = recs[a]["text"] + " extra"
        pairs.append((recs[a]["id"], recs[b]["id"]))
    return recs, pairs
