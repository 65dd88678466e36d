"""How often the exported tokenizer.json of a SentencePiece vocabulary encodes a line exactly as the project.

    PYTHONPATH=tests/interop JAX_PLATFORMS=cpu python benchmarks/spm_tokenizer_parity.py [module ...]

Trains the test vocabulary (tests/interop/hf_fixtures.py: the project's SentencePiece settings, 600
pieces, on four standard-library modules), converts it (voltron_jax/interop/spm_tokenizer.py) and encodes
every line of each given module (default: tarfile, unseen by the vocabulary) both ways. Prints lines
identical, lines that differ by an equal-score Viterbi tie (same text, same total piece score), and any
other difference (there should be none).
"""

import importlib
import inspect
import sys
import tempfile

import sentencepiece as spm
from hf_fixtures import train_spm

from voltron_jax.interop import spm_tokenizer


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = train_spm(f"{d}/spm.model")
        sp = spm.SentencePieceProcessor(model_file=path)
        tok = spm_tokenizer.from_model(open(path, "rb").read())
    score = lambda ids: sum(sp.get_score(i) for i in ids)  # noqa: E731
    for name in sys.argv[1:] or ["tarfile"]:
        lines = inspect.getsource(importlib.import_module(name)).splitlines(keepends=True)
        same = ties = other = 0
        for line in lines:
            want, got = sp.encode(line), tok(line)["input_ids"][1:]
            if got == want:
                same += 1
            elif tok.decode(got) == line and abs(score(got) - score(want)) <= 1e-4:
                ties += 1
            else:
                other += 1
        print(f"{name}: {len(lines)} lines, identical {same}, equal-score ties {ties}, other {other}")


if __name__ == "__main__":
    main()
