"""What the train loop consumes: packed, shuffled, mixed, per-host batches with an exact resume state.

Embedded and registered document tasks are tokenised once through their seqio Task (cached in memory and
as .npz under data.cache_dir) and served by index from the token stream (packing.py), so a batch costs
one numpy gather. Every host computes the same global batch plan and materialises only its slice
[B / process_count, T], so the global batch does not depend on the host count.

TFDS tasks are too big to hold: they stream through seqio with per-host file sharding, in blocks of
`STREAM_BLOCK_ROWS` consecutive rows shuffled within the block. Their state (epoch, document, token
offset of the block, rows taken from it) is exact but per host, and their global batch depends on the
host count (each host reads only its shard of the files).

Iterator state: {'step', 'mixture', 'seq_len', 'batch_size', 'tasks': {seqio task: {'epoch', 'offset'}}}
(streaming tasks add 'rows', 'doc', 'token', 'in_block'); JSON-serialisable.
"""

from __future__ import annotations

import os

import numpy as np
import seqio

from voltron_jax.data import corpus, packing, tasks
from voltron_jax.data import vocab as vocab_lib
from voltron_jax.data.corpus import DataError

STREAM_BLOCK_ROWS = 1024
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
    if os.path.exists(path):
        with np.load(path) as z:
            out = (z["stream"], z["lengths"])
    else:
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
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = packing.epoch_permutation(self.n_rows, self.seed_parts, epoch)
        return self._perms[epoch]

    def windows(self, ks: np.ndarray) -> np.ndarray:
        """int32[len(ks), T+1] windows of the task's rows number `ks` (global, across epochs)."""
        epochs, offsets = np.divmod(np.asarray(ks, np.int64), self.n_rows)
        rows = offsets.copy()
        if self.shuffle:
            for e in np.unique(epochs):
                rows[epochs == e] = self._perm(int(e))[offsets[epochs == e]]
        return packing.gather_rows(self.stream, rows, self.seq_len)


class _StreamRows:
    """Rows of a streamed seqio task (TFDS): blocks of consecutive rows, shuffled within each block."""

    streaming = True

    def __init__(
        self,
        task: str,
        split: str,
        seq_len: int,
        seed_parts: tuple,
        shuffle: bool,
        shard: seqio.ShardInfo | None,
        block_rows: int = STREAM_BLOCK_ROWS,
    ):
        self.task, self.split, self.seq_len, self.shard = task, split, seq_len, shard
        self.seed_parts, self.shuffle, self.block_rows = seed_parts, shuffle, block_rows
        self.state = dict(epoch=0, doc=0, token=0, in_block=0)
        self._block, self._block_at, self._carry, self._reader, self._next = None, None, [], None, None

    def _open(self, doc: int):
        ds = (
            seqio.get_mixture_or_task(self.task)
            .get_dataset(
                sequence_length=None,
                split=self.split,
                shuffle=False,
                shard_info=self.shard,
                num_epochs=1,
                trim_output_features=False,
                try_in_mem_cache=False,
            )
            .skip(doc)
        )
        return ((doc + i, ex["targets"]) for i, ex in enumerate(ds.as_numpy_iterator()))

    def _build(self) -> None:
        """Materialise the block that starts at state (epoch, doc, token)."""
        st = self.state
        at = (st["epoch"], st["doc"], st["token"])
        if self._reader is None or self._next != at:  # not positioned here: reopen (resume, new epoch)
            self._reader, self._carry = self._open(st["doc"]), []
            first = next(self._reader, None)
            self._carry = [(first[0], st["token"], first[1])] if first is not None else []
        pieces, total, need = (
            list(self._carry),
            sum(len(a) - o for _, o, a in self._carry),
            self.block_rows * self.seq_len + 1,
        )
        while total < need and (item := next(self._reader, None)) is not None:
            pieces.append((item[0], 0, item[1]))
            total += len(item[1])
        buf = np.concatenate([a[o:] for _, o, a in pieces]) if pieces else np.zeros(0, np.int32)
        n = min(self.block_rows, packing.num_rows(len(buf), self.seq_len))
        if n == 0 and at[1:] == (0, 0):
            raise DataError(
                f"split {self.split!r} of task {self.task!r} has fewer than seq_len+1 tokens "
                f"(this host's shard); lower data.seq_len or check the data_dir."
            )
        if n == self.block_rows:  # the next block starts at buffer index n*T: find its document
            cut, carry = n * self.seq_len, []
            for doc, o, a in pieces:
                size = len(a) - o
                if carry:
                    carry.append((doc, o, a))
                elif cut < size:
                    carry.append((doc, o + cut, a))
                else:
                    cut -= size
            self._carry = carry
            self._next = (at[0], self._carry[0][0], self._carry[0][1])
        else:  # end of the epoch: the tail is dropped, the next epoch starts from the first document
            self._next, self._reader = (at[0] + 1, 0, 0), None
        order = (
            packing.epoch_permutation(n, (*self.seed_parts, *at[1:]), at[0]) if self.shuffle else np.arange(n)
        )
        self._block = packing.gather_rows(buf, order, self.seq_len)
        self._block_at = at

    def take(self, n: int) -> np.ndarray:
        """The next `n` windows int32[n, T+1]."""
        out = []
        while n > 0:
            st = self.state
            if self._block_at != (st["epoch"], st["doc"], st["token"]):
                self._build()
            if st["in_block"] >= len(self._block):
                st.update(epoch=self._next[0], doc=self._next[1], token=self._next[2], in_block=0)
                continue
            k = min(n, len(self._block) - st["in_block"])
            out.append(self._block[st["in_block"] : st["in_block"] + k])
            st["in_block"] += k
            n -= k
        return np.concatenate(out) if out else np.zeros((0, self.seq_len + 1), np.int32)

    def set_state(self, state: dict) -> None:
        self.state = {k: int(state[k]) for k in ("epoch", "doc", "token", "in_block")}
        self._block_at, self._reader, self._next = None, None, None


