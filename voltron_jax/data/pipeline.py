"""What the train loop consumes: packed, shuffled, mixed, per-host batches with an exact resume state.

Embedded and registered document tasks are tokenised once through their seqio Task (cached in memory and
as .npz under data.cache_dir) and served by index from the token stream (packing.py), so a batch costs
one numpy gather. Every host computes the same global batch plan and materialises only its slice
[B / process_count, T], so the global batch does not depend on the host count.

TFDS tasks are too big to hold: they stream through seqio with per-host file sharding (streaming.py),
in blocks of consecutive rows shuffled within the block. Their state (epoch, document, token offset of
the block, rows taken from it) is exact but per host, and their global batch depends on the host count
(each host reads only its shard of the files).

Iterator state: {'step', 'mixture', 'seq_len', 'batch_size', 'tasks': {seqio task: {'epoch', 'offset'}}}
(streaming tasks add 'rows', 'doc', 'token', 'in_block'); JSON-serialisable.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
import seqio

from voltron_jax.data import corpus, packing, passkey, streaming, tasks
from voltron_jax.data import vocab as vocab_lib
from voltron_jax.data.corpus import DataError

STATE_VERSION = 1
_STREAMS: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # in-memory cache of tokenised splits


# --------------------------------------------------------------------------------------------- token streams


def _tokenize_task(task: str, split: str, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """All documents of `split` through the seqio task (tokenise + EOS): (stream, per-document lengths)."""
    ds = seqio.get_mixture_or_task(task).get_dataset(
        sequence_length=None,
        split=split,
        shuffle=False,
        num_epochs=1,
        trim_output_features=False,
        try_in_mem_cache=False,
    )
    ds = ds.map(lambda ex: ex["targets"]).ragged_batch(4096)
    parts, lengths = [], []
    for rt in ds:
        parts.append(rt.flat_values.numpy().astype(dtype))
        lengths.append(rt.row_lengths().numpy())
    if not parts:
        return np.zeros(0, dtype), np.zeros(0, np.int64)
    return np.concatenate(parts), np.concatenate(lengths).astype(np.int64)


def token_stream(task: str, split: str, vocab: seqio.Vocabulary, data_cfg) -> tuple[np.ndarray, np.ndarray]:
    """(stream, document lengths incl. EOS) of an in-memory task's split; cached in memory and on disk."""
    source = tasks.document_source(task)
    if source is None:
        raise DataError(f"task {task!r} is not an in-memory document task.")
    key = f"{task}.{split}.{vocab_lib.vocab_fingerprint(vocab)}.{source.fingerprint(split)[:20]}"
    if key in _STREAMS:
        return _STREAMS[key]
    path = os.path.join(vocab_lib.cache_dir(data_cfg), "tokens", key + ".npz")
    out = None
    if os.path.exists(path):
        try:
            with np.load(path) as z:
                out = (z["stream"], z["lengths"])
        except (
            OSError,
            ValueError,
            KeyError,
            EOFError,
            zipfile.BadZipFile,
        ) as e:  # a truncated or foreign cache file
            print(f"token cache {path} is unreadable ({type(e).__name__}); tokenizing again", flush=True)
    if out is None:
        out = _tokenize_task(task, split, packing.token_dtype(vocab.vocab_size))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, stream=out[0], lengths=out[1])
        os.replace(tmp, path)  # atomic: parallel test workers share the cache
    _STREAMS[key] = out
    return out


# --------------------------------------------------------------------------------------------- row providers


class _MemoryRows:
    """Rows of an in-memory stream: the task's k-th row is perm(epoch)[offset], k = epoch*n_rows + offset."""

    streaming = False

    def __init__(self, name: str, stream: np.ndarray, seq_len: int, seed_parts: tuple, shuffle: bool):
        self.name, self.stream, self.seq_len = name, stream, seq_len
        self.n_rows = packing.num_rows(len(stream), seq_len)
        self.seed_parts, self.shuffle = seed_parts, shuffle
        self.spread = 0  # > 0: row k is row k * n_rows // spread (k < spread rows spread over the stream)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = packing.epoch_permutation(self.n_rows, self.seed_parts, epoch)
        return self._perms[epoch]

    def windows(self, ks: np.ndarray) -> np.ndarray:
        """int32[len(ks), T+1] windows of the task's rows number `ks` (global, across epochs)."""
        ks = np.asarray(ks, np.int64)
        if self.spread:
            ks = ks * self.n_rows // self.spread
        epochs, offsets = np.divmod(ks, self.n_rows)
        rows = offsets.copy()
        if self.shuffle:
            for e in np.unique(epochs):
                rows[epochs == e] = self._perm(int(e))[offsets[epochs == e]]
        return packing.gather_rows(self.stream, rows, self.seq_len)


# --------------------------------------------------------------------------------------------- iterator


