"""Synthetic passkey retrieval: data, a fine-tuning iterator, and the accuracy table by length x depth.

The task of Mohtashami & Jaggi (arXiv 2305.16300) as used by Infini-attention (arXiv 2404.07143 §4.2,
techniques-a.md 2.3): a 5-digit key hidden at a chosen depth in repeated filler text, asked for at the
end. Byte-level through the project's byte vocabulary (seqio.ByteVocabulary: token = byte + 3). The
template is shorter than the paper's so that it fits rows of a few 64-token segments:

    <filler> The key is 12345. <filler> What is the key? The key is 12345

Depth d in [0, 1] puts the key sentence after round(d * F) of the F filler bytes ('start' 0, 'middle'
0.5, 'end' 1: right before the question, inside the last segment's local attention). An example is
`seq_len + 1` tokens ending with the key digits; inputs/targets are the usual shifted windows and only
the 5 answer targets carry loss weight. Accuracy is teacher-forced: argmax at each answer position given
the true prefix (a digit is right if the argmax is the right byte; a key is right if all 5 are).

    python -m voltron_jax.eval.passkey --config=configs/passkey_tiny.py --out=runs/passkey

trains the configured model and its segment-local twin (model.infini.rule='none': same architecture,
memory read and write off) on the same passkey batches for the same steps, and prints both tables.
"""

from __future__ import annotations

import json
import os
import time

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


# --------------------------------------------------------------------------------------------- evaluation


def evaluate(
    logits_fn, lengths, depths=tuple(DEPTHS), n_examples: int = 32, batch_size: int = 16, seed: int = 1234
) -> dict[tuple[int, str], dict[str, float]]:
    """Teacher-forced accuracy per (length, depth). `logits_fn(inputs [B,L] int32) -> [B,L,V]`.

    Returns {(length, depth): {'key': exact-key accuracy, 'digit': per-digit accuracy}}; the same keys
    (drawn from `seed`) are used at every cell."""
    keys = np.random.default_rng(seed).integers(0, 10**DIGITS, n_examples)
    out = {}
    for length in lengths:
        for name in depths:
            right = []
            for i in range(0, n_examples, batch_size):
                ks = keys[i : i + batch_size]
                batch = make_batch(length, [DEPTHS[name]] * len(ks), ks)
                pred = np.asarray(logits_fn(batch["inputs"]))[:, -DIGITS:].argmax(-1)  # [B,5]
                right.append(pred == batch["targets"][:, -DIGITS:])
            right = np.concatenate(right)
            out[(length, name)] = dict(key=float(right.all(1).mean()), digit=float(right.mean()))
    return out


