"""Data: embedded corpora, vocabularies, tasks, token stores (ArrayRecord), packing and the resumable,
host-count-free per-host iterator (Grain).

Public API (what the train loop calls):
  make_train_iterator(config, mixture, *, seed, process_index=0, process_count=1, cluster=None)
  make_eval_batches(config, mixture, n_batches, process_index=0, process_count=1)
  corpus_manifest(config) / write_manifest(workdir, config)
  make_vocab(data_cfg, workdir=None), register_document_task(name, documents, vocab=None)
  register_store_task(name, {split: (store folder, segment)}), TokenStore(path), ORDERINGS
  Document, DocumentSource, DataError

Attributes load lazily, so `import voltron_jax.data` stays cheap. TensorFlow (through seqio) is imported
only for a SentencePiece or tokenizers vocabulary and for TFDS tasks streamed through seqio
(`tasks.uses_tensorflow`); a byte-vocabulary run on embedded or prepared corpora never imports it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "make_train_iterator": "pipeline",
    "make_eval_batches": "pipeline",
    "corpus_manifest": "pipeline",
    "write_manifest": "pipeline",
    "DataIterator": "pipeline",
    "resolve_mixture": "pipeline",
    "make_vocab": "vocab",
    "register_document_task": "tasks",
    "register_store_task": "tasks",
    "ORDERINGS": "orderings",
    "TokenStore": "shards",
    "parse_mixture": "tasks",
    "Document": "corpus",
    "DocumentSource": "corpus",
    "DataError": "corpus",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"voltron_jax.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'voltron_jax.data' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
