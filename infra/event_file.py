"""TensorBoard event files of scalars, encoded here: TFRecord framing around `Event` protos.

We write scalars only, so the format is small enough to write without a library: each record
is its length, a masked CRC-32C of the length, the serialized `tensorflow.Event` and a masked
CRC-32C of it; a scalar is `Event{wall_time, step, summary{value{tag, simple_value}}}`.
tensorboardX, which wrote these before, imports torch and Google Cloud Storage on import
(whole seconds of every start where they are installed) and queues events for a thread that
dies on a full disk. TensorBoard's own loader reads these files (tests/helpers.py).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (strings and messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, *, step: int | None = None, file_version: str | None = None,
           summary: bytes | None = None) -> bytes:
    out = b"\x09" + struct.pack("<d", wall_time)  # 1: wall_time (double)
    if step is not None:
        out += b"\x10" + _varint(step & 0xFFFFFFFFFFFFFFFF)  # 2: step (int64)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if summary is not None:
        out += _field(5, summary)
    return out


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
    """The serialized `Event` of one scalar: Summary.Value{tag (1), simple_value (2, float)}."""
    value_proto = _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value)
    return _event(wall_time, step=step, summary=_field(1, value_proto))


def record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + _masked(length) + data + _masked(data)


class EventFileWriter:
    """Writes scalar events to a new file `events.out.tfevents.<time>.<host>.<pid>[.<n>]` in
    `directory`, synchronously (a failed write raises OSError to the caller)."""

    def __init__(self, directory: str | Path):
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        for i in itertools.count():  # a new file, never another writer's
            self.path = Path(directory) / (f"{name}.{i}" if i else name)
            try:
                self._file = open(self.path, "xb")  # noqa: SIM115 - closed by close()
                break
            except FileExistsError:
                continue
        self._file.write(record(_event(time.time(), file_version="brain.Event:2")))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._file.write(record(scalar_event(tag, float(value), step, time.time())))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
