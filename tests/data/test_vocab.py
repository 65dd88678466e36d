"""The byte vocabulary built without seqio gives seqio.ByteVocabulary's ids, decoding and cache keys, so a
run that never imports TensorFlow reads the token stores a seqio-vocabulary run wrote (and the other way
round), and seqio tasks built from it tokenise as before."""

import numpy as np
import seqio

from configs import tiny
from voltron_jax.data import shards, tasks
from voltron_jax.data import vocab as vocab_lib

TEXTS = [
    "",
    "hello",
    "héllo wörld",
    "def f(x):\n\treturn x  # 🙂",
    "\x00\x01\x02 nul bytes",
    "日本語のテキスト",
]


def test_byte_vocabulary_encodes_and_decodes_as_seqios():
    ours, theirs = vocab_lib.ByteVocabulary(), seqio.ByteVocabulary()
    assert (ours.vocab_size, ours.eos_id, ours.pad_id, ours.unk_id) == (
        theirs.vocab_size,
        theirs.eos_id,
        theirs.pad_id,
        theirs.unk_id,
    )
    for t in TEXTS:
        assert ours.encode(t) == list(theirs.encode(t))
    rng = np.random.default_rng(0)
    for _ in range(200):  # specials, EOS in the middle, ids past the vocabulary, broken UTF-8
        ids = rng.integers(0, 270, size=int(rng.integers(0, 40))).tolist()
        assert ours.decode(ids) == theirs.decode(ids), ids
    assert ours.decode(np.asarray(ours.encode("héllo") + [1, 104])) == "héllo"  # up to the first EOS


def test_byte_vocabulary_keys_stores_and_caches_as_seqios():
    ours, theirs = vocab_lib.ByteVocabulary(), seqio.ByteVocabulary()
    assert shards.vocab_id(ours) == shards.vocab_id(theirs) == "byte"
    assert vocab_lib.vocab_fingerprint(ours) == vocab_lib.vocab_fingerprint(theirs) == "byte"
    for a, b in zip(shards.encode_batch(ours, TEXTS), shards.encode_batch(theirs, TEXTS), strict=True):
        np.testing.assert_array_equal(a, b)
    assert isinstance(vocab_lib.seqio_vocab(ours), seqio.ByteVocabulary)


def test_a_seqio_task_made_with_the_byte_vocabulary_tokenises_as_before():
    name = tasks.register_document_task("synth_bytes", {"train": ["ab", "ç"]}, vocab_lib.ByteVocabulary())
    ds = seqio.get_mixture_or_task(name).get_dataset(
        sequence_length=None, split="train", shuffle=False, num_epochs=1, trim_output_features=False
    )
    got = [ex["targets"].tolist() for ex in ds.as_numpy_iterator()]
    assert got == [[100, 101, 1], [198, 170, 1]]  # bytes + 3, EOS appended


def test_only_sentencepiece_tokenizers_and_tfds_runs_need_tensorflow():
    cfg = tiny.get_config("test")
    assert not tasks.uses_tensorflow(cfg.data)
    for key, value in (("vocab", "sentencepiece"), ("vocab", "tokenizers"), ("corpus", "tfds:c4/en")):
        c = cfg.copy_and_resolve_references()
        setattr(c.data, key, value)
        assert tasks.uses_tensorflow(c.data), (key, value)
    c = cfg.copy_and_resolve_references()
    c.data.mixtures.decay = "stdlib:0.5,tfds:wiki:0.5"
    assert tasks.uses_tensorflow(c.data)
