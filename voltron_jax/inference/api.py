"""Notebook entry: `voltron_jax.load(path_or_workdir, step=None)` -> a Model that generates and scores.

    import voltron_jax
    lm = voltron_jax.load("runs/demo")              # the last phase of the run that has a checkpoint
    print(lm.config.model)                          # the resolved config stored in the checkpoint
    lm.generate("def fib(n):", max_new_tokens=64, temperature=0.8, top_p=0.95)
    lm.score(["import os\n"])                       # per-token NLL in nats, one array per text

`path_or_workdir` is a run folder (NN_phase[/cluster_i]/ckpt/ inside), a phase folder (ckpt/ inside), a
ckpt/ folder or one step folder of it. Only the parameters are read (no optimizer state), straight onto
the given devices (default: the first local device, so a laptop CPU works): the mesh collapses to
data=-1 over those devices with every parameter replicated. The model is rebuilt from the config stored
in the checkpoint, so a checkpoint describes itself; passing `config=` instead checks that its parameter
tree matches the checkpoint's before anything is read. Loading writes nothing.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from voltron_jax.errors import VoltronError

PHASE_DIR = re.compile(r"^\d\d_")


class LoadError(VoltronError, ValueError):
    """A path or config that cannot be loaded; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------- locating


def _committed_steps(ckpt: epath.Path) -> list[int]:
    from voltron_jax.run.checkpoint import COMMIT_MARKER

    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / COMMIT_MARKER).exists())


def _phase_candidates(workdir: epath.Path) -> list[epath.Path]:
    """Phase (and fan-out member) folders of a run with a committed checkpoint, in recipe order."""
    out = []
    for d in sorted(p for p in workdir.iterdir() if p.is_dir() and PHASE_DIR.match(p.name)):
        members = sorted(
            (p for p in d.iterdir() if p.is_dir() and p.name.startswith("cluster_")),
            key=lambda p: int(p.name.split("_")[1]),
        )
        out += [m for m in (members or [d]) if _committed_steps(m / "ckpt")]
    return out


def find_checkpoint(path: str | epath.Path, step: int | None = None) -> tuple[epath.Path, int]:
    """(ckpt folder, step) for a run folder, phase folder, ckpt folder or step folder."""
    # Orbax reads no metadata through a relative path (load('runs/demo') found the step, then no tree)
    p = epath.Path(path if "://" in str(path) else os.path.abspath(path))
    if not p.exists():
        raise LoadError(
            f"{path} does not exist; pass a run folder (--workdir of voltron_jax.main), a phase "
            "folder or its ckpt/ folder."
        )
    if not p.is_dir():
        raise LoadError(f"{path} is a file, not a checkpoint; pass a run, phase or ckpt/ folder.")
    if p.name.isdigit() and _committed_steps(p.parent):  # one step folder
        ckpt, step = p.parent, int(p.name) if step is None else step
    elif _committed_steps(p / "ckpt"):
        ckpt = p / "ckpt"
    elif _committed_steps(p):
        ckpt = p
    else:
        found = _phase_candidates(p)
        if not found:
            raise LoadError(
                f"{path} is not a checkpoint: no committed step under it. Pass a run folder "
                "(with NN_phase/ckpt/ inside), a phase folder (with ckpt/) or a ckpt/ folder, "
                "after training has saved at least once."
            )
        ckpt = found[-1] / "ckpt"
    steps = _committed_steps(ckpt)
    if step is None:
        return ckpt, steps[-1]
    if step not in steps:
        raise LoadError(f"step {step} has no committed checkpoint in {ckpt}; available steps: {steps}.")
    return ckpt, step


# --------------------------------------------------------------------------------------------- config


def config_from_meta(stored: dict) -> ml_collections.ConfigDict:
    """The run's resolved config from checkpoint metadata (missing newer fields take their defaults)."""
    from voltron_jax import config

    return config.complete(stored)


