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
import warnings
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from voltron_jax import config
from voltron_jax import recipe as recipe_lib
from voltron_jax.data import vocab as vocab_lib
from voltron_jax.errors import VoltronError
from voltron_jax.inference import generate
from voltron_jax.models import decoder
from voltron_jax.run import checkpoint, report
from voltron_jax.run import workdir as workdir_lib
from voltron_jax.run.checkpoint import COMMIT_MARKER, CheckpointError, short_error


class LoadError(VoltronError, ValueError):
    """A path or config that cannot be loaded; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------- locating


def _committed_steps(ckpt: epath.Path) -> list[int]:

    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / COMMIT_MARKER).exists())


def _phase_candidates(workdir: epath.Path) -> list[epath.Path]:
    """Phase (and fan-out member) folders of a run with a committed checkpoint, in recipe order."""
    return [d for d in workdir_lib.run_dirs(workdir).values() if _committed_steps(workdir_lib.ckpt_dir(d))]


def find_checkpoint(path: str | epath.Path, step: int | None = None) -> tuple[epath.Path, int]:
    """(ckpt folder, step) for a run folder, phase folder, ckpt folder or step folder."""
    # Orbax reads no metadata through a relative path (load('runs/demo') found the step, then no tree)
    p = workdir_lib.path(path)
    if not p.exists():
        raise LoadError(
            f"{path} does not exist; pass a run folder (--workdir of voltron_jax.main), a phase "
            "folder or its ckpt/ folder."
        )
    if not p.is_dir():
        raise LoadError(f"{path} is a file, not a checkpoint; pass a run, phase or ckpt/ folder.")
    if p.name.isdigit() and _committed_steps(p.parent):  # one step folder
        ckpt, step = p.parent, int(p.name) if step is None else step
    elif _committed_steps(workdir_lib.ckpt_dir(p)):
        ckpt = workdir_lib.ckpt_dir(p)
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
        ckpt = workdir_lib.ckpt_dir(found[-1])
    steps = _committed_steps(ckpt)
    if step is None:
        return ckpt, steps[-1]
    if step not in steps:
        raise LoadError(f"step {step} has no committed checkpoint in {ckpt}; available steps: {steps}.")
    return ckpt, step


# --------------------------------------------------------------------------------------------- config


def config_from_meta(stored: dict) -> ml_collections.ConfigDict:
    """The run's resolved config from checkpoint metadata (missing newer fields take their defaults)."""

    return config.complete(stored)


def _checkpoint_params_meta(ckpt: epath.Path, step: int) -> dict:

    md = ocp.PyTreeCheckpointer().metadata(ckpt / str(step) / "state").item_metadata
    tree = getattr(md, "tree", md)
    if not isinstance(tree, dict):  # unreadable metadata: a damaged step (load falls back past it)
        raise CheckpointError(f"{ckpt / str(step)}: its state metadata is unreadable (damaged files?).")
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


class ByteVocab(vocab_lib.ByteVocabulary):
    """The byte vocabulary for generation: its decode drops every special id without stopping at EOS (a
    generated row starts with the EOS prompt), and shows broken UTF-8 as U+FFFD."""

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")


class UndertrainedWarning(UserWarning):
    """Generated text from a checkpoint whose validation loss is too high for readable text."""


# Above this fraction of the uniform loss ln(vocab) a model has learned little beyond token frequencies:
# 0.45 x ln(259) = 2.5 nats/byte for the byte vocabulary (the tiny demo ends near 2 nats/byte).
UNDERTRAINED_FRACTION = 0.45


def checkpoint_validation_loss(ckpt: epath.Path, step: int) -> float | None:
    """The last validation loss recorded at or before `step` in the metrics.jsonl of the phase folder
    holding checkpoint folder `ckpt` (None when the run's metrics are not beside it)."""

    try:
        recs = report.read_metrics(epath.Path(ckpt).parent)
    except (OSError, VoltronError):
        return None
    evals = [r for r in recs if r.get("kind") == "eval" and r.get("step", 0) <= step and "loss" in r]
    return float(evals[-1]["loss"]) if evals else None


