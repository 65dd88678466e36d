"""What the train loop consumes: packed, shuffled, mixed, per-host batches with an exact resume state.

Every non-streaming task is read from a token store (ArrayRecord shards + index, shards.py) through a
Grain MapDataset: the store's token stream (documents in their final order, EOS after each) is cut into
rows of T+1 tokens (packing.py), `grain.MapDataset.shuffle` permutes the rows of each epoch by an index
shuffle (O(1) memory: no permutation array) and `.repeat()` numbers the rows of all epochs 0, 1, 2, ...
Prepared tasks ('icp', 'icp_random', 'cluster_<j>') read the stores that prepare wrote under
<workdir>/data/tokens/; in-memory document tasks (the embedded stdlib / pydoc corpora, tests) are
tokenised once into a store under data.cache_dir and read the same way, so `make demo` runs the pod path.

Every host computes the same global batch plan (packing.allocate: a pure function of the rows each task
has given) and reads only its slice [B / process_count, T] of it: row k of task j is the k-th element of
j's Grain dataset, whatever the host count. The iterator state is therefore a few integers (rows each
task has given = epoch * rows + offset, and the step), restoring it costs the same anywhere in the
corpus, and a state saved on N hosts resumes on M hosts with exactly the rows N would have read.

TFDS tasks that were not prepared still stream through seqio with per-host file sharding (streaming.py):
their state is per host and their global batch depends on the host count; prepare the corpus instead.

Iterator state: {'step', 'mixture', 'seq_len', 'batch_size', 'tasks': {task: {'epoch', 'offset'}}}
(streaming tasks add 'rows', 'doc', 'token', 'in_block'); JSON-serialisable.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import grain
import numpy as np

from voltron_jax.data import corpus, packing, passkey, shards, streaming, tasks
from voltron_jax.data import vocab as vocab_lib
from voltron_jax.data.corpus import DataError

STATE_VERSION = 2  # 2: rows read from token stores through Grain (1: in-memory streams, numpy shuffle)


# --------------------------------------------------------------------------------------------- token stores


def document_store(task: str, split: str, vocab, data_cfg) -> shards.TokenStore:
    """The token store of an in-memory document task's split, written under data.cache_dir once."""
    source = tasks.document_source(task)
    if source is None:
        raise DataError(f"task {task!r} is not an in-memory document task.")
    key = f"{task}.{split}.{shards.vocab_id(vocab)}.{source.fingerprint(split)[:20]}"
    path = os.path.join(vocab_lib.cache_dir(data_cfg), "tokens", key)
    if shards.is_complete(path):
        store = shards.TokenStore(path)
        try:
            store.verify()  # every shard present, of its size and record count
            return store
        except DataError as e:  # a cache is derived from the corpus: rebuild it rather than stop
            store.close()
            print(f"token cache {path} is unreadable ({e}); tokenizing again", flush=True)
            shutil.rmtree(path)
    texts = (d.text for d in source.documents(split))
    shards.build_store(path, vocab, lambda w: w.add(texts))
    return shards.TokenStore(path)


def task_store(task: str, split: str, vocab, data_cfg) -> tuple[shards.TokenStore, int, int]:
    """(store, first token, end token) of a task's split: a prepared store's segment or a cached store."""
    stored = tasks.store_source(task)
    if stored is not None:
        if split not in stored.splits:
            raise DataError(f"task {task!r} has no split {split!r}; it has {list(stored.splits)}.")
        store, start, stop = stored.open(split)
        if store.vocab != shards.vocab_id(vocab):
            raise DataError(
                f"task {task!r} was tokenised with vocabulary {store.vocab} ({store.path}) but this run uses "
                f"{shards.vocab_id(vocab)}; prepare again with this data.vocab / data.spm_path."
            )
        return store, start, stop
    store = document_store(task, split, vocab, data_cfg)
    return store, 0, store.n_tokens


