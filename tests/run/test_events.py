"""TensorBoard event files written without TensorFlow are valid TFRecord files of Event protos: TensorFlow's
own reader (the independent check, imported only here) and TensorBoard's reader see every scalar, and a
torn last record is found and dropped."""

import pytest

from tests.reliability.common import event_steps
from voltron_jax.run import events, metrics


def test_crc32c_is_castagnolis():
    assert events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert events.crc32c(b"") == 0


def test_tensorflow_reads_every_scalar_written(tmp_path):
    import tensorflow as tf

    w = events.EventWriter(tmp_path)
    for step in range(1, 6):
        w.scalar("train/loss", 1.0 / step, step)
    w.scalar("eval/loss", 0.25, 5)
    w.close()
    assert event_steps(tmp_path) == [*(("train/loss", s) for s in range(1, 6)), ("eval/loss", 5)]
    (path,) = events.event_files(tmp_path)
    values = [
        v.simple_value
        for raw in tf.data.TFRecordDataset(str(path))
        for v in tf.compat.v1.Event.FromString(raw.numpy()).summary.value
    ]
    assert values == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2, 0.25])


def test_tensorboards_reader_gives_the_curves(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    w = events.EventWriter(tmp_path)
    for step in (2, 4, 6):
        w.scalar("train/loss", float(step), step)
    w.close()
    acc = ea.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(2, 2.0), (4, 4.0), (6, 6.0)]


def test_a_torn_last_record_is_found_and_dropped_on_resume(tmp_path):
    w = events.EventWriter(tmp_path)
    for step in range(1, 5):
        w.scalar("train/loss", float(step), step)
    w.close()
    (path,) = events.event_files(tmp_path)
    records, intact = events.read_records(path)
    assert intact and len(records) == 5  # the file-version event and four scalars
    path.write_bytes(path.read_bytes()[:-3])  # kill -9 mid-write
    records, intact = events.read_records(path)
    assert not intact and len(records) == 4
    assert metrics.truncate_events(tmp_path, resume=2, end=10) == 2  # step 3 and the torn step 4
    assert event_steps(tmp_path) == [("train/loss", 1), ("train/loss", 2)]
    assert events.read_records(path)[1]
