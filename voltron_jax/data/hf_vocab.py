"""A Hugging Face tokenizer.json as a seqio vocabulary (data.vocab='tokenizers'; ids and special tokens:
voltron_jax/data/vocab.py's docstring). Its own module because it subclasses seqio.Vocabulary: importing
it imports seqio and TensorFlow, which a byte-vocabulary run never needs."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import seqio
import tensorflow as tf

from voltron_jax.data import corpus


class TokenizersVocabulary(seqio.Vocabulary):
    """A Hugging Face tokenizer.json as a seqio vocabulary (special ids: voltron_jax/data/vocab.py).

    `path` is a tokenizer.json file or a folder holding one; the BOS/EOS tokens are read from the
    tokenizer_config.json beside it, else from config.json's bos_token_id / eos_token_id."""

    def __init__(self, path: str):
        import tokenizers  # lazy: the optional extra [interop]; only this vocabulary needs it

        folder, file = (
            (path, os.path.join(path, "tokenizer.json"))
            if os.path.isdir(path)
            else (
                os.path.dirname(path),
                path,
            )
        )
        if not os.path.exists(file):
            raise corpus.DataError(
                f"data.tokenizer_path={path!r} holds no tokenizer.json; pass a Hugging Face checkpoint "
                "folder or its tokenizer.json."
            )
        with open(file, "rb") as f:
            self._json = f.read()
        self.path = file
        self.tokenizer = tokenizers.Tokenizer.from_str(self._json.decode("utf-8"))
        self.bos_token_id, self.hf_eos_id = _special_ids(folder, self.tokenizer)
        if self.bos_token_id is None and self.hf_eos_id is None:
            raise corpus.DataError(
                f"the tokenizer {file} names no BOS or EOS token (tokenizer_config.json bos_token / "
                "eos_token, or config.json bos_token_id / eos_token_id); documents need a boundary id."
            )
        unk = self.tokenizer.model.unk_token if hasattr(self.tokenizer.model, "unk_token") else None
        self._unk = self.tokenizer.token_to_id(unk) if unk else None
        super().__init__(extra_ids=0)

    @property
    def eos_id(self) -> int:
        """The document boundary id (BOS when the tokenizer has one, else EOS; module docstring)."""
        return self.bos_token_id if self.bos_token_id is not None else self.hf_eos_id

    @property
    def unk_id(self) -> int | None:
        return self._unk

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s):

        enc = lambda x: np.asarray(self._encode(np.asarray(x).item().decode("utf-8")), np.int32)
        out = tf.numpy_function(enc, [s], tf.int32, stateful=False)
        return tf.ensure_shape(out, [None])

    def _decode_tf(self, ids):

        return tf.numpy_function(lambda x: self._decode(x.tolist()).encode("utf-8"), [ids], tf.string)

    def __eq__(self, other) -> bool:
        return isinstance(other, TokenizersVocabulary) and self._json == other._json

    def __hash__(self) -> int:
        return hash(self._json)

    def fingerprint(self) -> str:
        return "tok-" + hashlib.sha256(self._json).hexdigest()[:16]


def _special_ids(folder: str, tok) -> tuple[int | None, int | None]:
    """(BOS id, EOS id) of the tokenizer in `folder` (None where it has none)."""

    def token_id(t):
        t = t.get("content") if isinstance(t, dict) else t
        return tok.token_to_id(t) if t else None

    tc, cfg = os.path.join(folder, "tokenizer_config.json"), os.path.join(folder, "config.json")
    if os.path.exists(tc):
        with open(tc) as f:
            d = json.load(f)
        return token_id(d.get("bos_token")), token_id(d.get("eos_token"))
    if os.path.exists(cfg):
        with open(cfg) as f:
            d = json.load(f)
        as_id = lambda v: v[0] if isinstance(v, list) else v  # eos_token_id may be a list
        return as_id(d.get("bos_token_id")), as_id(d.get("eos_token_id"))
    return None, None