def undertrained_hint(texts: Sequence[str], loss: float | None, vocab_size: int) -> str:
    """One line saying what blank output or a high validation loss means ('' when neither)."""
    blank = bool(texts) and all(not t.strip() for t in texts)
    uniform = math.log(vocab_size)
    high = loss is not None and loss > UNDERTRAINED_FRACTION * uniform
    if not (blank or high):
        return ""
    what = "the generated text is only whitespace; " if blank else ""
    if loss is None:
        return (
            what + "the model is probably undertrained (no validation loss was found beside its checkpoint): "
            "train it longer."
        )
    return (
        f"{what}this checkpoint's validation loss is {loss:.2f} nats/token (perplexity {math.exp(loss):.1f}; "
        f"uniform guessing over {vocab_size} tokens is {uniform:.2f}): at that loss a model has learned "
        "mostly which tokens are frequent (spaces, newlines), not words. Train longer (more steps, or the "
        f"full recipe without max_steps) to below ~{UNDERTRAINED_FRACTION * uniform:.1f} before expecting "
        "readable text."
    )


class Model:
    """A loaded checkpoint: `config`, `params`, `generate`, `score`, `encode`/`decode`."""

    def __init__(self, config: ml_collections.ConfigDict, params: Any, path: epath.Path, step: int):

        self.config, self.params, self.path, self.step = config, params, path, step
        self.train_model = decoder.build_model(config.model)
        try:
            self.decode_model = decoder.build_model(config.model, decode=True)
            self.cache_note = "KV cache"
        except NotImplementedError as e:  # a slot that cannot stream: recompute the prefix instead
            self.decode_model, self.cache_note = None, f"no KV cache ({e})"
        self._vocab = None

    @property
    def steps(self) -> dict[str, dict[str, int]]:
        """{phase: {"run": steps, "configured": steps}} of the recipe this checkpoint was trained in:
        `max_steps` caps every phase, so a quick run's stored config says 200 where 40 ran."""

        recipe, cap = self.config.recipe, self.config.max_steps
        return {
            n: {"run": recipe_lib.phase_steps(recipe[n], cap), "configured": recipe[n].steps}
            for n in recipe_lib.phase_order(recipe)
        }

    @property
    def vocab(self):
        """ByteVocab, or the run's seqio SentencePiece or tokenizers vocabulary (loaded on first use)."""
        if self._vocab is None:
            d = self.config.data
            if d.vocab == "byte":
                self._vocab = ByteVocab()
            elif d.vocab == "tokenizers":
                self._vocab = vocab_lib.make_vocab(d)
            else:
                self._vocab = _sentencepiece(d, self.path)
        return self._vocab

    max_length_factor = 64  # default cap of prompt + new tokens: this many times data.seq_len

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise LoadError(
                f"a prompt must be a str, got {type(text).__name__} {text!r:.60}; decode bytes first."
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise LoadError(
                f"prompt {text!r:.60} is not valid text ({e.reason} at {e.start}: a lone surrogate?); "
                "pass a str that encodes to UTF-8."
            ) from e
        return list(self.vocab.encode(text))

    def _texts(self, prompts, what: str) -> tuple[bool, list[str]]:
        """(single, [str]) of a str or a non-empty sequence of str; LoadError naming what is wrong."""
        if isinstance(prompts, str):
            return True, [prompts]
        if isinstance(prompts, bytes | bytearray) or not isinstance(prompts, Sequence) or not prompts:
            raise LoadError(
                f"{what} takes a str or a non-empty list of str; got {type(prompts).__name__} "
                f"{prompts!r:.60}."
            )
        for p in prompts:
            if not isinstance(p, str):
                raise LoadError(f"{what}: every item must be a str, got {type(p).__name__} {p!r:.60}.")
        return False, list(prompts)

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
        max_length: int | None = None,
    ) -> str | list[str]:
        """Continue each prompt; one string in, one string out. temperature=0 is greedy. Prompt plus new
        tokens may not exceed `max_length` (default `max_length_factor` x data.seq_len): the decode cache
        is allocated at that length up front."""

        single, texts = self._texts(prompts, "generate")
        ids = [self.encode(t) for t in texts]
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        cap = self.max_length_factor * self.config.data.seq_len if max_length is None else int(max_length)
        longest = max(len(x) for x in ids) + 1 + max_new_tokens  # + the EOS every prompt starts with
        if longest > cap:
            raise LoadError(
                f"max_new_tokens={max_new_tokens} with a {longest - 1 - max_new_tokens}-token prompt needs "
                f"{longest} positions, more than max_length={cap} ({self.max_length_factor} x "
                "data.seq_len by default; the cache is allocated at full length): ask for fewer tokens "
                "or pass max_length=."
            )
        out = generate.generate_ids(
            self.decode_model,
            self.train_model,
            self.params,
            ids,
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
        hint = undertrained_hint(
            res, checkpoint_validation_loss(self.path, self.step), self.config.model.vocab_size
        )
        if hint:  # blank text from a model at a loss that explains it: say so, once per call site
            warnings.warn(hint, UndertrainedWarning, stacklevel=2)
        return res[0] if single else res

    def score(self, texts: str | Sequence[str]) -> np.ndarray | list[np.ndarray]:
        """Per-token negative log-likelihood (nats) of each text's tokens, the first conditioned on EOS."""

        single, items = self._texts(texts, "score")
        ids = [self.encode(t) for t in items]
        out = generate.score_ids(
            self.train_model,
            self.params,
            ids,
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


def check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    """LoadError naming the argument when a sampling setting is out of range (never silently ignored)."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int | np.integer)
        or max_new_tokens < 0
    ):
        raise LoadError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0.")
    if (
        not isinstance(temperature, int | float | np.floating)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise LoadError(f"temperature={temperature!r} must be a finite number >= 0 (0: greedy).")
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 0:
        raise LoadError(f"top_k={top_k!r} must be an int >= 0 (0: no top-k cut).")
    if not isinstance(top_p, int | float | np.floating) or not 0.0 < top_p <= 1.0:
        raise LoadError(f"top_p={top_p!r} must lie in (0, 1] (1: no nucleus cut).")


def _sentencepiece(data_cfg, ckpt: epath.Path):
    """The run's SentencePiece model: data.spm_path, else the copy under <workdir>/data/, else rebuilt."""
    if not data_cfg.spm_path:
        for root in ckpt.parents:
            data = workdir_lib.data_dir(root)
            copies = sorted(data.glob("spm_*.model")) if data.is_dir() else []
            if copies:
                import seqio  # lazy: seqio/TensorFlow (the one seam)

                return seqio.SentencePieceVocabulary(str(copies[-1]))
    return vocab_lib.make_vocab(data_cfg)


def read_curves(workdir: str) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{phase label: {tag: (steps, values)}} of a run, from each phase's TensorBoard events (tb/), or from
    its metrics.jsonl when TensorBoard is not installed or wrote nothing. Tags look like 'train/loss',
    'eval/loss'; labels like 'stable', 'branch/3'."""

    out = {}
    for label, folder in workdir_lib.run_dirs(workdir_lib.path(workdir)).items():
        tb = workdir_lib.tb_dir(folder)
        curves = _tensorboard_curves(tb) if tb.is_dir() else {}
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
        from tensorboard.backend.event_processing import event_accumulator as ea  # lazy: TensorFlow
        from tensorboard.util import tensor_util  # lazy: TensorFlow
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
    """Load a checkpoint's parameters and config in one call (see the module docstring). Without `step`
    (and not pointed at one step folder), a damaged newest step is skipped for the newest that reads."""
    ckpt, chosen = find_checkpoint(path_or_workdir, step)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns about optional metadata files
    if step is not None or chosen != _committed_steps(ckpt)[-1]:
        return _load_step(ckpt, chosen, config, devices)
    # the newest step that reads, as the train loop resumes (a damaged newer one is skipped, not moved)
    errors = []
    for s in reversed(_committed_steps(ckpt)):
        try:
            model = _load_step(ckpt, s, config, devices)
        except LoadError:
            raise  # another architecture: no older step fixes that
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
            errors.append(f"step {s}: {short_error(e)}")
            continue
        if errors:
            print(f"checkpoint {ckpt} is damaged at {'; '.join(errors)}: loaded step {s} instead", flush=True)
        return model
    raise LoadError(
        f"no committed checkpoint in {ckpt} can be read ({'; '.join(errors[:3])}); pass another run or "
        "step=, or check the storage."
    )


def _load_step(ckpt: epath.Path, step: int, config, devices) -> Model:
    """The Model of one committed step (the body of `load`)."""

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
