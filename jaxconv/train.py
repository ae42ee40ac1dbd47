"""Training runs: ``fit(config)`` trains a registered model and keeps everything it did in ``config.out``.

A run never loses work:

* a folder that holds a run is only continued (``resume``) or, on request, replaced (``overwrite``),
  and only once the new run's config, data and model are built;
* a checkpoint is written at every epoch's end, every ``checkpoint_every`` steps, and when SIGINT or
  SIGTERM arrives (the step in flight finishes first; :class:`Stopped` is raised after the write);
* ``resume`` continues from the latest checkpoint, mid-epoch included, and ends with the same
  metrics and parameters as a run never interrupted: the data order and augmentation are functions
  of the seed, the epoch and the step, and the epoch's running sums travel in the state.

The compiled steps live in :mod:`jaxconv.steps`, the folder's files in :mod:`jaxconv.runs`, the
configuration in :mod:`jaxconv.config`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxconv import checkpoints as ckpt
from jaxconv import runs
from jaxconv.config import MODEL_RECIPES, RECIPES, TrainConfig, check_resume, describe, resolve  # noqa: F401
from jaxconv.data import DATASETS, Dataset, load_dataset, split_validation
from jaxconv.steps import (DTYPES, TrainState, confusion_matrix, evaluate, init_state,  # noqa: F401
                           make_optimizer, make_schedule, make_steps)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message names the batch size."""


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run after a checkpoint was written; ``signal`` is its number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signal = signum