# --------------------------------------------------------------------------------------------- iterator


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
        plan = (
            packing.allocate(self.rates, self.counts, self.batch_size)
            if len(self.names) > 1
            else np.zeros(self.batch_size, np.int64)
        )
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
                f"no cluster assignment: task {name!r} is not registered. Run the c-BTM data "
                "preparation (voltron_jax/data/cbtm.py) first; it registers one document task "
                "per cluster with data.register_document_task('cluster_<i>', ...)."
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
    names, rates, providers = [], [], []
    for name, rate in resolve_mixture(config, mixture, cluster):
        tn = tasks.ensure_task(name, d, vocab)
        seed_parts = (d.shuffle_seed, seed, packing.stable_hash(tn))
        source = tasks.document_source(tn)
        if source is None:
            p = _StreamRows(tn, split, d.seq_len, seed_parts, shuffle, shard, STREAM_BLOCK_ROWS)
        else:
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
        names.append(tn)
        rates.append(rate)
        providers.append(p)
    return DataIterator(
        names, rates, providers, d.batch_size, d.seq_len, vocab.eos_id, process_index, process_count
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
    `cluster=i` trains on the c-BTM cluster task 'cluster_<i>' instead of the mixture.
    """
    return _iterator(config, mixture, "train", seed, True, process_index, process_count, cluster)


def make_eval_batches(
    config,
    mixture: str,
    n_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    cluster: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """The first `n_batches` batches of the validation split, unshuffled (the same every call).

    A validation split shorter than n_batches * batch_size rows wraps around to its start.
    """
    it = _iterator(config, mixture, "validation", 0, False, process_index, process_count, cluster)
    return [next(it) for _ in range(n_batches)]


def corpus_manifest(config) -> dict:
    """Corpus manifest (files: path, sha256, bytes, split) + data config; for the workdir and checkpoints."""
    return corpus.manifest(config.data)


def write_manifest(workdir: str, config) -> str:
    """Write `corpus_manifest(config)` to <workdir>/corpus_manifest.json; returns the path."""
    return corpus.write_manifest(workdir, config.data)
