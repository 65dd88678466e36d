"""Synthetic passkey retrieval data: the examples and the train-loop iterator (data mixture 'passkey').

The task of Mohtashami & Jaggi (arXiv 2305.16300) as used by Infini-attention (arXiv 2404.07143 §4.2,
docs/specs/techniques-a.md 2.3): a 5-digit key hidden at a chosen depth in repeated filler text, asked for
at the end. Byte-level through the project's byte vocabulary (seqio.ByteVocabulary: token = byte + 3).
The template is shorter than the paper's so that it fits rows of a few 64-token segments:

    <filler> The key is 12345. <filler> What is the key? The key is 12345

Depth d in [0, 1] puts the key sentence after round(d * F) of the F filler bytes ('start' 0, 'middle'
0.5, 'end' 1: right before the question, inside the last segment's local attention). An example is
`seq_len + 1` tokens ending with the key digits; inputs/targets are the usual shifted windows and only
the 5 answer targets carry loss weight. `data.pipeline.make_train_iterator(config, 'passkey', ...)`
returns a `PasskeyIterator`, so a recipe phase with mixture='passkey' fine-tunes on it in the one train
loop; scoring (accuracy by length x depth) is voltron_jax/experiments/passkey_eval.py.
"""

from __future__ import annotations

import numpy as np

OFFSET = 3  # seqio.ByteVocabulary: byte b -> id b + 3 (PAD 0, EOS 1, UNK 2)
DIGITS = 5
DEPTHS = {"start": 0.0, "middle": 0.5, "end": 1.0}
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY = "The key is {key}. "
QUESTION = "What is the key? The key is {key}"


def encode(text: str) -> np.ndarray:
    """Byte-vocabulary ids of `text` (int32)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + OFFSET


def min_length() -> int:
    """Fewest input tokens an example can have (no filler)."""
    return len(KEY.format(key="0" * DIGITS)) + len(QUESTION.format(key="0" * DIGITS)) - 1


def make_example(seq_len: int, depth: float, key: int) -> np.ndarray:
    """[seq_len + 1] token ids: filler with the key sentence at `depth`, the question and the key."""
    if seq_len < min_length():
        raise ValueError(
            f"passkey: seq_len={seq_len} is shorter than the template ({min_length()} tokens); "
            "use longer rows."
        )
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey: depth={depth} must be in [0, 1].")
    k = f"{int(key):0{DIGITS}d}"
    if len(k) != DIGITS:
        raise ValueError(f"passkey: key={key} must have at most {DIGITS} digits.")
    n_filler = seq_len + 1 - len(KEY.format(key=k)) - len(QUESTION.format(key=k))
    filler = (FILLER * (n_filler // len(FILLER) + 1))[:n_filler]
    cut = int(round(depth * n_filler))
    return encode(filler[:cut] + KEY.format(key=k) + filler[cut:] + QUESTION.format(key=k))


def make_batch(seq_len: int, depths, keys) -> dict[str, np.ndarray]:
    """The train-loop batch dict for examples (depth, key): loss weight only on the answer targets."""
    windows = np.stack([make_example(seq_len, d, k) for d, k in zip(depths, keys, strict=True)])
    b = windows.shape[0]
    weights = np.zeros((b, seq_len), np.float32)
    weights[:, -DIGITS:] = 1.0
    return dict(
        inputs=windows[:, :-1].copy(),
        targets=windows[:, 1:].copy(),
        positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (b, seq_len)).copy(),
        segment_ids=np.ones((b, seq_len), np.int32),
        weights=weights,
    )


class PasskeyIterator:
    """Endless passkey fine-tuning batches (data mixture name 'passkey'), this host's slice of each
    global batch. Row g of the stream draws its key and a uniform depth from rng(seed, g), so
    `get_state`/`set_state` resume exactly and every host agrees on the global batch."""

    def __init__(
        self, batch_size: int, seq_len: int, seed: int = 0, process_index: int = 0, process_count: int = 1
    ):
        if batch_size % process_count:
            raise ValueError(f"passkey: batch_size={batch_size} is not divisible by {process_count} hosts.")
        make_example(seq_len, 0.0, 0)  # fails early on rows too short for the template
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.local = batch_size // process_count
        self.lo = process_index * self.local
        self.step = 0

    @classmethod
    def from_config(cls, config, seed: int, process_index: int = 0, process_count: int = 1):
        """From data.batch_size / data.seq_len; needs the byte vocabulary (data.vocab='byte')."""
        if config.data.vocab != "byte":
            raise ValueError(f"passkey data is byte-level: set data.vocab='byte', not {config.data.vocab!r}.")
        return cls(config.data.batch_size, config.data.seq_len, seed, process_index, process_count)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = self.step * self.batch_size + self.lo + np.arange(self.local)
        draws = [np.random.default_rng([self.seed, int(g)]) for g in rows]
        keys = [int(r.integers(0, 10**DIGITS)) for r in draws]
        depths = [float(r.random()) for r in draws]
        self.step += 1
        return make_batch(self.seq_len, depths, keys)

    def get_state(self) -> dict:
        return dict(
            task="passkey", step=self.step, seed=self.seed, seq_len=self.seq_len, batch_size=self.batch_size
        )

    def set_state(self, state: dict) -> None:
        mine = dict(task="passkey", seed=self.seed, seq_len=self.seq_len, batch_size=self.batch_size)
        if {k: state.get(k) for k in mine} != mine:
            raise ValueError(
                f"passkey iterator state {state} does not match {mine}; resume with the same "
                "seed, data.seq_len and data.batch_size."
            )
        self.step = int(state["step"])
