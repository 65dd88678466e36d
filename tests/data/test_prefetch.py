"""The prefetch queue (voltron_jax/data/prefetch.py): order, the iterator state paired with each batch
(the state a checkpoint saves is that of the batches consumed, however far the thread ran ahead),
producer errors raised in the consumer, and no thread left behind."""

import threading
import time

import pytest

from voltron_jax.data.prefetch import Prefetcher


class Counter:
    """A resumable source: batch i is {'i': i}; state {'next': i, 'log': [...]} (nested, mutated)."""

    def __init__(self, n=None, fail_at=None, delay=0.0):
        self.i, self.n, self.fail_at, self.delay, self.log = 0, n, fail_at, delay, []

    def __next__(self):
        if self.n is not None and self.i >= self.n:
            raise StopIteration
        if self.i == self.fail_at:
            raise KeyError(f"bad record {self.i}")
        time.sleep(self.delay)
        self.i += 1
        self.log.append(self.i)
        return {"i": self.i - 1}

    def get_state(self):
        return {"next": self.i, "log": self.log}  # nested list the source keeps mutating

    def set_state(self, state):
        self.i, self.log = state["next"], list(state["log"])


def _threads():
    return [t for t in threading.enumerate() if t.name == "voltron-prefetch"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_order_and_state_of_the_consumed_batches(depth):
    src = Counter()
    with Prefetcher(src, lambda b: b["i"] * 10, depth) as feed:
        assert feed.state == {"next": 0, "log": []}  # before any batch
        for k in range(6):
            assert next(feed) == 10 * k
            time.sleep(0.02)  # let the thread run ahead
            assert feed.state == {"next": k + 1, "log": list(range(1, k + 2))}
        if depth:
            assert src.i > 6  # it did run ahead, yet the state is the consumed one
    assert not _threads()
    resumed = Counter()  # a resume from the saved state yields the next unconsumed batch
    resumed.set_state(feed.state)
    assert next(resumed) == {"i": 6}


@pytest.mark.parametrize("depth", [0, 2])
def test_producer_error_is_raised_in_the_consumer_at_its_batch(depth):
    with Prefetcher(Counter(fail_at=3), depth=depth) as feed:
        assert [next(feed)["i"] for _ in range(3)] == [0, 1, 2]
        with pytest.raises(KeyError, match="bad record 3"):
            next(feed)
        assert feed.state["next"] == 3
        with pytest.raises(StopIteration):
            next(feed)
    assert not _threads()


def test_exhausted_source_stops_iteration():
    with Prefetcher(Counter(n=4), depth=2) as feed:
        assert [b["i"] for b in feed] == [0, 1, 2, 3]
    assert not _threads()


def test_exception_in_the_loop_stops_the_thread_blocked_on_a_full_queue():
    with pytest.raises(RuntimeError, match="step failed"):
        with Prefetcher(Counter(delay=0.001), depth=2) as feed:
            next(feed)
            time.sleep(0.1)  # the queue is full, the producer waits in put
            raise RuntimeError("step failed")
    assert not _threads()
    feed.close()  # idempotent


def test_no_thread_until_the_first_batch_and_bad_depth():
    feed = Prefetcher(Counter(), depth=2)
    assert not _threads()
    feed.close()
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(Counter(), depth=-1)
