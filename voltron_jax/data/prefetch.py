"""Input prefetch: the next global batches are built on the host and put on the devices by a background
thread while the current step runs (the loop's `train.prefetch`; tf.data's and flax's `prefetch_to_device`
do the same).

    with Prefetcher(data_iterator, to_device, depth=2) as feed:
        batch = next(feed)          # to_device(next(data_iterator)), made ahead
        checkpoint(..., feed.state) # the iterator state after the batches CONSUMED so far

The thread runs ahead of the loop, so the iterator's own `get_state()` is that of batches not trained on
yet; a checkpoint must hold the state after the last batch the loop took. Each queued batch therefore
carries the iterator state recorded right after it was drawn, and `state` is that of the last batch
handed out (or the state before any batch). At most `depth` batches wait in the queue (one more may be
in the producer's hands). The thread starts with the first `next`. `depth=0` runs synchronously in the
caller, with the same interface.

Errors in the producer (the data pipeline, the transfer) are raised again in the consumer at the batch
where they happened; `close()` (or leaving the `with` block, also on an exception) stops and joins the
thread, so no thread outlives the loop.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable
from typing import Any

_POLL_S = 0.1  # how often a blocked producer or consumer looks at the stop flag / thread liveness


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()  # the source is exhausted


class Prefetcher:
    """Iterator of `transform(next(source))`, produced `depth` ahead by a daemon thread; `state` is
    `source.get_state()` as it was right after the last batch returned by `__next__`."""

    def __init__(self, source, transform: Callable[[Any], Any] | None = None, depth: int = 2):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}.")
        self._source, self._transform, self.depth = source, transform or (lambda b: b), depth
        self.state = self._snapshot()  # before any batch: what a checkpoint at the start must hold
        self._stop = threading.Event()
        self._done = False
        self._thread = None  # started by the first __next__: a loop that takes no batch starts none
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))

    def _snapshot(self) -> dict:
        return copy.deepcopy(self._source.get_state())  # the source may mutate nested state later

    def _draw(self):
        batch = next(self._source)
        return self._transform(batch), self._snapshot()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = self._draw()
                except StopIteration:
                    item = _END
                self._put(item)
                if item is _END:
                    return
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, raised there
            self._put(_Raised(e))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self.depth and self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="voltron-prefetch", daemon=True)
            self._thread.start()
        if self._thread is None:
            try:
                batch, self.state = self._draw()
            except BaseException:
                self._done = True  # as the thread: nothing after the end or an error
                raise
            return batch
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("the prefetch thread stopped without a batch or an error") from None
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.error
        batch, self.state = item
        return batch

    def close(self) -> None:
        """Stop the producer and wait for it (it finishes the batch in hand first); idempotent."""
        self._done = True
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:  # unblock a producer waiting on a full queue
                    while True:
                        self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=_POLL_S)
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
