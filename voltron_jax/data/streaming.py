"""Streamed rows of a seqio task too big to hold in memory (TFDS), with an exact, index-based state.

Documents are read in order (seqio, no shuffling, this host's shard of the files), tokenised with EOS,
concatenated and cut into rows exactly as packing.py does for in-memory tasks. Rows are grouped into
blocks of `block_rows` consecutive rows; each block is shuffled by a permutation drawn from
(seed parts, epoch, block start). The state is (epoch, doc, token, in_block): the block's first token
is token `token` of document `doc`, and `in_block` rows of it were taken. Resume reopens the dataset,
skips `doc` documents (tf.data still reads and tokenises them) and rebuilds the block.
"""

from __future__ import annotations

import numpy as np

from voltron_jax.data import packing
from voltron_jax.data.corpus import DataError

STREAM_BLOCK_ROWS = 1024


def _carry_from(pieces: list[tuple[int, int, np.ndarray]], cut: int) -> list[tuple[int, int, np.ndarray]]:
    """(doc index, start offset, tokens) pieces of a buffer -> the pieces from buffer index `cut` on."""
    carry = []
    for doc, o, a in pieces:
        size = len(a) - o
        if carry:
            carry.append((doc, o, a))
        elif cut < size:
            carry.append((doc, o + cut, a))
        else:
            cut -= size
    return carry


class StreamRows:
    """Rows of a streamed seqio task (TFDS): blocks of consecutive rows, shuffled within each block.
    `shard`: (this process's index, process count) when the files are split across hosts, else None."""

    streaming = True

    def __init__(
        self,
        task: str,
        split: str,
        seq_len: int,
        seed_parts: tuple,
        shuffle: bool,
        shard: tuple[int, int] | None,
        block_rows: int = 1024,
    ):
        self.name, self.split, self.seq_len, self.shard = task, split, seq_len, shard
        self.seed_parts, self.shuffle, self.block_rows = seed_parts, shuffle, block_rows
        self.state = dict(epoch=0, doc=0, token=0, in_block=0)
        self._block, self._block_at, self._carry, self._reader, self._next = None, None, [], None, None

    def _open(self, doc: int):
        import seqio  # lazy: seqio/TensorFlow, only for streamed tasks

        ds = (
            seqio.get_mixture_or_task(self.name)
            .get_dataset(
                sequence_length=None,
                split=self.split,
                shuffle=False,
                shard_info=seqio.ShardInfo(*self.shard) if self.shard else None,
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
                f"split {self.split!r} of task {self.name!r} has fewer than seq_len+1 tokens "
                f"(this host's shard); lower data.seq_len or check the data_dir."
            )
        if n == self.block_rows:  # the next block starts at buffer index n*T
            self._carry = _carry_from(pieces, n * self.seq_len)
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
