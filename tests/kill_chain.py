"""Kill a real ``jaxconv train`` process at random moments, resume it each time, and compare the end
with a run never interrupted. Used by ``tests/test_interruptions.py`` and ``experiments/kill_resume.py``."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from jaxconv.train import TIMING_FIELDS as TIMING  # the only fields a resumed run may change


def train(args, *, wait=True, timeout=300):
    cmd = [sys.executable, "-m", "jaxconv", "train", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    return proc


def kill_chain(out: str, args: list[str], *, kills: int, window: tuple[float, float], seed: int = 0,
               signals=(signal.SIGKILL,), timeout: float = 300):
    """Start ``jaxconv train ARGS --out OUT``; after a random delay in ``window`` seconds send a signal
    (drawn from ``signals``); resume; repeat ``kills`` times; then let the run finish.

    Returns one dict per attempt: the delay, the signal, the exit status, the last stderr line, the
    checkpoint step after it, and what the kill left behind (a partial Orbax checkpoint, a temp file)."""
    rng = np.random.default_rng(seed)
    attempts = []
    for k in range(kills + 1):
        resume = ["--resume"] if os.path.exists(os.path.join(out, "config.json")) else []
        proc = train([*args, "--out", out, *resume], wait=False)
        delay = float(rng.uniform(*window)) if k < kills else None
        sig = signals[int(rng.integers(len(signals)))] if k < kills else None
        try:
            stdout, stderr = proc.communicate(timeout=delay if delay is not None else timeout)
            killed = False
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            stdout, stderr = proc.communicate(timeout=60)
            killed = True
        partial = glob.glob(os.path.join(out, "checkpoints", "*tmp*")) + glob.glob(os.path.join(out, "best", "*tmp*"))
        attempts.append(dict(
            delay=delay, signal=signal.Signals(sig).name if killed else None, returncode=proc.returncode,
            stderr_tail=(stderr.strip().splitlines() or [""])[-1], stdout=stdout, stderr=stderr,
            step=latest_step(out), partial_checkpoint=bool(partial),
            temp_files=[os.path.basename(p) for p in glob.glob(os.path.join(out, "*.tmp"))]))
        if not killed:
            break
    return attempts


def latest_step(out: str):
    steps = [int(name) for name in os.listdir(os.path.join(out, "checkpoints"))
             if name.isdigit()] if os.path.isdir(os.path.join(out, "checkpoints")) else []
    return max(steps, default=None)


def outcome(out: str):
    """Everything a finished run leaves that must not depend on interruptions: metrics without timings,
    results, the confusion matrix, and every array of its latest and best checkpoints."""
    from jaxconv import checkpoints as ckpt
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "confusion_matrix.csv")) as f:
        matrix = f.read()
    arrays = {}
    for folder in ("checkpoints", "best"):
        if os.path.isdir(os.path.join(out, folder)):
            named, step = ckpt.read(ckpt.reader(os.path.join(out, folder)))
            arrays.update({f"{folder}@{step}/{name}": value for name, value in named.items()})
    return metrics, results, matrix, arrays


def differences(a, b, rtol: float = 0.0) -> list[str]:
    """What differs between two :func:`outcome` s (empty when the runs are identical). With ``rtol``, floats
    and arrays may differ by that share of the larger value (of each array's largest value)."""
    def near(x, y):
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(near(x[k], y[k]) for k in x)
        if isinstance(x, list):
            return isinstance(y, list) and len(x) == len(y) and all(map(near, x, y))
        if isinstance(x, float) and isinstance(y, float):
            return x == y or abs(x - y) <= rtol * max(abs(x), abs(y))
        return x == y

    def same(x, y):
        return x.shape == y.shape and (np.array_equal(x, y) or bool(
            rtol and np.allclose(x, y, rtol=0, atol=rtol * np.max(np.abs(x), initial=0))))

    diffs = [name for name, x, y in zip(("metrics", "results", "confusion matrix"), a[:3], b[:3]) if not near(x, y)]
    if set(a[3]) != set(b[3]):
        return diffs + [f"checkpoint names: {sorted(set(a[3]) ^ set(b[3]))[:4]}"]
    return diffs + [name for name in a[3] if not same(a[3][name], b[3][name])]


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0
