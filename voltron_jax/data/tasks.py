"""The tasks behind the mixture names of `config.data.mixtures`, and the hook to add more.

Mixture specs are strings "name:rate,name:rate" (rates are normalised). Names:

* `stdlib`: the embedded standard-library corpus (train/validation), task `voltron_stdlib`;
* `pydoc`: the high-quality pydoc topics (decay stage), `voltron_pydoc`;
* `python_docs`: the Python documentation's sources, installed by the system's package tool (long
  natural-language documents; data/corpus.py), `voltron_python_docs`;
* `corpus`: whatever `data.corpus` names (`stdlib` or `tfds:<name>`), so one override switches the
  pretraining corpus; with data.ordering 'icp' / 'dedup_random' it means the prepared 'icp' /
  'icp_random' task instead;
* `tfds:<name>[:<version>]` (e.g. `tfds:c4/en`): a seqio.TfdsDataSource on `data.tfds_data_dir`
  (registered on demand; nothing is downloaded: the data must already be in the data_dir);
* any name given to `register_document_task` (documents held in memory, tokenised into a cached token
  store on first use) or `register_store_task` (token stores written by voltron_jax/data/prepare.py:
  the ICP-ordered corpus 'icp', its random-order twin 'icp_random', the c-BTM clusters 'cluster_<j>').

seqio is kept for what it still does here: the SentencePiece vocabulary and the TFDS tasks that stream
when a corpus was not prepared. Document and store tasks never go through seqio's tf.data pipeline: they
are tokenised by the vocabulary straight into ArrayRecord shards, and the train loop registers them
without seqio, so a byte-vocabulary run on them never imports seqio or TensorFlow. Passing a vocabulary
to `register_document_task` also adds the seqio Task (for seqio's own tools); seqio is imported then.

Every task has the same output feature, `targets`, tokenised by the run's vocabulary with EOS appended.
Registration is idempotent: registering the same documents with the same vocabulary again is a no-op,
registering different ones under the same name replaces the task.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence

from voltron_jax.data import corpus, orderings, shards
from voltron_jax.data import vocab as vocab_lib

TASK_PREFIX = "voltron_"
BUILTIN = ("stdlib", "pydoc", "corpus", "python_docs")
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class StoreSource:
    """A task whose splits are (token store folder, segment name or None for the whole stream)."""

    def __init__(self, splits: Mapping[str, tuple[str, str | None]]):
        self.parts = {k: (str(p), seg) for k, (p, seg) in splits.items()}
        self.splits = tuple(self.parts)

    def open(self, split: str):
        """(TokenStore, first token, end token) of `split`."""

        path, seg = self.parts[split]
        store = shards.TokenStore(path)
        if seg is None:
            return store, 0, store.n_tokens
        if seg not in store.segments:
            raise corpus.DataError(f"token store {path} has no segment {seg!r}; prepare again.")
        start, stop, _ = store.segments[seg]
        return store, start, stop

    def key(self) -> tuple:
        return tuple(sorted(self.parts.items()))


# seqio task name -> in-memory documents | token stores (None for streaming TFDS tasks), and the key it
# was added with.
_SOURCES: dict[str, corpus.DocumentSource | StoreSource | None] = {}
_ADDED: dict[str, tuple] = {}


def _preprocessors() -> list:
    import seqio  # lazy: seqio/TensorFlow (seqio tasks only)

    return [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
        seqio.preprocessors.tokenize,
        seqio.preprocessors.append_eos,
    ]


def task_name(name: str) -> str:
    """seqio name of a mixture name: 'stdlib' -> 'voltron_stdlib', 'tfds:c4/en' -> 'voltron_tfds_c4_en'."""
    if name.startswith("tfds:"):
        return TASK_PREFIX + "tfds_" + re.sub(r"[^A-Za-z0-9]+", "_", name[5:]).strip("_")
    if not _NAME.match(name):
        raise corpus.DataError(f"task name {name!r} may only use letters, digits and '_'.")
    return TASK_PREFIX + name


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """'stdlib:0.7,pydoc:0.3' -> [('stdlib', 0.7), ('pydoc', 0.3)] with rates normalised to sum 1."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, rate = part.rpartition(":")
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if not sep or not name or value < 0:
            raise corpus.DataError(
                f"mixture {spec!r}: entry {part!r} is not 'name:rate' with rate >= 0 "
                "(e.g. 'stdlib:0.7,pydoc:0.3')."
            )
        if value > 0:
            out.append((name, value))
    names = [n for n, _ in out]
    if not out or len(set(names)) != len(names):
        raise corpus.DataError(
            f"mixture {spec!r} needs at least one task with a positive rate and no repeated names."
        )
    total = sum(r for _, r in out)
    return [(n, r / total) for n, r in out]


def _lookup(name: str):
    return _SOURCES.get(name if name.startswith(TASK_PREFIX) else task_name(name))


def document_source(name: str) -> corpus.DocumentSource | None:
    """The in-memory documents of a registered task (seqio or mixture name); None for other tasks."""
    src = _lookup(name)
    return src if isinstance(src, corpus.DocumentSource) else None


def store_source(name: str) -> StoreSource | None:
    """The token stores of a prepared task (seqio or mixture name); None for other tasks."""
    src = _lookup(name)
    return src if isinstance(src, StoreSource) else None


