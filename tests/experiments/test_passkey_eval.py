"""Passkey retrieval: example layout and byte encoding, answer-only loss weights, a resumable iterator
that agrees across hosts, the length x depth accuracy table, and a short fine-tune through the library."""

import re

import numpy as np
import pytest

from configs import passkey_tiny
from voltron_jax import config as cfglib
from voltron_jax.experiments import passkey_eval as pk


def _text(ids) -> str:
    return bytes((np.asarray(ids) - pk.OFFSET).astype(np.uint8)).decode()


def test_example_layout_depth_and_byte_vocabulary():
    import seqio

    for depth in (0.0, 0.5, 1.0):
        ex = pk.make_example(128, depth, 4321)
        text = _text(ex)
        assert len(ex) == 129 and text.endswith("What is the key? The key is 04321")
        np.testing.assert_array_equal(ex, seqio.ByteVocabulary().encode(text))
        where = text.index("The key is 04321.")
        filler = 129 - len("The key is 04321. ") - len("What is the key? The key is 04321")
        assert where == round(depth * filler)
    with pytest.raises(ValueError, match="shorter than the template"):
        pk.make_example(20, 0.5, 1)


def test_batch_has_loss_only_on_the_key_digits():
    b = pk.make_batch(64, [0.0, 1.0], [12345, 7])
    assert all(b[k].shape == (2, 64) for k in ("inputs", "targets", "positions", "segment_ids", "weights"))
    np.testing.assert_array_equal(b["weights"].sum(1), [5, 5])
    assert [_text(t[w > 0]) for t, w in zip(b["targets"], b["weights"], strict=True)] == ["12345", "00007"]
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


def test_iterator_resumes_exactly_and_hosts_share_one_global_batch():
    it = pk.PasskeyIterator(4, 64, seed=3)
    first, second = next(it), next(it)
    resumed = pk.PasskeyIterator(4, 64, seed=3)
    resumed.set_state(pk.PasskeyIterator(4, 64, seed=3).get_state() | {"step": 1})
    np.testing.assert_array_equal(next(resumed)["inputs"], second["inputs"])
    assert not np.array_equal(first["inputs"], second["inputs"])
    hosts = [pk.PasskeyIterator(4, 64, seed=3, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([next(h)["inputs"] for h in hosts]), first["inputs"])
    with pytest.raises(ValueError, match="does not match"):
        resumed.set_state(pk.PasskeyIterator(8, 64, seed=3).get_state())


def _oracle(inputs):
    """Reads the key out of the prompt: logits that predict it at the 5 answer positions."""
    logits = np.zeros(inputs.shape + (259,), np.float32)
    for i, row in enumerate(inputs):
        key = re.search(r"The key is (\d{5})\.", _text(row)).group(1)
        target = np.concatenate([row[1:], pk.encode(key[-1])])[-5:]  # the shifted window's last 5
        logits[i, np.arange(-5, 0), target] = 1.0
    return logits


def test_evaluate_and_table():
    res = pk.evaluate(_oracle, [64, 128], n_examples=6, batch_size=4)
    assert set(res) == {(n, d) for n in (64, 128) for d in pk.DEPTHS}
    assert all(v == {"key": 1.0, "digit": 1.0} for v in res.values())
    blind = pk.evaluate(lambda x: np.eye(259)[np.full(x.shape, pk.encode("0")[0])], [64], n_examples=6)
    assert all(v["key"] == 0.0 and v["digit"] < 0.5 for v in blind.values())
    table = pk.format_table(res, 32, "oracle")
    assert "| 64 / 2 | 100% (100%) | 100% (100%) | 100% (100%) |" in table and "| 128 / 4 |" in table


def test_configs_validate():
    for arg in ("", "test"):
        c = passkey_tiny.get_config(arg)
        cfglib.validate(c)
        assert c.data.seq_len % c.model.infini.segment_len == 0 and c.model.memory == "infini"


def test_mixture_passkey_is_the_train_loops_passkey_stream():
    """A recipe phase with mixture='passkey' trains on the data-side iterator (no private loop)."""
    from voltron_jax.data import passkey as data_pk
    from voltron_jax.data import pipeline

    c = passkey_tiny.get_config("test")
    it = pipeline.make_train_iterator(c, c.recipe.passkey.mixture, seed=3)
    assert isinstance(it, data_pk.PasskeyIterator) and pk.PasskeyIterator is data_pk.PasskeyIterator
    np.testing.assert_array_equal(next(it)["inputs"], next(data_pk.PasskeyIterator(4, 64, seed=3))["inputs"])


@pytest.mark.slow
def test_short_fine_tune_through_the_train_loop(tmp_path):
    c = passkey_tiny.get_config("test")
    c.train.log_every = 1
    c.data.batch_size = 8  # the train loop splits the batch over conftest's 8 CPU devices
    res, info = pk.train_and_evaluate(c, str(tmp_path / "run"), eval_segments=(2,), n_examples=4)
    assert np.isfinite(info["final_loss"]) and len(info["gate"]) == c.model.n_layers * c.model.n_heads
    assert set(res) == {(64, d) for d in pk.DEPTHS}
    assert (tmp_path / "run" / "00_passkey" / "ckpt" / "3").is_dir()  # the one loop's checkpoint
