"""The shared document embedder: unit vectors, topic similarity, row independence, save/load, the sample."""

import numpy as np
import pytest
from planted import planted_texts

from voltron_jax.data import embed


@pytest.mark.parametrize("kind", embed.KINDS)
def test_unit_vectors_and_topics_are_separated(kind):
    texts, topics = planted_texts(120, 4)
    e = embed.fit_embedder(texts, kind=kind, dim=16, min_df=1, max_features=2**12)
    x = e.transform(texts)
    assert x.shape == (120, 16) and x.dtype == np.float32 and e.dim == 16
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    cos = x @ x.T
    same = topics[:, None] == topics[None]
    off = ~np.eye(120, dtype=bool)
    assert cos[same & off].mean() > 0.4 and abs(cos[~same].mean()) < 0.1, (
        cos[same & off].mean(),
        cos[~same].mean(),
    )


def test_rows_do_not_depend_on_the_batch_and_survive_save_load(tmp_path):
    texts, _ = planted_texts(50, 3, seed=1)
    e = embed.fit_embedder(texts, dim=8, min_df=1)
    full = e.transform(texts)
    # Beam embeds in batches of any size: each row must be bit-identical to the in-process result.
    parts = np.concatenate([e.transform(texts[i : i + 7]) for i in range(0, 50, 7)])
    np.testing.assert_array_equal(parts, full)
    np.testing.assert_array_equal(embed.embed_in_batches(e, texts, batch_size=16), full)
    e.save(str(tmp_path / "e.joblib"))
    np.testing.assert_array_equal(embed.Embedder.load(str(tmp_path / "e.joblib")).transform(texts), full)


def test_digits_are_not_tokens_and_unknown_text_embeds_to_zero():
    texts, _ = planted_texts(30, 3)
    e = embed.fit_embedder(texts, dim=4, min_df=1)
    np.testing.assert_array_equal(e.transform(["1234 56 7x"]), np.zeros((1, 4), np.float32))


def test_sample_is_a_stable_hash_of_ids_independent_of_order():
    ids = [f"file{i}.py#{j}" for i in range(40) for j in range(5)]
    a = embed.sample_ids(ids, 30, seed=0)
    assert a == embed.sample_ids(ids[::-1], 30, seed=0) and len(a) == 30 and a == sorted(a)
    assert a != embed.sample_ids(ids, 30, seed=1)
    assert embed.sample_ids(ids, 1000, seed=0) == sorted(ids)


def test_clear_errors():
    with pytest.raises(ValueError, match="data.embed.kind"):
        embed.fit_embedder(["a b", "c d", "e f"], kind="bert")
    with pytest.raises(ValueError, match="at least 3"):
        embed.fit_embedder(["only one"])
    with pytest.raises(ValueError, match="min_df"):
        embed.fit_embedder(["aa bb", "cc dd", "ee ff"], min_df=5)