def token_stream(task: str, split: str, vocab, data_cfg) -> tuple[np.ndarray, np.ndarray]:
    """(stream, document lengths incl. EOS) of a task's split, read whole: for tests and small tasks."""
    store, start, stop = task_store(task, split, vocab, data_cfg)
    stream = store.read(start, stop).astype(packing.token_dtype(vocab.vocab_size))
    ends = np.flatnonzero(stream == vocab.eos_id) + 1
    return stream, np.diff(np.concatenate([[0], ends])).astype(np.int64)


# --------------------------------------------------------------------------------------------- row providers


def grain_seed(seed_parts: tuple) -> int:
    """A 32-bit Grain seed from the seed parts (the same in every process)."""
    blob = "/".join(str(int(s) & 0xFFFFFFFF) for s in seed_parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big")


class _RowSource:
    """Grain random-access source: row r = tokens [start + r*T, start + r*T + T + 1) of a store."""

    def __init__(self, store: shards.TokenStore, start: int, n_rows: int, seq_len: int):
        self.store, self.start, self.n_rows, self.seq_len = store, start, n_rows, seq_len

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, r: int) -> np.ndarray:
        return self.store.read_many(np.asarray([self.start + int(r) * self.seq_len]), self.seq_len + 1)[0]


class StoreRows:
    """Rows of a token range of a store through a Grain MapDataset: row k (over all epochs) is
    `dataset[k]`, shuffled per epoch by Grain's index shuffle when `shuffle`."""

    streaming = False

    def __init__(
        self, name: str, store, start: int, stop: int, seq_len: int, seed_parts: tuple, shuffle: bool
    ):
        self.name, self.store, self.seq_len = name, store, seq_len
        self.n_rows = packing.num_rows(stop - start, seq_len)
        self.spread = 0  # > 0: row k is row k * n_rows // spread (k < spread rows spread over the stream)
        ds = grain.MapDataset.source(_RowSource(store, start, self.n_rows, seq_len))
        self._plain = ds.repeat()
        self.dataset = (ds.shuffle(seed=grain_seed(seed_parts)) if shuffle else ds).repeat()

    def windows(self, ks: np.ndarray) -> np.ndarray:
        """int32[len(ks), T+1] windows of the task's rows number `ks` (global, across epochs)."""
        ks = np.asarray(ks, np.int64)
        if self.spread:
            ds, ks = self._plain, ks * self.n_rows // self.spread
        else:
            ds = self.dataset
        if len(ks) == 0:
            return np.zeros((0, self.seq_len + 1), np.int32)
        return np.stack([ds[int(k)] for k in ks])


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
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"data iterator state version {state.get('version')} was written by another data pipeline "
                f"(this one reads version {STATE_VERSION}: token stores through Grain), whose row order "
                "differs; finish that run with the code that started it, or start the phase afresh."
            )
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
    if source is None and tasks.store_source(tn) is None:
        return streaming.StreamRows(
            tn, split, d.seq_len, seed_parts, shuffle, shard, streaming.STREAM_BLOCK_ROWS
        )
    if source is not None and split not in source.splits:
        raise DataError(f"task {name!r} has no split {split!r}; it has {list(source.splits)}.")
    store, start, stop = task_store(tn, split, vocab, d)
    p = StoreRows(tn, store, start, stop, d.seq_len, seed_parts, shuffle)
    if p.n_rows == 0:
        raise DataError(
            f"split {split!r} of task {name!r} has {stop - start} tokens, fewer than one row of "
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
    shard = (process_index, process_count) if process_count > 1 else None
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
    source = tasks.store_source(tn) or tasks.document_source(tn)
    if "validation" not in source.splits:
        return 0
    _, start, stop = task_store(tn, "validation", vocab, d)
    return packing.num_rows(stop - start, d.seq_len)


def corpus_manifest(config) -> dict:
    """Corpus manifest (files: path, sha256, bytes, split) + data config; for the workdir and checkpoints."""
    return corpus.manifest(config.data)


def write_manifest(workdir: str, config) -> str:
    """Write `corpus_manifest(config)` to <workdir>/corpus_manifest.json; returns the path."""
    return corpus.write_manifest(workdir, config.data)
