"""Token stores: a tokenised document stream as ArrayRecord shards + an index, read by random access.

A store is one folder:

    index.json                          written LAST, atomically: the store is complete iff it exists
    tokens-00000-of-00004.arrayrecord   ArrayRecord shards of fixed-size chunks of the token stream

The stream is the documents in their final order, each followed by EOS (as packing.py packs them). It
is cut into records of `chunk_tokens` tokens (the last one may be shorter), `chunks_per_shard` records
per shard, stored as little-endian uint16 (vocabularies up to 65536 ids) or int32. Token t is in chunk
t // chunk_tokens, which is record (chunk % chunks_per_shard) of shard (chunk // chunks_per_shard), so
any token range is read with no per-document index in memory: the index holds a few numbers per shard
(file, records, bytes, tokens, documents) and named segments (e.g. the token range of each cluster).

Readers check each shard against the index when they first open it (present, same byte size) and name
the file and the fix when it is missing or damaged. Writers write to temporary names, rename each shard
when it is closed and write the index last, so a store whose writer died is never taken as complete.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterable

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from etils import epath

from voltron_jax.data import packing
from voltron_jax.data.corpus import DataError

FORMAT = 1
INDEX = "index.json"
CHUNK_TOKENS = 16384  # tokens per record: 32 KiB of uint16, one record per random read of a row
CHUNKS_PER_SHARD = 2048  # records per shard file: 32M tokens (64 MiB of uint16)
ENCODE_BATCH = 256  # documents tokenised per call (SentencePiece encodes a list at once)
_PROBE = "The quick brown fox, 1234567890 — déjà vu 中文 def f(x):\n\treturn x  # ok"
MAX_OPEN = 64  # shard readers kept open per store (LRU): bounds the per-host memory of a big store


def _local(path) -> epath.Path:
    """`path` as a local path; ArrayRecord reads and writes local files only (a bucket: gcsfuse mount)."""
    if "://" in os.fspath(path):
        raise DataError(
            f"token store {path} is not a local path: ArrayRecord reads and writes local files. Mount "
            "the bucket with gcsfuse (as MaxText does for Grain) and set "
            "--config.data.token_dir=/gcs/BUCKET/tokens (or a local disk of each host)."
        )
    return epath.Path(path)


def _shard_name(i: int, n: int) -> str:
    return f"tokens-{i:05d}-of-{n:05d}.arrayrecord"


def vocab_id(vocab) -> str:
    """A stable id of a vocabulary object (`encode`, `eos_id`, `vocab_size`; seqio or any other kind)."""
    sp = getattr(vocab, "sp_model", None)
    if sp is not None:
        return "spm-" + hashlib.sha256(sp).hexdigest()[:16]
    if type(vocab).__name__ == "ByteVocabulary":
        return "byte"
    fp = getattr(vocab, "fingerprint", None)  # other kinds may name themselves
    if fp is not None:
        return str(fp() if callable(fp) else fp)
    probe = hashlib.sha256(repr(list(vocab.encode(_PROBE))).encode()).hexdigest()[:12]
    return f"{type(vocab).__name__}-{vocab.vocab_size}-{probe}"  # two vocabularies of one size differ


def encode_batch(vocab, texts: list[str]) -> list[np.ndarray]:
    """Token ids (no EOS) of each text, exactly as `vocab.encode` gives them; fast paths for byte / SPM."""
    if type(vocab).__name__ == "ByteVocabulary":  # seqio: utf-8 bytes shifted past pad/eos/unk
        shift = int(vocab.vocab_size) - 256
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) + shift for t in texts]
    tok = getattr(vocab, "tokenizer", None)  # seqio.SentencePieceVocabulary: a SentencePieceProcessor
    if tok is not None and hasattr(tok, "EncodeAsIds") and not getattr(vocab, "extra_ids", 0):
        return [np.asarray(ids, np.int32) for ids in tok.encode(texts)]
    return [np.asarray(vocab.encode(t), np.int32) for t in texts]


class StoreWriter:
    """Append documents to a new store at `path`; `close()` writes the index (the completion mark)."""

    def __init__(self, path, vocab, *, chunk_tokens: int | None = None, chunks_per_shard: int | None = None):

        self.path = _local(path)
        if (self.path / INDEX).exists():
            raise DataError(f"{self.path} already holds a finished token store; remove it to rewrite it.")
        self.path.mkdir(parents=True, exist_ok=True)
        for f in self.path.glob("tokens-*"):  # leftovers of a writer that died: never part of this store
            f.unlink()
        self.vocab = vocab
        self.eos = int(vocab.eos_id)
        self.dtype = packing.token_dtype(int(vocab.vocab_size))
        self.chunk = int(chunk_tokens or CHUNK_TOKENS)  # module defaults read now (tests lower them)
        self.per_shard = int(chunks_per_shard or CHUNKS_PER_SHARD)
        self._buf: list[np.ndarray] = []  # the tail shorter than a chunk
        self._shards: list[dict] = []  # finished shards: tmp name, records, tokens, documents
        self._writer = None
        self._in_shard = dict(records=0, tokens=0, documents=0)
        self.n_tokens = self.n_documents = 0
        self.segments: dict[str, list[int]] = {}
        self._seg: tuple[str, int, int] | None = None

    # ---- writing
    def begin_segment(self, name: str) -> None:
        """Start named segment `name` (e.g. 'cluster_3'): the token range of the documents added next."""
        self.end_segment()
        self._seg = (name, self.n_tokens, self.n_documents)

    def end_segment(self) -> None:
        if self._seg is not None:
            name, t0, d0 = self._seg
            self.segments[name] = [t0, self.n_tokens, self.n_documents - d0]
            self._seg = None

    def add(self, texts: Iterable[str]) -> None:
        """Tokenise `texts` (in this order), each followed by EOS, and append them to the stream."""
        batch = []
        for t in texts:
            batch.append(t)
            if len(batch) == ENCODE_BATCH:
                self._add_encoded(encode_batch(self.vocab, batch))
                batch = []
        if batch:
            self._add_encoded(encode_batch(self.vocab, batch))

    def _add_encoded(self, docs: list[np.ndarray]) -> None:

        stream, _ = packing.pack_stream(docs, self.eos, self.dtype)
        self._append(stream, len(docs))

    def add_stream(self, stream: np.ndarray, n_documents: int) -> None:
        """Append a stream tokenised elsewhere: `n_documents` documents, each followed by EOS, exactly as
        `add` would have appended their texts (the Beam preparation tokenises ranges in parallel and
        packs them here in order, voltron_jax/data/ranges.py). Fed in slices of 64 chunks: a long
        stream is never copied whole."""
        stream = np.asarray(stream)
        n_eos = int((stream == self.eos).sum())
        if (
            n_eos < n_documents
            or (n_documents and stream[-1] != self.eos)
            or (not n_documents and len(stream))
        ):
            raise DataError(
                f"a token stream of {len(stream)} ids with {n_eos} EOS does not hold {n_documents} documents "
                f"each ending in EOS {self.eos}; tokenise it again."
            )
        step = 64 * self.chunk
        for i in range(0, len(stream), step):
            self._append(stream[i : i + step].astype(self.dtype, copy=False), 0)
        self.n_documents += n_documents

    def _append(self, stream: np.ndarray, n_documents: int) -> None:
        self.n_documents += n_documents
        self.n_tokens += len(stream)
        data = np.concatenate([*self._buf, stream]) if self._buf else stream
        full = len(data) // self.chunk * self.chunk
        for i in range(0, full, self.chunk):
            self._write(data[i : i + self.chunk])
        self._buf = [data[full:]] if len(data) > full else []

    def _write(self, chunk: np.ndarray) -> None:
        if self._writer is None:
            tmp = self.path / f"tokens-{len(self._shards):05d}.tmp"
            self._writer = (ArrayRecordWriter(os.fspath(tmp), "group_size:1,uncompressed"), tmp)
        self._writer[0].write(chunk.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._in_shard["records"] += 1
        self._in_shard["tokens"] += len(chunk)
        self._in_shard["documents"] += int((chunk == self.eos).sum())  # documents that end in this shard
        if self._in_shard["records"] == self.per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        w, tmp = self._writer
        w.close()
        self._shards.append(dict(tmp=tmp, **self._in_shard))
        self._writer, self._in_shard = None, dict(records=0, tokens=0, documents=0)

    def close(self, extra: dict | None = None) -> dict:
        """Flush, name the shards, write index.json last; returns the index."""
        self.end_segment()
        if self._buf:
            self._write(self._buf[0])
            self._buf = []
        if self._writer is not None:
            self._close_shard()
        n = len(self._shards)
        shards = []
        for i, sh in enumerate(self._shards):
            final = self.path / _shard_name(i, n)
            sh["tmp"].rename(final)
            shards.append(
                dict(
                    file=final.name,
                    records=sh["records"],
                    tokens=sh["tokens"],
                    documents=sh["documents"],
                    bytes=final.stat().length,
                )
            )
        index = dict(
            format=FORMAT,
            dtype=self.dtype.name,
            chunk_tokens=self.chunk,
            chunks_per_shard=self.per_shard,
            tokens=self.n_tokens,
            documents=self.n_documents,
            eos_id=self.eos,
            vocab_size=int(self.vocab.vocab_size),
            vocab=vocab_id(self.vocab),
            segments=self.segments,
            shards=shards,
            **(extra or {}),
        )
        tmp = self.path / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        tmp.rename(self.path / INDEX)
        return index


def write_store(path, vocab, documents: Iterable[str], segments=None, **kw) -> dict:
    """Write `documents` (texts in their final order) as a store; `segments`: [(name, texts)] instead."""
    w = StoreWriter(path, vocab, **kw)
    if segments is None:
        w.add(documents)
    else:
        for name, texts in segments:
            w.begin_segment(name)
            w.add(texts)
    return w.close()


def is_complete(path) -> bool:
    return (epath.Path(path) / INDEX).exists()


def remove(path) -> None:
    """Delete a store (index first, so a crash midway leaves an incomplete store, never a wrong one)."""
    p = epath.Path(path)
    if (p / INDEX).exists():
        (p / INDEX).unlink()
    if p.exists():
        p.rmtree()


class TokenStore:
    """Random access to the token stream of a finished store: `read(start, stop)`; O(1) memory in its size."""

    def __init__(self, path):
        self.path = _local(path)
        index_path = self.path / INDEX
        if not index_path.exists():
            what = (
                "was not finished (its writer stopped before the index)"
                if self.path.exists()
                else "is missing"
            )
            raise DataError(
                f"token store {self.path} {what}; run the data preparation again "
                "(python -m voltron_jax.data.prepare --config=... --workdir=..., or the Beam pipeline)."
            )
        try:
            self.index = json.loads(index_path.read_text())
        except ValueError as e:
            raise DataError(
                f"{index_path} is not valid JSON ({e}); delete {self.path} and prepare again."
            ) from e
        if self.index.get("format") != FORMAT:
            raise DataError(
                f"{index_path} has format {self.index.get('format')}, this code reads {FORMAT}; "
                f"delete {self.path} and prepare again."
            )
        ix = self.index
        self.n_tokens, self.n_documents = int(ix["tokens"]), int(ix["documents"])
        self.chunk, self.per_shard = int(ix["chunk_tokens"]), int(ix["chunks_per_shard"])
        self.dtype = np.dtype(ix["dtype"]).newbyteorder("<")
        self.eos_id, self.vocab = int(ix["eos_id"]), ix["vocab"]
        self.segments = {k: tuple(v) for k, v in ix["segments"].items()}
        self._readers: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):  # picklable (grain workers): readers reopen lazily
        d = dict(self.__dict__)
        d["_readers"], d["_lock"] = collections.OrderedDict(), None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _damaged(self, f: epath.Path, why: str) -> DataError:
        return DataError(
            f"token shard {f} is {why}; the store {self.path} is damaged. Delete {self.path} and run "
            "the data preparation again (it rewrites only the token stores that are incomplete)."
        )

    def _reader(self, i: int):
        r = self._readers.get(i)
        if r is not None:
            self._readers.move_to_end(i)
            return r
        sh = self.index["shards"][i]
        f = self.path / sh["file"]
        if not f.exists():
            raise self._damaged(f, "missing")
        size = f.stat().length
        if size != sh["bytes"]:
            raise self._damaged(f, f"{size} bytes but the index says {sh['bytes']}")

        try:
            r = ArrayRecordReader(os.fspath(f), "readahead_buffer_size:0")
            n = r.num_records()
        except Exception as e:  # noqa: BLE001 -- the C++ reader raises several kinds
            raise self._damaged(f, f"unreadable ({e})") from None
        if n != sh["records"]:
            raise self._damaged(f, f"{n} records but the index says {sh['records']}")
        self._readers[i] = r
        if len(self._readers) > MAX_OPEN:
            self._readers.popitem(last=False)[1].close()
        return r

    def _chunks(self, chunks: list[int]) -> dict[int, np.ndarray]:
        out = {}
        by_shard: dict[int, list[int]] = {}
        for c in chunks:
            by_shard.setdefault(c // self.per_shard, []).append(c)
        with self._lock:
            for s, cs in by_shard.items():
                if s >= len(self.index["shards"]):
                    raise DataError(f"token chunk {cs[0]} is past the end of store {self.path}.")
                r = self._reader(s)
                try:
                    blobs = r.read([c % self.per_shard for c in cs])
                except Exception as e:  # noqa: BLE001
                    raise self._damaged(
                        self.path / self.index["shards"][s]["file"], f"unreadable ({e})"
                    ) from None
                for c, b in zip(cs, blobs, strict=True):
                    out[c] = np.frombuffer(b, self.dtype)
        return out

    def read_many(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int32[len(starts), length]: tokens [s, s + length) for each start s (all within the stream)."""
        starts = np.asarray(starts, np.int64)
        if len(starts) == 0:
            return np.zeros((0, length), np.int32)
        if starts.min() < 0 or starts.max() + length > self.n_tokens:
            raise DataError(f"token range past the end of store {self.path} ({self.n_tokens} tokens).")
        first, last = starts // self.chunk, (starts + length - 1) // self.chunk
        need = sorted({int(c) for a, b in zip(first, last, strict=True) for c in range(a, b + 1)})
        got = self._chunks(need)
        out = np.empty((len(starts), length), np.int32)
        for i, (s, a, b) in enumerate(zip(starts, first, last, strict=True)):
            buf = got[int(a)] if a == b else np.concatenate([got[int(c)] for c in range(a, b + 1)])
            o = int(s - a * self.chunk)
            out[i] = buf[o : o + length]
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream (int32)."""
        return self.read_many(np.asarray([start]), stop - start)[0] if stop > start else np.zeros(0, np.int32)

    def verify(self) -> None:
        """Open every shard (presence, size, record count): a DataError naming the first bad file."""
        for i in range(len(self.index["shards"])):
            self._reader(i)

    def close(self) -> None:
        with self._lock:
            while self._readers:
                self._readers.popitem()[1].close()


def build_store(path, vocab, fill, **kw) -> dict:
    """Write the store at `path` by `fill(writer)`: into a temporary sibling folder, renamed into place
    once its index is written, so `path` is either absent or complete. Returns the index.

    A bucket `path` (gs://...: the Beam preparation on Dataflow) is written on local disk first, then
    copied shard by shard with the index last (the train hosts read it through a gcsfuse mount)."""
    if "://" in os.fspath(path):
        dst = epath.Path(path)
        with tempfile.TemporaryDirectory() as tmp:
            local = epath.Path(tmp) / "store"
            index = build_store(local, vocab, fill, **kw)
            remove(dst)
            dst.mkdir(parents=True, exist_ok=True)
            for sh in index["shards"]:
                (local / sh["file"]).copy(dst / sh["file"])
            (local / INDEX).copy(dst / INDEX)  # last: the store is complete once this exists
        return index
    p = _local(path)
    tmp = p.parent / f"{p.name}.partial-{os.getpid()}"
    if tmp.exists():
        tmp.rmtree()
    w = StoreWriter(tmp, vocab, **kw)
    fill(w)
    index = w.close()
    if p.exists() and not is_complete(p):
        p.rmtree()  # a store whose writer died (or was damaged by hand): never taken as complete
    try:
        tmp.rename(p)
    except OSError:
        if not is_complete(p):
            raise
        tmp.rmtree()  # another process wrote the same store first
    return index