def _checkpoint_params_meta(ckpt: epath.Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    md = ocp.PyTreeCheckpointer().metadata(ckpt / str(step) / "state").item_metadata
    tree = getattr(md, "tree", md)
    if "params" not in tree:
        raise LoadError(f"{ckpt / str(step)} holds no 'params'; it is not a voltron_jax train checkpoint.")
    return tree["params"]


def _shapes(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_architecture(abstract_params, stored_meta, where: str) -> None:
    """Raise LoadError naming the first differences if the model's tree differs from the checkpoint's."""
    want, have = _shapes(abstract_params), _shapes(stored_meta)
    diffs = [f"{k}: not in the checkpoint" for k in sorted(set(want) - set(have))]
    diffs += [f"{k}: in the checkpoint, not in the model" for k in sorted(set(have) - set(want))]
    diffs += [
        f"{k}: model {want[k]} vs checkpoint {have[k]}"
        for k in sorted(set(want) & set(have))
        if want[k] != have[k]
    ]
    if diffs:
        more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
        raise LoadError(
            f"the config describes a different architecture than the checkpoint {where}: "
            f"{'; '.join(diffs[:5])}{more}. Load without config= to use the config stored in "
            "the checkpoint."
        )


# --------------------------------------------------------------------------------------------- model


class ByteVocab:
    """seqio.ByteVocabulary's ids without importing seqio/TensorFlow: byte b -> b + 3; 0 PAD, 1 EOS, 2 UNK."""

    offset, vocab_size, eos_id = 3, 259, 1

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")


class Model:
    """A loaded checkpoint: `config`, `params`, `generate`, `score`, `encode`/`decode`."""

    def __init__(self, config: ml_collections.ConfigDict, params: Any, path: epath.Path, step: int):
        from voltron_jax.models import decoder

        self.config, self.params, self.path, self.step = config, params, path, step
        self.train_model = decoder.build_model(config.model)
        try:
            self.decode_model = decoder.build_model(config.model, decode=True)
            self.cache_note = "KV cache"
        except NotImplementedError as e:  # a slot that cannot stream: recompute the prefix instead
            self.decode_model, self.cache_note = None, f"no KV cache ({e})"
        self._vocab = None

    @property
    def vocab(self):
        """ByteVocab, or the run's seqio SentencePiece or tokenizers vocabulary (loaded on first use)."""
        if self._vocab is None:
            d = self.config.data
            if d.vocab == "byte":
                self._vocab = ByteVocab()
            elif d.vocab == "tokenizers":
                from voltron_jax.data import vocab as vocab_lib

                self._vocab = vocab_lib.make_vocab(d)
            else:
                self._vocab = _sentencepiece(d, self.path)
        return self._vocab

    def encode(self, text: str) -> list[int]:
        return list(self.vocab.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.vocab.decode([int(i) for i in ids])

    def generate(
        self,
        prompts: str | Sequence[str],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> str | list[str]:
        """Continue each prompt; one string in, one string out. temperature=0 is greedy."""
        from voltron_jax.inference import generate

        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        out = generate.generate_ids(
            self.decode_model,
            self.train_model,
            self.params,
            [self.encode(t) for t in texts],
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_id=self.vocab.eos_id,
            pad_multiple=self.config.data.seq_len,
            stop_ids=[i for i in [getattr(self.vocab, "hf_eos_id", None)] if i is not None],
        )
        res = [self.decode(ids) for ids in out]
        return res[0] if single else res

    def score(self, texts: str | Sequence[str]) -> np.ndarray | list[np.ndarray]:
        """Per-token negative log-likelihood (nats) of each text's tokens, the first conditioned on EOS."""
        from voltron_jax.inference import generate

        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        out = generate.score_ids(
            self.train_model,
            self.params,
            [self.encode(t) for t in items],
            eos_id=self.vocab.eos_id,
            pad_multiple=self.config.data.seq_len,
        )
        return out[0] if single else out

    def __repr__(self) -> str:
        m = self.config.model
        n = sum(math.prod(a.shape) for a in jax.tree.leaves(self.params))
        slots = ", ".join(
            f"{s}={m[s]}" for s in ("linear", "attention", "memory", "ffn", "residual", "routing")
        )
        return (
            f"Model({self.path} step {self.step}: {n / 1e6:.2f}M params, d_model={m.d_model}, "
            f"n_layers={m.n_layers}, {slots}; decoding with {self.cache_note})"
        )


def _sentencepiece(data_cfg, ckpt: epath.Path):
    """The run's SentencePiece model: data.spm_path, else the copy under <workdir>/data/, else rebuilt."""
    from voltron_jax.data import vocab as vocab_lib

    if not data_cfg.spm_path:
        for root in ckpt.parents:
            copies = sorted((root / "data").glob("spm_*.model")) if (root / "data").is_dir() else []
            if copies:
                import seqio

                return seqio.SentencePieceVocabulary(str(copies[-1]))
    return vocab_lib.make_vocab(data_cfg)


def read_curves(workdir: str) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{phase label: {tag: (steps, values)}} of a run, from each phase's TensorBoard events (tb/), or from
    its metrics.jsonl when TensorBoard is not installed or wrote nothing. Tags look like 'train/loss',
    'eval/loss'; labels like 'stable', 'branch/3'."""
    from voltron_jax.run import report

    out = {}
    for label, folder in report.phase_dirs(epath.Path(workdir)).items():
        curves = _tensorboard_curves(folder / "tb") if (folder / "tb").is_dir() else {}
        if not curves:
            for rec in report.read_metrics(folder):
                for key, value in rec.items():
                    if key not in ("step", "kind") and isinstance(value, int | float):
                        steps, values = curves.setdefault(f"{rec['kind']}/{key}", ([], []))
                        steps.append(rec["step"])
                        values.append(float(value))
        out[label] = curves
    return out


def _tensorboard_curves(tb: epath.Path) -> dict[str, tuple[list[int], list[float]]]:
    try:
        from tensorboard.backend.event_processing import event_accumulator as ea
        from tensorboard.util import tensor_util
    except ImportError:
        return {}
    acc = ea.EventAccumulator(str(tb), size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    curves = {
        tag: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)])
        for tag in acc.Tags()["scalars"]
    }
    for tag in acc.Tags()["tensors"]:  # tf.summary (TF2) writes scalars as tensors
        events = acc.Tensors(tag)
        curves[tag] = (
            [e.step for e in events],
            [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events],
        )
    return curves


def load(
    path_or_workdir: str,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    devices: Sequence[Any] | None = None,
) -> Model:
    """Load a checkpoint's parameters and config in one call (see the module docstring)."""
    import flax.linen as nn
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from voltron_jax.models import decoder
    from voltron_jax.run import checkpoint

    ckpt, step = find_checkpoint(path_or_workdir, step)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns about optional metadata files
    meta = checkpoint.Checkpointer(ckpt, async_save=False).restore_meta(step)
    if config is None:
        if "config" not in meta:
            raise LoadError(f"{ckpt / str(step)} has no config in its metadata; pass config=.")
        config = config_from_meta(meta["config"])
    model = decoder.build_model(config.model)
    dummy = jnp.zeros((1, config.data.seq_len), jnp.int32)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), dummy)["params"])
    check_architecture(abstract, _checkpoint_params_meta(ckpt, step), str(ckpt / str(step)))
    devices = [jax.local_devices()[0]] if devices is None else list(devices)
    sharding = NamedSharding(
        Mesh(np.array(devices).reshape(-1, 1, 1, 1), ("data", "fsdp", "tensor", "expert")), PartitionSpec()
    )
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), target
    )
    state = ocp.PyTreeCheckpointer().restore(
        ckpt / str(step) / "state",
        args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
        ),
    )
    return Model(config, state["params"], ckpt, step)
