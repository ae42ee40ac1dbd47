"""TensorBoard event files beside ``metrics.jsonl``, written by tensorboardX (no TensorFlow needed).

``OUT/tensorboard/`` holds one event file per process that trained the run; ``tensorboard --logdir OUT``
shows it (a many-seed run: ``--logdir OUT``, each ``seed_S`` a run of its own). Each epoch's record
becomes scalars at its global step: ``loss/train``, ``accuracy/val``, ``lr``, ``throughput/images_per_s``, ...
A resumed run opens its file with TensorBoard's ``purge_step`` (the step it resumes from + 1), so the
steps an interrupted process wrote after its last checkpoint are dropped, as ``metrics.jsonl`` drops them.
"""
from __future__ import annotations

import os

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
        from tensorboardX import SummaryWriter
        self._writer = SummaryWriter(logdir=os.path.join(out, FOLDER), flush_secs=10,
                                     purge_step=None if resumed_from is None else resumed_from + 1,
                                     filename_suffix=f".{os.getpid()}")

    def write(self, record: dict) -> None:
        """Every numeric field of one epoch's record at its global step; on disk when this returns."""
        for field, value in record.items():
            if field not in _NOT_SCALARS and isinstance(value, (int, float)):
                self._writer.add_scalar(tag(field), value, global_step=record["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