def register_store_task(name: str, splits: Mapping[str, tuple[str, str | None]]) -> str:
    """Register a task read from token stores: {split: (store folder, segment name | None)}."""
    tn = task_name(name)
    _SOURCES[tn] = StoreSource(splits)
    _ADDED.pop(tn, None)
    return tn


def uses_tensorflow(data_cfg) -> bool:
    """Whether a run with this data config imports TensorFlow (through seqio): a SentencePiece or
    tokenizers vocabulary, or a TFDS corpus or mixture task. A byte-vocabulary run on document or store
    tasks does not (entry points preload TensorFlow, quietly, only when this says so)."""
    specs = [str(v) for v in data_cfg.mixtures.values()] + [str(data_cfg.corpus)]
    return data_cfg.vocab != "byte" or any("tfds:" in s for s in specs)


def registered() -> list[str]:
    """seqio names of the tasks this module knows (built-in ones appear once a pipeline has used them)."""
    return sorted(_SOURCES)


def _add(name: str, key: tuple, make_source, vocab) -> None:
    """Add seqio task `name` (its source made by `make_source()`), replacing an older registration made
    with a different key."""
    import seqio  # lazy: seqio/TensorFlow (seqio tasks only)
    import tensorflow as tf  # lazy: with seqio

    if _ADDED.get(name) == key and name in seqio.TaskRegistry.names():
        return
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=make_source(),
        preprocessors=_preprocessors(),
        output_features={
            "targets": seqio.Feature(vocab_lib.seqio_vocab(vocab), add_eos=True, dtype=tf.int32)
        },
        metric_fns=[],
    )
    _ADDED[name] = key


def _function_source(source: corpus.DocumentSource):
    import seqio  # lazy: seqio/TensorFlow (seqio tasks only)
    import tensorflow as tf  # lazy: with seqio

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # documents are never shuffled; rows are (pipeline.py)
        texts = [d.text for d in source.documents(split)]
        return tf.data.Dataset.from_tensor_slices(
            {"text": tf.constant(texts, dtype=tf.string, shape=[len(texts)])}
        )

    return seqio.FunctionDataSource(dataset_fn, splits=source.splits, caching_permitted=False)


def register_document_task(
    name: str,
    documents: corpus.DocumentSource | Mapping[str, Sequence],
    vocab=None,
) -> str:
    """Register a task over explicit ordered documents per split; returns its seqio task name.

    `documents`: a DocumentSource or {split: [Document | str, ...]}. Use the returned name's mixture form
    (`name`) in a mixture spec, e.g. register_document_task('icp', ...) then data.mixtures.pretrain='icp:1.0'.
    Without `vocab` no seqio task is added (the pipeline reads the documents itself, without seqio).
    """
    tn = task_name(name)
    source = documents if isinstance(documents, corpus.DocumentSource) else corpus.DocumentSource(documents)
    _SOURCES[tn] = source
    if vocab is not None:
        key = (
            "docs",
            tuple(source.fingerprint(s) for s in source.splits),
            vocab_lib.vocab_fingerprint(vocab),
        )
        _add(tn, key, lambda: _function_source(source), vocab)
    return tn


def register_tfds_task(name: str, data_dir: str, vocab) -> str:
    """Register 'tfds:<name>[:<version>]' (a dataset with a 'text' feature) on `data_dir`; loads nothing."""
    tn = task_name(name)
    tfds_name = name[5:] if ":" in name[5:] else name[5:] + ":*.*.*"  # seqio wants a version; latest
    key = ("tfds", tfds_name, data_dir, vocab_lib.vocab_fingerprint(vocab))

    def source():
        import seqio  # lazy: seqio/TensorFlow (seqio tasks only)

        return seqio.TfdsDataSource(
            tfds_name=tfds_name,
            tfds_data_dir=data_dir or None,
            splits={"train": "train", "validation": "validation"},
        )

    _add(tn, key, source, vocab)
    _SOURCES[tn] = None
    return tn


@functools.lru_cache(maxsize=8)
def _builtin_source(kind: str, granularity: str, val_fraction: float) -> corpus.DocumentSource:
    if kind in corpus.EMBEDDED:
        return corpus.embedded_source(kind, granularity, val_fraction)
    return corpus.pydoc_source(granularity, val_fraction)


def ensure_task(name: str, data_cfg, vocab) -> str:
    """Make mixture name `name` a registered task for this config and vocabulary; return its name. TFDS
    tasks become seqio tasks (they stream through seqio); document and store tasks are registered here
    only (the pipeline tokenises them into token stores, without seqio)."""
    if name == "corpus":  # the prepared (deduplicated, reordered) corpus when data.ordering asks for it
        name = orderings.get(data_cfg.ordering).corpus_task or data_cfg.corpus
    if name.startswith("tfds:"):
        return register_tfds_task(name, data_cfg.tfds_data_dir, vocab)
    if name in ("stdlib", "pydoc", "python_docs"):
        source = _builtin_source(name, data_cfg.granularity, float(data_cfg.val_fraction))
        return register_document_task(name, source)
    tn = task_name(name)
    if isinstance(_SOURCES.get(tn), StoreSource):
        return tn
    if tn not in _SOURCES:
        known = sorted({*BUILTIN, *(n[len(TASK_PREFIX) :] for n in _SOURCES)})
        raise corpus.DataError(
            f"unknown data task {name!r}; known: {known} or 'tfds:<name>'. The 'icp', 'icp_random' and "
            "'cluster_<j>' tasks exist only after voltron_jax.data.prepare (data.register_document_task)."
        )
    return tn
