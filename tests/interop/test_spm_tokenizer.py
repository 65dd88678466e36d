"""A SentencePiece vocabulary exported as tokenizer.json: AutoTokenizer encodes the sample texts to the
project's ids with the boundary EOS prepended as BOS ([1] + ids: the special-id contract's mapping) and
decodes back to the text; models that would not convert exactly are refused.

On a whole unseen module the only differences are Viterbi ties: two segmentations with the same total
score (e.g. '-' + 15 dashes vs 15 dashes + '-'), which SentencePiece decides by its float32 accumulation
order and tokenizers by its own; both decode to the same text (docs/interop.md has the measured rate)."""

import inspect
import os
import tarfile

import pytest
import sentencepiece as spm

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hf_fixtures import train_spm  # noqa: E402

from voltron_jax import config as cfglib  # noqa: E402
from voltron_jax.data import vocab as vocab_lib  # noqa: E402
from voltron_jax.errors import ConfigError  # noqa: E402
from voltron_jax.interop import hf_export, spm_tokenizer  # noqa: E402

SAMPLES = [
    "",
    "x",
    "def f(x):\n    return x  # comment\n",
    "\tif a:\n\t\tb = 12345 + 0.5e-3\n\n\n",
    "   leading and trailing spaces   ",
    "two  spaces,   three, and a\ttab",
    "unicode the vocabulary never saw: é ü 中文 🙂 ∑ — byte fallback",
    "Numbers 2026-12-07 09:30 UTC; 3.14159",
]


@pytest.fixture(scope="module")
def spm_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    c = cfglib.get_default()
    c.data.vocab, c.data.spm_path = "sentencepiece", train_spm(str(folder / "spm.model"))
    out = str(folder / "hf")
    os.makedirs(out)
    special = hf_export.write_tokenizer(c.data, out)
    return c, out, special


@pytest.mark.slow  # ~3,000 lines encoded twice: about 15 s on the 2-core host
def test_exported_spm_tokenizer_encodes_as_the_project(spm_run):
    from transformers import AutoTokenizer

    c, out, special = spm_run
    assert special == dict(bos_token_id=1, eos_token_id=1, pad_token_id=0)
    ours = vocab_lib.make_vocab(c.data)
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 1, 2)
    for text in SAMPLES:
        want = [1, *ours.encode(text)]
        assert tok(text)["input_ids"] == want, text
        assert tok.decode(want, skip_special_tokens=True) == text
    sp = spm.SentencePieceProcessor(model_file=c.data.spm_path)
    score = lambda ids: sum(sp.get_score(i) for i in ids)  # noqa: E731  a segmentation's log-probability
    lines = inspect.getsource(tarfile).splitlines(keepends=True)  # a module the vocabulary never saw
    same = 0
    for line in lines:
        want, got = list(ours.encode(line)), tok(line)["input_ids"][1:]
        same += got == want
        if got != want:  # a tie: the same text, the same total score
            assert tok.decode(got) == line and score(got) == pytest.approx(score(want), abs=1e-4), line
    assert same >= 0.9 * len(lines)
    assert sum(len(ours.encode(ln)) for ln in lines) < 0.7 * sum(len(ln.encode()) for ln in lines)  # pieces


def test_spm_models_that_would_not_convert_exactly_are_refused(spm_run, tmp_path):
    c, _, _ = spm_run
    model = vocab_lib.make_vocab(c.data).sp_model
    for change, word in [
        (lambda p: setattr(p.normalizer_spec, "name", "nmt_nfkc"), "normalization rule 'nmt_nfkc'"),
        (lambda p: setattr(p.normalizer_spec, "remove_extra_whitespaces", True), "remove_extra_whitespaces"),
        (lambda p: setattr(p.trainer_spec, "model_type", p.trainer_spec.BPE), "model_type BPE"),
        (lambda p: setattr(p.trainer_spec, "bos_id", 3), "special ids"),
    ]:
        proto = spm_tokenizer._proto(model)
        change(proto)
        with pytest.raises(ConfigError, match=f"{word}.*--notokenizer"):
            spm_tokenizer.from_model(proto.SerializeToString())
    # through export: refused before anything is written
    proto = spm_tokenizer._proto(model)
    proto.normalizer_spec.name = "nmt_nfkc"
    bad = tmp_path / "nfkc.model"
    bad.write_bytes(proto.SerializeToString())
    c2 = cfglib.get_default()
    c2.data.vocab, c2.data.spm_path = "sentencepiece", str(bad)
    with pytest.raises(ConfigError, match="--notokenizer"):
        hf_export.tokenizer_writer(c2.data)