class _StopSignals:
    """While active (main thread only), SIGINT and SIGTERM are noted instead of acted on; a second one
    of either acts at once (Ctrl-C twice still interrupts)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.caught, self.saved = None, {}

    def _note(self, signum, frame):
        if self.caught is not None:
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
        self.caught = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)
        self.saved = {}


@contextlib.contextmanager
def _explain_out_of_memory(what: str, flag: str, batch: int):
    try:
        yield
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
            raise
        raise OutOfMemory(f"the device ran out of memory in a {what} step of batch size {batch}; "
                          f"try {flag} {max(batch // 2, 1)}") from err


class _Progress:
    """A one-line progress bar on a terminal; silent otherwise (plain epoch lines are printed anyway)."""

    def __init__(self, stream):
        self.stream, self.live, self.last = stream, stream.isatty(), 0.0

    def update(self, epoch, epochs, step, steps):
        now = time.perf_counter()
        if self.live and (now - self.last > 0.2 or step == steps):
            filled = int(30 * step / steps)
            self.stream.write(f"\repoch {epoch}/{epochs} [{'#' * filled}{'.' * (30 - filled)}] {step}/{steps}")
            self.stream.flush()
            self.last = now

    def clear(self):
        if self.live:
            self.stream.write("\r" + " " * 70 + "\r")


def _check_finite(losses, first_step: int, epoch: int, latest, out: str):
    values = np.asarray(jnp.stack(losses)) if losses else np.zeros(0)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        last = latest.latest_step()
        raise TrainingDiverged(
            f"loss became {values[bad[0]]} at step {first_step + int(bad[0])} (epoch {epoch + 1}); training stopped. "
            + (f"The last good checkpoint is step {last} in {os.path.join(out, 'checkpoints')}."
               if last is not None else "No checkpoint was written yet."))


def fit(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, dataset: Dataset | None = None,
        log=print):
    """Train ``config`` (see :class:`TrainConfig`); returns the list of per-epoch metric dicts.

    ``resume`` continues the run in ``config.out`` (every setting but those in
    :data:`jaxconv.config.RESUMABLE` must match its ``config.json``); ``overwrite`` replaces it.
    """
    config = resolve(config)
    with _StopSignals() as signals:  # from here on, SIGINT/SIGTERM are answered between steps
        return _fit(config, resume, overwrite, dataset, log, signals)


def _fit(config, resume, overwrite, dataset, log, signals):
    out = config.out
    existing = runs.claim(out, resume=resume, overwrite=overwrite)
    if resume:
        check_resume(resolve(runs.load_config(out)), config)
    data = dataset or load_dataset(config.dataset, data_dir=config.data_dir, source=config.source)
    info = DATASETS[config.dataset]
    train, val = data.train, None
    if config.val_split:
        train, val = split_validation(data.train, config.val_split, config.seed)
    n_train = len(train)
    batch = min(config.batch_size, n_train)
    steps = n_train // batch  # the last partial batch is dropped: one compiled shape
    state, graphdef_train, graphdef_eval, tx = init_state(config, train.images.shape[1:], info.num_classes, steps)

    latest_dir = os.path.join(out, "checkpoints")
    history = []
    if resume:
        named, saved_step = ckpt.read(ckpt.reader(latest_dir)) if os.path.isdir(latest_dir) else ({}, None)
        if saved_step is not None:
            state = ckpt.restore_into(state, named, where=f"checkpoint {saved_step} in {latest_dir}")
        done = int(state.step) // steps
        history = runs.read_metrics(out)[:done]
        if len(history) < done or (history and history[-1]["step"] != done * steps):
            raise ValueError(f"--resume: the checkpoint in {latest_dir} is at step {int(state.step)}, which does not "
                             f"match {out}/metrics.jsonl at {steps} steps per epoch (is --data-dir another dataset?)")
    if overwrite:  # everything above is validated: now the old run may go
        runs.remove(out, existing)
    os.makedirs(out, exist_ok=True)
    runs.save_config(out, config)
    runs.write_metrics(out, history)
    latest = ckpt.manager(latest_dir, keep=2)
    best = ckpt.manager(os.path.join(out, "best"), keep=1) if val else None  # chosen by validation only

    train_step, eval_step = make_steps(graphdef_train, graphdef_eval, tx, config, info)
    train_x, train_y = jax.device_put(train.images), jax.device_put(train.labels)
    test = (jax.device_put(data.test.images), jax.device_put(data.test.labels))
    per_epoch = {"val": (jax.device_put(val.images), jax.device_put(val.labels))} if val else {"test": test}
    if val and config.test_every_epoch:
        per_epoch["test"] = test
    schedule = make_schedule(config, steps)
    best_accuracy = max((h["val_accuracy"] for h in history), default=-1.0) if val else None

    def evaluate_on(arrays, at):
        with _explain_out_of_memory("evaluation", "--eval-batch-size", config.eval_batch_size):
            return evaluate(eval_step, at, *arrays, config.eval_batch_size)

    held = f" / {len(val)} validation" if val else ""
    log(f"{config.dataset} ({data.source}): {n_train} train{held} / {len(data.test)} test; model {config.model}; "
        f"{config.epochs} epochs x {steps} steps of {batch}; {describe(config)}; "
        f"on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    start = int(state.step)
    if resume:
        log(f"resuming {out} at step {start} (epoch {start // steps + 1}, step {start % steps + 1} of {steps})")
    progress = _Progress(sys.stderr)
    wall_start = time.perf_counter() - (history[-1]["wall_s"] if history else 0.0)
    if signals.caught:
        name = signal.Signals(signals.caught).name
        raise Stopped(f"stopped by {name} before the first training step of this process; continue with: "
                      f"jaxconv train --out {out} --resume", signals.caught)
    for epoch in range(start // steps, config.epochs):
        first = start - epoch * steps if epoch == start // steps else 0
        if first == 0:
            state = state.new_epoch()
        order = jax.random.permutation(jax.random.fold_in(state.key, epoch), n_train)[: steps * batch]
        order = order.reshape(steps, batch)
        t0, losses, checked = time.perf_counter(), [], 0
        for i in range(first, steps):
            with _explain_out_of_memory("training", "--batch-size", batch):
                state, loss = train_step(state, train_x, train_y, order, i)
            losses.append(loss)
            progress.update(epoch + 1, config.epochs, i + 1, steps)
            at = epoch * steps + i + 1
            if i + 1 < steps and (signals.caught or (config.checkpoint_every and at % config.checkpoint_every == 0)):
                _check_finite(losses[checked:], epoch * steps + first + checked + 1, epoch, latest, out)
                checked = len(losses)
                ckpt.save(latest, at, state)
                if signals.caught:
                    progress.clear()
                    raise _stopped(signals.caught, out, at, epoch, i + 1, steps)
        train_time = time.perf_counter() - t0
        progress.clear()
        _check_finite(losses[checked:], epoch * steps + first + checked + 1, epoch, latest, out)
        at = (epoch + 1) * steps
        record = dict(epoch=epoch + 1, step=at, lr=float(schedule(at - 1)),
                      train_loss=float(state.loss_sum) / steps,
                      train_accuracy=float(state.correct_sum) / (steps * batch))
        for name, arrays in per_epoch.items():
            record[f"{name}_loss"], record[f"{name}_accuracy"], _ = evaluate_on(arrays, state)
        record.update(images_per_s=(steps - first) * batch / train_time, wall_s=time.perf_counter() - wall_start)
        history.append(record)
        runs.write_metrics(out, history)
        if val and record["val_accuracy"] > best_accuracy:
            best_accuracy = record["val_accuracy"]
            ckpt.save(best, at, state)
        ckpt.save(latest, at, state)
        log(f"epoch {epoch + 1:3d}/{config.epochs}  train loss {record['train_loss']:.4f} acc "
            f"{record['train_accuracy']:.4f}  " + "  ".join(
                f"{n} loss {record[n + '_loss']:.4f} acc {record[n + '_accuracy']:.4f}" for n in per_epoch)
            + f"  {record['images_per_s']:,.0f} img/s  {record['wall_s']:.1f}s")
        if signals.caught and epoch + 1 < config.epochs:
            raise _stopped(signals.caught, out, at, epoch, steps, steps)
    if history:
        _finish(config, state, history, info, data, test, evaluate_on, best, log)
    for manager in (latest, best):
        if manager:
            manager.close()
    return history


def _stopped(signum, out, at, epoch, i, steps) -> Stopped:
    name = signal.Signals(signum).name
    return Stopped(f"stopped by {name} after step {at} (epoch {epoch + 1}, step {i}/{steps}); checkpoint written; "
                   f"continue with: jaxconv train --out {out} --resume", signum)


def _finish(config, state, history, info, data, test, evaluate_on, best, log):
    """The test set's numbers for the latest (and best) checkpoint, the confusion matrix and the curves."""
    out = config.out
    loss, accuracy, preds = evaluate_on(test, state)
    results = {"latest": dict(epoch=history[-1]["epoch"], step=history[-1]["step"], test_loss=loss,
                              test_accuracy=accuracy)}
    named, best_step = ckpt.read(best) if best else ({}, None)
    if best_step is not None:
        record = next(h for h in history if h["step"] == best_step)
        best_state = ckpt.restore_into(state, named, where=f"the best checkpoint in {out}/best")
        b_loss, b_acc, _ = evaluate_on(test, best_state)
        results["best"] = dict(epoch=record["epoch"], step=best_step, val_accuracy=record["val_accuracy"],
                               test_loss=b_loss, test_accuracy=b_acc)
    matrix = confusion_matrix(data.test.labels, preds, info.num_classes)
    results["confusion_matrix"] = "confusion_matrix.csv"
    runs.write_json(out, "results.json", results)
    runs.write_confusion_csv(out, matrix, info.classes)
    log("test confusion matrix (rows: true class, columns: predicted):\n" + format_matrix(matrix, info.classes))
    plot_curves(history, os.path.join(out, "curves.png"), title=f"{config.model} on {config.dataset}")
    if "best" in results:
        log(f"best validation accuracy {results['best']['val_accuracy']:.4f} at epoch {results['best']['epoch']}: "
            f"test accuracy {results['best']['test_accuracy']:.4f} (checkpoint in {out}/best)")
    log(f"final test accuracy {accuracy:.4f}; metrics, results, curves.png and checkpoints in {out}")


def format_matrix(matrix, class_names=None) -> str:
    width = max(len(str(int(matrix.max()))), 3)
    names = [str(n)[:12] for n in (class_names or range(matrix.shape[0]))]
    label = max(len(n) for n in names)
    head = " " * (label + 6) + " ".join(f"{j:>{width}d}" for j in range(matrix.shape[1]))
    rows = [f"{i:>3d} {names[i]:<{label}s}: " + " ".join(f"{v:>{width}d}" for v in row) for i, row in enumerate(matrix)]
    return "\n".join([head] + rows)


def plot_curves(history, path: str, *, title: str = ""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    splits = ["train"] + [s for s in ("val", "test") if f"{s}_loss" in history[0]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split in splits:
            ax.plot(epochs, [h[f"{split}_{metric}"] for h in history], label={"val": "validation"}.get(split, split))
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(f"{path}.tmp", dpi=100, format="png")
    plt.close(fig)
    os.replace(f"{path}.tmp", path)