def _batch_plan(rates: list[float], counts: np.ndarray, batch_size: int) -> np.ndarray:
    """Task index of each row of the next global batch, given the rows each task has given so far."""
    return packing.allocate(rates, counts, batch_size) if len(rates) > 1 else np.zeros(batch_size, np.int64)


class DataIterator:
    """Global batches of a mixture, this host's slice of each; `get_state`/`set_state` resume exactly."""

    def __init__(
        self,
        names: list[str],
        rates: list[float],
        providers: list,
        batch_size: int,
        seq_len: int,
        eos_id: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.names, self.rates, self.providers = names, rates, providers
        self.batch_size, self.seq_len, self.eos_id = batch_size, seq_len, eos_id
        self.local = batch_size // process_count
        self.lo = process_index * self.local
        self.mixture = ",".join(f"{n}:{r:.6g}" for n, r in zip(names, rates, strict=True))
        self.step = 0
        self.counts = np.zeros(len(names), np.int64)  # global rows each task has given so far

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        plan = _batch_plan(self.rates, self.counts, self.batch_size)
        windows = np.empty((self.local, self.seq_len + 1), np.int32)
        mine = plan[self.lo : self.lo + self.local]
        for j, p in enumerate(self.providers):
            sel = mine == j
            if not sel.any():
                continue
            if p.streaming:
                windows[sel] = p.take(int(sel.sum()))
            else:  # global row numbers of this task: rows before the batch + rank within the batch
                ks = self.counts[j] + np.cumsum(plan == j)[self.lo : self.lo + self.local][sel] - 1
                windows[sel] = p.windows(ks)
        self.counts += np.bincount(plan, minlength=len(self.names))
        self.step += 1
        return packing.make_batch(windows, self.eos_id)

    def get_state(self) -> dict:
        """JSON-serialisable position: the next batch is the one an uninterrupted run would yield."""
        per_task = {}
        for name, p, c in zip(self.names, self.providers, self.counts, strict=True):
            if p.streaming:
                per_task[name] = dict(rows=int(c), **p.state)
            else:
                epoch, offset = divmod(int(c), p.n_rows)
                per_task[name] = dict(epoch=epoch, offset=offset)
        return dict(
            version=STATE_VERSION,
            step=self.step,
            mixture=self.mixture,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            tasks=per_task,
        )

    def set_state(self, state: dict) -> None:
        """Continue from a `get_state()` of an iterator with the same mixture, seq_len and batch size."""
        mine = dict(mixture=self.mixture, seq_len=self.seq_len, batch_size=self.batch_size)
        theirs = {k: state.get(k) for k in mine}
        if state.get("version") != STATE_VERSION or theirs != mine or set(state["tasks"]) != set(self.names):
            raise DataError(
                f"data iterator state {theirs} does not match this iterator {mine}; resume with the "
                "same data.mixtures, data.seq_len and data.batch_size it was saved with."
            )
        counts = []
        for name, p in zip(self.names, self.providers, strict=True):
            t = state["tasks"][name]
            if p.streaming:
                p.set_state(t)
                counts.append(int(t["rows"]))
            else:
                if int(t["offset"]) >= p.n_rows:
                    raise DataError(
                        f"data iterator state of task {name!r} has offset {t['offset']} but the task "
                        f"has {p.n_rows} rows: its documents changed since the state was saved."
                    )
                counts.append(int(t["epoch"]) * p.n_rows + int(t["offset"]))
        self.counts = np.asarray(counts, np.int64)
        self.step = int(state["step"])
        if int(self.counts.sum()) != self.step * self.batch_size:
            raise DataError(
                f"data iterator state is inconsistent: {int(self.counts.sum())} rows given but "
                f"step {self.step} x batch {self.batch_size}; it was not written by get_state()."
            )


# --------------------------------------------------------------------------------------------- public API


def resolve_mixture(config, mixture: str, cluster: int | None = None) -> list[tuple[str, float]]:
    """Mixture name (a key of data.mixtures) or spec -> [(mixture task name, rate)]; `cluster` picks one."""
    if cluster is not None:
        name = f"cluster_{int(cluster)}"
        if tasks.task_name(name) not in tasks.registered():
            raise DataError(
                f"no cluster assignment: task {name!r} is not registered. Run the data preparation "
                "first (voltron_jax.data.prepare.prepare(config, workdir), which train.run calls for "
                "cluster phases); it registers one document task 'cluster_<i>' per c-BTM cluster."
            )
        return [(name, 1.0)]
    if mixture == "cluster":
        raise DataError("mixture 'cluster' needs cluster=<index> (a fan-out phase member).")
    spec = config.data.mixtures[mixture] if mixture in config.data.mixtures else mixture
    if ":" not in spec:
        raise DataError(
            f"mixture {mixture!r} is neither a key of data.mixtures {sorted(config.data.mixtures)} "
            "nor a spec like 'stdlib:0.7,pydoc:0.3'."
        )
    return tasks.parse_mixture(spec)


def _provider(name: str, split: str, d, vocab, seed_parts: tuple, shuffle: bool, shard):
    """The row provider of mixture task `name`: in memory for document tasks, streamed for TFDS."""
    tn = tasks.ensure_task(name, d, vocab)
    seed_parts = (*seed_parts, packing.stable_hash(tn))
    source = tasks.document_source(tn)
    if source is None:
        return streaming.StreamRows(
            tn, split, d.seq_len, seed_parts, shuffle, shard, streaming.STREAM_BLOCK_ROWS
        )
    if split not in source.splits:
        raise DataError(f"task {name!r} has no split {split!r}; it has {list(source.splits)}.")
    stream, _ = token_stream(tn, split, vocab, d)
    p = _MemoryRows(tn, stream, d.seq_len, seed_parts, shuffle)
    if p.n_rows == 0:
        raise DataError(
            f"split {split!r} of task {name!r} has {len(stream)} tokens, fewer than one row of "
            f"data.seq_len+1={d.seq_len + 1}; add documents, lower data.seq_len or (validation) "
            "raise data.val_fraction."
        )
    return p


def _iterator(
    config,
    mixture: str,
    split: str,
    seed: int,
    shuffle: bool,
    process_index: int,
    process_count: int,
    cluster: int | None,
) -> DataIterator:
    d = config.data
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is not in [0, process_count={process_count}).")
    if d.batch_size % process_count:
        raise DataError(
            f"data.batch_size={d.batch_size} is not divisible by process_count={process_count}; "
            "make the global batch a multiple of the number of hosts."
        )
    vocab = vocab_lib.make_vocab(d)
    vocab_lib.check_vocab_size(config.model.vocab_size, vocab, d)
    shard = seqio.ShardInfo(process_index, process_count) if process_count > 1 else None
    spec = resolve_mixture(config, mixture, cluster)
    providers = [_provider(n, split, d, vocab, (d.shuffle_seed, seed), shuffle, shard) for n, _ in spec]
    names = [p.name for p in providers]
    return DataIterator(
        names,
        [r for _, r in spec],
        providers,
        d.batch_size,
        d.seq_len,
        vocab.eos_id,
        process_index,
        process_count,
    )


def make_train_iterator(
    config,
    mixture: str,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    cluster: int | None = None,
) -> DataIterator:
    """Shuffled training batches of `mixture` (a data.mixtures key or a 'task:rate,...' spec).

    Yields dict(inputs, targets, positions, segment_ids: int32[B_local, T], weights: float32[B_local, T]),
    B_local = data.batch_size / process_count. Rows are shuffled per epoch by (data.shuffle_seed, seed).
    `cluster=i` trains on the c-BTM cluster task 'cluster_<i>' instead of the mixture. Mixture 'passkey'
    is the synthetic passkey-retrieval fine-tuning data (voltron_jax/data/passkey.py).
    """
    if mixture == "passkey":
        return passkey.PasskeyIterator.from_config(config, seed, process_index, process_count)
    return _iterator(config, mixture, "train", seed, True, process_index, process_count, cluster)


def make_eval_batches(
    config,
    mixture: str,
    n_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    cluster: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """`n_batches` fixed batches of the validation split (the same every call), unshuffled.

    The m rows an in-memory task gives are spread evenly over its whole split (row k * n_rows // m), not
    its first m rows: a prefix would measure only the first documents (with the demo's 16 rows of 256
    bytes, one 5.5 KB file). A split with fewer than m rows gives each row m // n_rows or one more times.
    """
    it = _iterator(config, mixture, "validation", 0, False, process_index, process_count, cluster)
    counts = np.zeros(len(it.names), np.int64)
    for _ in range(n_batches):  # the global plan alone: how many rows each task will give
        counts += np.bincount(_batch_plan(it.rates, counts, it.batch_size), minlength=len(it.names))
    for p, m in zip(it.providers, counts, strict=True):
        if not p.streaming:
            p.spread = int(m)
    return [next(it) for _ in range(n_batches)]


def cluster_validation_rows(config, cluster: int) -> int:
    """Validation rows of data.seq_len+1 tokens of c-BTM cluster task 'cluster_<cluster>' (0: no text)."""
    d = config.data
    vocab = vocab_lib.make_vocab(d)
    ((name, _),) = resolve_mixture(config, "cluster", cluster)
    tn = tasks.ensure_task(name, d, vocab)
    if "validation" not in tasks.document_source(tn).splits:
        return 0
    return packing.num_rows(len(token_stream(tn, "validation", vocab, d)[0]), d.seq_len)


def corpus_manifest(config) -> dict:
    """Corpus manifest (files: path, sha256, bytes, split) + data config; for the workdir and checkpoints."""
    return corpus.manifest(config.data)


def write_manifest(workdir: str, config) -> str:
    """Write `corpus_manifest(config)` to <workdir>/corpus_manifest.json; returns the path."""
    return corpus.write_manifest(workdir, config.data)