def format_table(results: dict, segment_len: int, title: str = "") -> str:
    """Markdown table: rows = lengths (tokens / segments), columns = depths; 'key% (digit%)'."""
    lengths = sorted({n for n, _ in results})
    depths = [d for d in DEPTHS if any((n, d) in results for n in lengths)]
    lines = ([f"**{title}**", ""] if title else []) + [
        "| length (tokens / segments) | " + " | ".join(depths) + " |",
        "| --- |" + " --- |" * len(depths),
    ]
    for n in lengths:
        cells = [f"{100 * results[n, d]['key']:.0f}% ({100 * results[n, d]['digit']:.0f}%)" for d in depths]
        lines.append(f"| {n} / {n // segment_len} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- experiment


def train_and_evaluate(
    config, eval_segments=(4, 8, 16), n_examples: int = 32, seed: int = 0, log_every: int = 50
) -> tuple[dict, dict]:
    """Fine-tune `config`'s model on passkey batches (the first recipe phase's steps, the project's
    optimizer and train step) and evaluate it. Returns (results, {'final_loss', 'seconds', 'beta'})."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from voltron_jax import optim, recipe, schedules, train
    from voltron_jax.config import validate
    from voltron_jax.models import decoder

    validate(config)
    phase = recipe.phase_order(config.recipe)[0]
    model = decoder.build_model(config.model)
    init = jax.jit(lambda k: nn.unbox(model.init(k, jnp.zeros((1, config.data.seq_len), jnp.int32))))
    params = init(jax.random.key(config.seed))["params"]
    tx = optim.make_optimizer(config, params, phase)
    step_fn = jax.jit(train.make_train_step(model, tx, config, schedules.lr_schedule(config, phase)))
    state = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    data = PasskeyIterator.from_config(config, seed)
    t0, losses = time.time(), []
    for i in range(recipe.phase_steps(config.recipe[phase], config.max_steps)):
        state, m = step_fn(state, next(data))
        losses.append(float(m["ce"]))
        if log_every and (i + 1) % log_every == 0:
            print(f"  step {i + 1}: answer loss {np.mean(losses[-log_every:]):.3f}", flush=True)
    seconds = time.time() - t0
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    lengths = [s * config.model.infini.segment_len for s in eval_segments]
    results = evaluate(lambda x: forward(state.params, x), lengths, n_examples=n_examples)
    betas = [np.asarray(x).ravel() for x in _find(state.params, "beta")]
    info = dict(
        final_loss=float(np.mean(losses[-log_every:] or [np.nan])),
        seconds=seconds,
        gate=[float(x) for x in 1 / (1 + np.exp(-np.concatenate(betas)))] if betas else [],
    )
    return results, info


def _find(tree, name: str) -> list:
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == name] + [x for v in tree.values() for x in _find(v, name)]
    return []


def main(argv) -> None:
    del argv
    from absl import flags

    from voltron_jax import cli, recipe

    f = flags.FLAGS
    config = cli.config_from_argv(_CONFIG.value, cli.overrides())
    os.makedirs(f.out, exist_ok=True)
    segs = [int(s) for s in f.eval_segments.split(",")]
    n = config.model.infini.segment_len
    steps = config.recipe[recipe.phase_order(config.recipe)[0]].steps
    report = [
        f"passkey: {config.model.n_layers} layers, d={config.model.d_model}, segment {n}, fine-tuned "
        f"{steps} steps on {config.data.seq_len}-token inputs, {f.eval_examples} keys per cell; "
        "cells: key accuracy (per-digit accuracy)",
        "",
    ]
    runs = [("infini", config.model.infini.rule)] + ([("local twin", "none")] if f.twin else [])
    saved = {}
    for label, rule in runs:
        c = config.copy_and_resolve_references()
        c.model.infini.rule = rule
        print(f"== {label} (model.infini.rule={rule})", flush=True)
        results, info = train_and_evaluate(c, segs, f.eval_examples)
        title = f"{label} (rule={rule}): final answer loss {info['final_loss']:.3f}, {info['seconds']:.0f} s"
        report += [format_table(results, n, title), ""]
        saved[label] = dict(rule=rule, info=info, results={f"{k[0]}/{k[1]}": v for k, v in results.items()})
        print(report[-2], flush=True)
    with open(os.path.join(f.out, "passkey.json"), "w") as fh:
        json.dump(saved, fh, indent=2)
    with open(os.path.join(f.out, "passkey.md"), "w") as fh:
        fh.write("\n".join(report) + "\n")
    print("\n".join(report))


_CONFIG = None
if __name__ == "__main__":
    from absl import flags

    from voltron_jax import cli

    _CONFIG = flags.DEFINE_string("config", None, "configs/passkey_tiny.py")
    flags.DEFINE_string("out", "runs/passkey", "Folder for passkey.json and passkey.md.")
    flags.DEFINE_string("eval_segments", "4,8,16", "Evaluation lengths in segments.")
    flags.DEFINE_integer("eval_examples", 32, "Keys per (length, depth) cell.")
    flags.DEFINE_bool("twin", True, "Also train and evaluate the segment-local twin (rule='none').")
    flags.mark_flags_as_required(["config"])
    cli.run(main, doc=__doc__, preload_modules=("tensorflow",))
