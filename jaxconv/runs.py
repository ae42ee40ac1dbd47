"""A run's folder: what it holds, who may replace it, and files written so that a kill never tears them.

``OUT/`` holds ``config.json`` (the resolved :class:`~jaxconv.config.TrainConfig`), ``metrics.jsonl``
(one record per finished epoch, all of one shape), ``checkpoints/`` and ``best/`` (see
:mod:`jaxconv.checkpoints`), and at the end ``results.json`` (the test set's numbers),
``confusion_matrix.csv`` and ``curves.png``. A run of many seeds (``--seeds K``) keeps one such folder per seed,
``OUT/seed_S/``, and in ``OUT/`` its own ``config.json``, ``seeds.jsonl`` (per epoch, every metric's mean
and standard deviation over the seeds), ``results.json`` and ``curves.png`` (mean and band). Every file is written to a temporary name and renamed
into place, so a process killed at any moment leaves either the old file or the new one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from jaxconv.config import TrainConfig, from_dict

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "best", "results.json", "confusion_matrix.csv",
             "curves.png", "seeds.jsonl", "tensorboard")


def write_atomically(path: str, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, flushed to disk, and a rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_out(out: str) -> None:
    """A one-line ``ValueError`` when ``out`` cannot become a run folder; nothing is written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {parent} is not writable")


def held_files(out: str) -> list[str]:
    """The run files in ``out``, and the seed folders (``seed_S/``) of a many-seed run."""
    held = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if os.path.isdir(out):
        held += sorted(name for name in os.listdir(out) if name.startswith("seed_")
                       and os.path.exists(os.path.join(out, name, "config.json")))
    return held


def claim(out: str, *, resume: bool, overwrite: bool) -> list[str]:
    """Check that a run may be written into ``out``; returns the files of the run it holds (for --overwrite)."""
    check_out(out)
    existing = held_files(out)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if resume and "config.json" not in existing:
        raise ValueError(f"--resume: {out} holds no run to resume (no config.json)")
    if existing and not resume and not overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                         f"or --overwrite to replace it")
    return existing


def remove(out: str, names: list[str]) -> None:
    for name in names:
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def load_config(out: str) -> TrainConfig:
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{out} holds no run (no config.json)")
    try:
        with open(path) as f:
            stored = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err})") from err
    return from_dict(stored, path)


def save_config(out: str, config: TrainConfig) -> None:
    write_atomically(os.path.join(out, "config.json"), json.dumps(dataclasses.asdict(config), indent=1) + "\n")


def read_metrics(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        try:
            return [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON lines ({err})") from err


def write_metrics(out: str, history: list[dict]) -> None:
    write_atomically(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))


def write_json(out: str, name: str, value) -> None:
    write_atomically(os.path.join(out, name), json.dumps(value, indent=1) + "\n")


def write_confusion_csv(out: str, matrix, class_names) -> None:
    """Rows: true class; columns: predicted class; both headed by the class names."""
    quoted = [f'"{name}"' if "," in name else name for name in class_names]
    lines = ["true\\predicted," + ",".join(quoted)]
    lines += [f"{quoted[i]}," + ",".join(str(int(v)) for v in row) for i, row in enumerate(matrix)]
    write_atomically(os.path.join(out, "confusion_matrix.csv"), "\n".join(lines) + "\n")


def write_seed_summary(out: str, histories: list[list[dict]], seeds: list[int]) -> None:
    """``seeds.jsonl``: per epoch, each seed's value of every metric and their mean and (population) std."""
    lines = []
    for records in zip(*histories):
        row = dict(epoch=records[0]["epoch"], step=records[0]["step"], seeds=list(seeds))
        for key, value in records[0].items():
            if key.endswith(("_loss", "_accuracy")):
                values = [r[key] for r in records]
                row[key] = values
                row[f"{key}_mean"], row[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
        lines.append(json.dumps(row) + "\n")
    write_atomically(os.path.join(out, "seeds.jsonl"), "".join(lines))


def read_seed_summary(out: str) -> list[dict]:
    with open(os.path.join(out, "seeds.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_seed_results(out: str, seeds: list[int], results: list[dict]) -> None:
    accuracies = [r["latest"]["test_accuracy"] for r in results]
    summary = dict(seeds=list(seeds), test_accuracy=accuracies, test_accuracy_mean=float(np.mean(accuracies)),
                   test_accuracy_std=float(np.std(accuracies)), runs=[f"seed_{s}" for s in seeds])
    if all("best" in r for r in results):
        best = [r["best"]["test_accuracy"] for r in results]
        summary.update(best_test_accuracy=best, best_test_accuracy_mean=float(np.mean(best)),
                       best_test_accuracy_std=float(np.std(best)))
    write_json(out, "results.json", summary)
