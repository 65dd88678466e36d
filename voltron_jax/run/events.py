"""TensorBoard event files written and read without TensorFlow.

An event file is a TFRecord file of `Event` protos: each record is the data's length (uint64, little
endian), the masked CRC-32C of those 8 bytes, the data, and the masked CRC-32C of the data. The protos
come from the `tensorboard` package (plain protobuf; importing them does not import TensorFlow). A
process that writes scalars through TensorFlow's summary writer pays TensorFlow's import (10-25 s on a
2-core host) for a few records per step; this module writes the same files in microseconds.

Scalars are written as `simple_value` summaries, which TensorBoard, its EventAccumulator and
`inference.api.read_curves` all read as scalars.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2

FILE_PREFIX = "events.out.tfevents"


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotated right by 15 bits plus a constant (so CRCs of CRCs stay distinct)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def encode_record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def read_records(path) -> tuple[list[bytes], bool]:
    """(records, intact) of a TFRecord file; reading stops at the first torn or corrupt record (a write
    killed midway), and `intact` says whether the whole file was read."""
    blob = epath.Path(path).read_bytes()
    out, at = [], 0
    while at < len(blob):
        if at + 12 > len(blob):
            return out, False
        header = blob[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", blob[at + 8 : at + 12])
        end = at + 12 + length + 4
        if header_crc != masked_crc32c(header) or end > len(blob):
            return out, False
        data = blob[at + 12 : at + 12 + length]
        if struct.unpack("<I", blob[end - 4 : end])[0] != masked_crc32c(data):
            return out, False
        out.append(data)
        at = end
    return out, True


def read_events(path) -> tuple[list[event_pb2.Event], bool]:
    """(events, intact) of an event file (see `read_records`)."""
    records, intact = read_records(path)
    return [event_pb2.Event.FromString(r) for r in records], intact


def write_records(path, records: list[bytes]) -> None:
    """Replace the file at `path` by `records`, atomically (a new file renamed over it)."""
    path = epath.Path(path)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(b"".join(encode_record(r) for r in records))
    tmp.replace(path)


def event_files(logdir) -> list[epath.Path]:
    logdir = epath.Path(logdir)
    if not logdir.is_dir():
        return []
    return sorted(
        p for p in logdir.iterdir() if p.name.startswith(FILE_PREFIX) and not p.name.endswith(".tmp")
    )


class EventWriter:
    """Scalars to a new event file in `logdir` (the interface of flax.metrics.tensorboard.SummaryWriter
    that the train loop uses: scalar, flush, close)."""

    _count = 0

    def __init__(self, logdir):
        logdir = epath.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        EventWriter._count += 1
        stamp = f"{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{EventWriter._count}"
        self.path = logdir / f"{FILE_PREFIX}.{stamp}.v2"
        self._file = self.path.open("wb")
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: event_pb2.Event) -> None:
        self._file.write(encode_record(event.SerializeToString()))

    def scalar(self, tag: str, value: float, step: int) -> None:
        value = summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
        self._write(
            event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=[value]))
        )

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
