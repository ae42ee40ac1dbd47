"""TensorBoard event files beside ``metrics.jsonl``, written here (no TensorFlow, tensorboardX or PyTorch needed).

``OUT/tensorboard/`` holds one event file per process that trained the run; ``tensorboard --logdir OUT``
shows it (a many-seed run: ``--logdir OUT``, each ``seed_S`` a run of its own). Each epoch's record
becomes scalars at its global step: ``loss/train``, ``accuracy/val``, ``lr``, ``throughput/images_per_s``, ...
A resumed run starts its file with a ``SessionLog.START`` at the step it resumes from + 1 (TensorBoard's
purge step), so the steps an interrupted process wrote after its last checkpoint are dropped, as
``metrics.jsonl`` drops them.

The file is TensorFlow's record format (each record: its length, the length's masked CRC-32C, a serialised
``Event`` protocol buffer, its masked CRC-32C), the few ``Event`` fields it needs encoded by hand. jaxconv
wrote it with tensorboardX until 2026-12-05; tensorboardX imports PyTorch where it is installed, which cost
every ``jaxconv train`` 1.7 s before its first step on this CPU.
"""
from __future__ import annotations

import os
import socket
import struct
import time

FOLDER = "tensorboard"
_NOT_SCALARS = ("epoch", "step", "devices", "device_kind", "processes")


def tag(field: str) -> str:
    """The TensorBoard tag of a metrics field: ``train_loss`` -> ``loss/train``, ``images_per_s`` ->
    ``throughput/images_per_s``, ``wall_s`` -> ``time/wall_s``, ``lr`` -> ``lr``."""
    for metric in ("loss", "accuracy"):
        if field.endswith("_" + metric):
            return f"{metric}/{field[: -len(metric) - 1]}"
    if field.startswith("images_per_s"):
        return f"throughput/{field}"
    if field == "wall_s":
        return "time/wall_s"
    return field


class EventLog:
    """One process's TensorBoard event file in ``OUT/tensorboard``."""

    def __init__(self, out: str, *, resumed_from: int | None = None):
        folder = os.path.join(out, FOLDER)
        os.makedirs(folder, exist_ok=True)
        name = os.path.join(folder, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}")
        for n in range(1000):  # a new file, never one that exists (a second run in this process, this second)
            try:
                self._file = open(name + (f".{n}" if n else ""), "xb")
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"1,000 event files named {name}* exist already")
        self._append(event(0, file_version="brain.Event:2"))
        if resumed_from is not None:  # TensorBoard hides what earlier files hold at this step and after
            self._append(event(resumed_from + 1, session_start=True))
        self._file.flush()

    def write(self, record: dict) -> None:
        """Every numeric field of one epoch's record at its global step; on disk when this returns."""
        values = {tag(f): v for f, v in record.items() if f not in _NOT_SCALARS and isinstance(v, (int, float))}
        self._append(event(record["step"], scalars=values))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def _append(self, data: bytes) -> None:
        self._file.write(tf_record(data))


# ------------------------------------------------------------------------------ the format


def event(step: int, *, file_version: str | None = None, session_start: bool = False,
          scalars: dict[str, float] | None = None) -> bytes:
    """A serialised ``tensorflow.Event``: wall_time (1), step (2) and one of file_version (3), summary (5: its
    values, each a tag (1) and a float simple_value (2)) or session_log (7: status (1) START = 1)."""
    body = _key(1, 1) + struct.pack("<d", time.time())
    body += _key(2, 0) + _varint(step)
    if file_version is not None:
        body += _bytes_field(3, file_version.encode())
    if scalars is not None:
        summary = b"".join(_bytes_field(1, _bytes_field(1, name.encode()) + _key(2, 5) + struct.pack("<f", value))
                           for name, value in scalars.items())
        body += _bytes_field(5, summary)
    if session_start:
        body += _bytes_field(7, _key(1, 0) + _varint(1))
    return body


def tf_record(data: bytes) -> bytes:
    """One record of a TFRecord file: length (uint64), its masked CRC-32C, the data, the data's masked CRC-32C."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (Castagnoli) of ``data``, rotated right by 15 bits plus 0xa282ead8."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def crc32c(data: bytes) -> int:
    """CRC-32C (polynomial 0x82F63B78, reflected), e.g. ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def _varint(n: int) -> bytes:
    """Protocol buffers' base-128 varint of a non-negative integer."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data
