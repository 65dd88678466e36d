"""A SentencePiece vocabulary (data.vocab='sentencepiece') as a Hugging Face fast tokenizer (tokenizer.json)
that encodes every text to the project's ids, so an exported model trained on it loads with AutoTokenizer.

    tok = spm_tokenizer.from_model(open("spm_4096.model", "rb").read())    # PreTrainedTokenizerFast
    hf_export.export(params, config, out)   # writes it for data.vocab='sentencepiece' runs

What converts exactly: a unigram model (what voltron_jax/data/vocab.py trains), with or without byte
fallback and dummy prefix, normalisation 'identity' and remove_extra_whitespaces off (the project's
settings). SentencePiece's unigram encoder runs one Viterbi lattice over the whole normalised text (its
split_by_whitespace / split_digits options only restrict which pieces training keeps), so the tokenizers
Unigram model over the same pieces and scores, with no pre-tokenizer, finds the same segmentation; an
unknown character costs min score - 10 in both and byte fallback spells it as <0xNN> pieces in both.
Normaliser: ' ' -> U+2581 (SentencePiece's whitespace escape), preceded by U+2581 with a dummy prefix.
Other SentencePiece models (BPE, NFKC normalisation, whitespace folding) are refused with a ConfigError:
convert those with transformers' own converters (transformers.convert_slow_tokenizer).

The special-id contract (data/vocab.py): PAD 0, EOS 1, UNK 2, no BOS; the EOS is the document boundary the
model saw before every document, so the tokenizer prepends it to every encoded text as BOS (`bos_token` =
`eos_token` = EOS), exactly as the byte vocabulary's export: HF ids = [1] + the project's ids. Control
pieces are special tokens (a text spelling '</s>' is split out as the token, as in every HF tokenizer,
where SentencePiece would spell it out in pieces).
"""

from __future__ import annotations

from voltron_jax.errors import ConfigError

SPACE = "\u2581"  # SentencePiece's escaped whitespace
CONTRACT = {"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1}  # data/vocab.py's special ids


def _proto(model: bytes):
    from sentencepiece import sentencepiece_model_pb2  # lazy: only an export of an SPM run needs it

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    return proto


def check_convertible(proto) -> None:
    """Raise ConfigError unless the SentencePiece model converts exactly (see the module docstring)."""
    t, n = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if t.model_type != t.UNIGRAM:
        problems.append(f"model_type {t.ModelType.Name(t.model_type)} (only UNIGRAM converts exactly)")
    if n.name not in ("identity", "") or n.precompiled_charsmap:
        problems.append(f"normalization rule {n.name!r} (only 'identity' converts exactly)")
    if n.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=true")
    if not n.escape_whitespaces:
        problems.append("escape_whitespaces=false")
    ids = {k: getattr(t, k) for k in CONTRACT}
    if ids != CONTRACT:
        problems.append(f"special ids {ids} (voltron_jax's are {CONTRACT})")
    if problems:
        raise ConfigError(
            "the SentencePiece vocabulary cannot be written as an exact tokenizer.json: "
            f"{'; '.join(problems)}; "
            "export with --notokenizer and convert the .model with transformers.convert_slow_tokenizer."
        )


def from_model(model: bytes):
    """The PreTrainedTokenizerFast of serialized SentencePiece model `model` (HF ids = [EOS] + SPM ids)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors  # lazy: optional [interop]
    from transformers import PreTrainedTokenizerFast  # lazy: optional [interop] package

    proto = _proto(model)
    check_convertible(proto)
    vocab = [(p.piece, p.score) for p in proto.pieces]
    pad, eos, unk = (vocab[i][0] for i in (0, 1, 2))
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=proto.trainer_spec.byte_fallback))
    norm = [normalizers.Replace(" ", SPACE)]
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        norm.insert(0, normalizers.Prepend(SPACE))
        dec.append(decoders.Strip(" ", 1, 0))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence(dec)
    control = [p.piece for p in proto.pieces if p.type == p.CONTROL]
    tok.add_special_tokens(sorted(set(control) | {pad, eos, unk}, key=tok.token_to_id))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A", pair=f"{eos} $A {eos} $B", special_tokens=[(eos, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=pad, unk_token=unk
    )
