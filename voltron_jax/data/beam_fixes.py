"""A fix for an Apache Beam bug that silently lost documents in the DirectRunner's multi-worker modes.

The bug (apache-beam 2.77, Python, `apache_beam/runners/worker/data_plane.py`): the Python runner
(FnApiRunner, which the DirectRunner runs) sends each bundle's input to a gRPC SDK worker through a
`TimeBasedBufferingClosableOutputStream` (worker_handlers.py: `BeamFnDataServicer(DATA_BUFFER_TIME_LIMIT_MS
= 1000)`, fixed, not an option). A background thread flushes that stream every second:
`flush_callback(self.get())` then `self._clear()`, under `_flush_lock`; `write()` takes no lock. When
writing one bundle's input takes longer than a second (hundreds of MB, a loaded host), the runner's
thread writes chunks while the flusher is inside `flush_callback` (building the gRPC message, waiting on
the full send queue), and `_clear()` then drops them: the worker never receives them, no error anywhere.
The gRPC workers are the ones `--direct_running_mode=multi_processing` and `multi_threading` use; the
default `in_memory` mode hands data over in memory (no such stream). Measured: docs/results.md, "Beam
DirectRunner document loss: root cause"; repro: benchmarks/beam_element_loss.py (the stream alone, in
seconds: `--stream_only`; the whole graph shape, in minutes).

`install()` makes `write()` take the same `_flush_lock` as the flush, so a chunk is either in the
flushed message or stays in the buffer for the next one; it changes nothing else (the SDK workers' own
output streams flush by size in the writing thread, without this thread). Called by
beam_pipeline.run/tokenize in the runner process before a pipeline starts; idempotent. Remove it once a
Beam release locks the write itself.
"""

from __future__ import annotations


def install() -> None:
    """Serialise the runner's time-flushed data-plane streams' writes with their periodic flush."""
    from apache_beam.runners.worker import data_plane  # lazy: the optional extra [data] (Apache Beam)

    cls = data_plane.TimeBasedBufferingClosableOutputStream
    if getattr(cls, "_voltron_write_locked", False):
        return
    unlocked_write = cls.write

    def write(self, b, nested=False):
        with self._flush_lock:  # the periodic flush holds it from get() to _clear()
            unlocked_write(self, b, nested)

    cls.write = write
    cls._voltron_write_locked = True
