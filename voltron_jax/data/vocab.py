"""Vocabularies: bytes by default, SentencePiece (trained locally or loaded from a path), or
a Hugging Face `tokenizers` tokenizer.json (data.vocab='tokenizers', data.tokenizer_path).

Byte vocabulary: 256 byte values shifted by 3 (PAD=0, EOS=1, UNK=2), vocab size 259: seqio.ByteVocabulary's
ids, built here so that a byte-vocabulary run never imports seqio or TensorFlow (~10-25 s of every process's
start on a small host); `seqio_vocab` gives seqio's own object where a seqio task needs one (TFDS streaming).
SentencePiece and tokenizers vocabularies are seqio Vocabulary objects; they import seqio when made.
SentencePiece: the same special ids (pad 0, eos 1, unk 2, no bos) so packing and loss code never ask
which vocabulary is in use. A locally trained model uses byte fallback, the identity normaliser and no
dummy prefix or whitespace folding, so source code round-trips exactly (indentation and newlines
included). It is trained on a deterministic sample of lines of the corpus's train split and cached under
`data.cache_dir` keyed by the sample and the trainer settings (a copy also goes to `<workdir>/data/`).
Tokenizers (an imported checkpoint's own tokenizer, voltron_jax/interop/hf_import.py): ids are the
checkpoint's, documents are encoded without special tokens, and the one boundary id that packing puts
after every document and that generation and scoring put before every prompt (the vocabulary's `eos_id`
in this codebase's contract) is the tokenizer's BOS token when it has one (Llama: every document starts
with <s>, which is what the pretrained model expects first), else its EOS token; the tokenizer's own EOS
stays available as `hf_eos_id`. PAD is id 0 as in every vocabulary here: padding is always masked
(`valid`, loss weights), never read as a token. A tokenizer with neither BOS nor EOS is refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil

import numpy as np

from voltron_jax.data import corpus

SPM_SAMPLE_CHARS = 2_000_000  # characters of corpus lines the trainer sees (enough for 4k-32k pieces)
_SPM_SETTINGS = dict(
    model_type="unigram",
    character_coverage=0.9995,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    max_sentence_length=1 << 16,
    num_threads=2,
    minloglevel=2,
)


# (corpus, spm_vocab_size) -> the SentencePiece model the data preparation trained on that corpus
# (prepare.register_tasks sets it), used when data.spm_path is empty and the corpus is not the embedded one.
_PREPARED_SPM: dict[tuple[str, int], str] = {}


def use_prepared_spm(data_cfg, path: str) -> None:
    """Make `path` (trained by the data preparation) the model of data.vocab='sentencepiece' runs on
    data.corpus with data.spm_vocab_size and no data.spm_path."""
    _PREPARED_SPM[(data_cfg.corpus, int(data_cfg.spm_vocab_size))] = str(path)


def cache_dir(data_cfg) -> str:
    """Where tokenised streams and trained vocabularies are cached (data.cache_dir or ~/.cache)."""
    return data_cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "voltron_jax")


def sample_lines(texts: list[str], max_chars: int = SPM_SAMPLE_CHARS) -> list[str]:
    """A deterministic sample of non-empty lines (by hash) totalling about `max_chars` characters."""
    lines = [ln for t in texts for ln in t.split("\n") if ln.strip()]
    total = sum(len(ln) for ln in lines)
    if total <= max_chars:
        return lines
    keep = max_chars / total
    return [ln for ln in lines if _keep_line(ln, keep)]


def _keep_line(ln: str, keep: float) -> bool:
    return int.from_bytes(hashlib.sha256(ln.encode("utf-8")).digest()[:4], "big") < keep * 2**32


def sample_lines_stream(texts, max_chars: int = SPM_SAMPLE_CHARS) -> list[str]:
    """`sample_lines` over a corpus too big to hold: `texts()` gives a fresh iterator of the documents;
    two passes (count, then keep each line by its hash), so the same corpus gives the same sample."""
    total = sum(len(ln) for t in texts() for ln in t.split("\n") if ln.strip())
    keep = 1.0 if total <= max_chars else max_chars / total
    return [
        ln for t in texts() for ln in t.split("\n") if ln.strip() and (keep >= 1.0 or _keep_line(ln, keep))
    ]


def train_sentencepiece(
    texts: list[str], vocab_size: int, path: str, max_chars: int = SPM_SAMPLE_CHARS
) -> str:
    """Train a SentencePiece model on a line sample of `texts` and write it to `path`. Returns `path`."""
    import sentencepiece as spm  # lazy: only SentencePiece runs train one

    lines = sample_lines(texts, max_chars)
    if not lines:
        raise corpus.DataError("cannot train a SentencePiece vocabulary on an empty corpus.")
    if vocab_size < 256 + 3 + 1:
        raise corpus.DataError(
            f"data.spm_vocab_size={vocab_size} is too small: byte fallback needs 259 ids; "
            "use at least 260 (typically 4096-32000)."
        )
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, **_SPM_SETTINGS
        )
    except RuntimeError as e:
        raise corpus.DataError(
            f"SentencePiece training failed ({e}); the sample has "
            f"{sum(map(len, lines))} characters: adjust data.spm_vocab_size to the sample."
        ) from e
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)  # atomic: concurrent trainers never see a half-written model
    return path


def _spm_training_texts(data_cfg) -> list[str]:
    if data_cfg.corpus != "stdlib":
        raise corpus.DataError(
            f"data.corpus={data_cfg.corpus!r} with data.vocab='sentencepiece' and no data.spm_path: the "
            "model is trained by the data preparation on a sample of this corpus (<workdir>/data/"
            "spm_<n>.model, used once the prepared tasks are registered, as train.run does); or pass an "
            "existing model with --config.data.spm_path=..."
        )
    return [d.text for d in corpus.stdlib_source("file", data_cfg.val_fraction).documents("train")]


class ByteVocabulary:
    """seqio.ByteVocabulary's ids and decoding without seqio: byte b -> b + 3; PAD 0, EOS 1, UNK 2.

    The class name is what token stores key a byte vocabulary by (shards.vocab_id: 'byte'), so stores and
    caches written with seqio's object are read with this one and the other way round."""

    offset = 3  # PAD, EOS, UNK
    vocab_size = 256 + offset
    pad_id, eos_id, unk_id, bos_id = 0, 1, 2, None
    extra_ids = 0

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        """Text up to the first EOS (as seqio's decode), special ids dropped, broken UTF-8 ignored."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size).decode(
            "utf-8", errors="ignore"
        )

    def __eq__(self, other) -> bool:
        return type(other).__name__ == "ByteVocabulary" and not getattr(other, "extra_ids", 0)

    def __hash__(self) -> int:
        return hash("ByteVocabulary")


def seqio_vocab(vocab):
    """The seqio Vocabulary of `vocab` (where a seqio Feature or preprocessor needs one): seqio's own
    ByteVocabulary for the byte vocabulary, the object itself for the others (they are seqio's)."""
    if isinstance(vocab, ByteVocabulary):
        import seqio  # lazy: seqio/TensorFlow, only for seqio tasks (TFDS streaming)

        return seqio.ByteVocabulary()
    return vocab


def __getattr__(name: str):
    if name == "TokenizersVocabulary":  # a seqio Vocabulary subclass: defined where seqio is imported
        from voltron_jax.data import hf_vocab  # lazy: seqio/TensorFlow and the [interop] extra

        return hf_vocab.TokenizersVocabulary
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_vocab(data_cfg, workdir: str | None = None):
    """The vocabulary named by `data_cfg.vocab` ('byte' | 'sentencepiece' | 'tokenizers')."""
    if data_cfg.vocab == "byte":
        return ByteVocabulary()
    if data_cfg.vocab == "tokenizers":
        from voltron_jax.data import hf_vocab  # lazy: seqio/TensorFlow and the [interop] extra

        if not data_cfg.tokenizer_path:
            raise corpus.DataError(
                "data.vocab='tokenizers' needs data.tokenizer_path (a tokenizer.json or a Hugging Face "
                "checkpoint folder holding one)."
            )
        return hf_vocab.TokenizersVocabulary(data_cfg.tokenizer_path)
    if data_cfg.vocab != "sentencepiece":
        raise corpus.DataError(f"data.vocab={data_cfg.vocab!r}; use 'byte', 'sentencepiece' or 'tokenizers'.")
    path = data_cfg.spm_path
    if path:
        from etils import epath  # local paths and gs:// alike

        if not epath.Path(path).exists():
            raise corpus.DataError(
                f"data.spm_path={path!r} does not exist; give an existing .model file or "
                "leave it empty to train one on the embedded corpus."
            )
    elif (data_cfg.corpus, int(data_cfg.spm_vocab_size)) in _PREPARED_SPM:
        path = _PREPARED_SPM[(data_cfg.corpus, int(data_cfg.spm_vocab_size))]
    else:
        texts = _spm_training_texts(data_cfg)
        h = hashlib.sha256(
            repr((sorted(_SPM_SETTINGS.items()), data_cfg.spm_vocab_size, SPM_SAMPLE_CHARS)).encode()
        )
        for t in texts:
            h.update(hashlib.sha256(t.encode("utf-8")).digest())
        path = os.path.join(cache_dir(data_cfg), f"spm_{data_cfg.spm_vocab_size}_{h.hexdigest()[:16]}.model")
        if not os.path.exists(path):
            train_sentencepiece(texts, data_cfg.spm_vocab_size, path)
        if workdir and "://" not in workdir:
            os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
            shutil.copyfile(path, os.path.join(workdir, "data", os.path.basename(path)))
    import seqio  # lazy: seqio/TensorFlow, only for SentencePiece runs

    return seqio.SentencePieceVocabulary(path)


def vocab_fingerprint(vocab) -> str:
    """A short stable id of the vocabulary (cache key of tokenised streams)."""
    if type(vocab).__name__ == "ByteVocabulary":  # this module's or seqio's: the same ids
        return "byte"
    sp = getattr(vocab, "sp_model", None)  # seqio.SentencePieceVocabulary
    if sp is not None:
        return "spm-" + hashlib.sha256(sp).hexdigest()[:16]
    fp = getattr(vocab, "fingerprint", None)  # TokenizersVocabulary
    if callable(fp):
        return fp()
    return f"{type(vocab).__name__}-{vocab.vocab_size}"


def check_vocab_size(model_vocab_size: int, vocab, data_cfg) -> None:
    """Raise if the model's embedding table cannot hold every id of `vocab`."""
    if model_vocab_size < vocab.vocab_size:
        raise corpus.DataError(
            f"model.vocab_size={model_vocab_size} is smaller than the {vocab.vocab_size} ids of "
            f"data.vocab={data_cfg.vocab!r}; set --config.model.vocab_size={vocab.vocab_size} "
            "(or larger, e.g. rounded up to a multiple of 128)."
        )
