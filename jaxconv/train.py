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
import dataclasses
import functools
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxconv import checkpoints as ckpt
from jaxconv import compiler, parallel, runs
from jaxconv.config import TrainConfig, check_resume, describe, resolve  # noqa: F401
from jaxconv.data import DATASETS, Dataset, load_dataset, split_indices
from jaxconv.events import EventLog
from jaxconv.reports import format_matrix, plot_curves, plot_seed_band  # noqa: F401
from jaxconv.steps import (DTYPES, TrainState, confusion_matrix, evaluate, init_replicas, init_state,  # noqa: F401
                           make_optimizer, make_replica_steps, make_schedule, make_steps)


# The fields of a metrics record that measure time: the only ones a resumed or re-run run may change.
TIMING_FIELDS = ("images_per_s", "images_per_s_per_device", "wall_s")


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
    """A tqdm bar per epoch on a terminal (steps done, rate, elapsed and ETA); silent otherwise (the epoch lines
    are printed anyway)."""

    def __init__(self, stream, *, live: bool):
        self.stream, self.live, self.bar = stream, live, None

    def update(self, epoch, epochs, step, steps):
        if not self.live:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=steps, initial=step - 1, desc=f"epoch {epoch}/{epochs}", unit="step",
                            file=self.stream, leave=False, dynamic_ncols=True, mininterval=0.2)
        self.bar.update(1)
        if step == steps:
            self.bar.refresh()  # the epoch's last step is always shown, however fast it came

    def clear(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _steps_to_dispatch(epoch_start: int, i: int, steps: int, per_dispatch: int, checkpoint_every: int) -> int:
    """How many steps the next dispatch makes, from step ``i`` of an epoch of ``steps``: up to the next multiple of
    ``per_dispatch`` within the epoch, and never past the epoch's end or the next ``checkpoint_every`` step. Other
    lengths than ``per_dispatch`` come from an epoch's remainder and from checkpoints; each compiles once."""
    end = min(steps, (i // per_dispatch + 1) * per_dispatch)
    if checkpoint_every:
        end = min(end, ((epoch_start + i) // checkpoint_every + 1) * checkpoint_every - epoch_start)
    return end - i


def _check_finite(losses, first_step: int, epoch: int, replicas, checkpoints):
    """``TrainingDiverged`` if any of ``losses`` (arrays ``[steps, K]``, the first of them step ``first_step``)
    is not finite."""
    values = (np.concatenate([parallel.fetch(v) for v in losses]) if losses
              else np.zeros((0, len(replicas))))  # [steps, K]
    bad_steps, bad_replicas = np.nonzero(~np.isfinite(values))
    if bad_steps.size:
        replica = replicas[int(bad_replicas[0])]
        last = checkpoints.latest.latest_step()
        which = f" for seed {replica.seed}" if len(replicas) > 1 else ""
        raise TrainingDiverged(
            f"loss became {values[bad_steps[0], bad_replicas[0]]}{which} at step {first_step + int(bad_steps[0])} "
            f"(epoch {epoch + 1}); training stopped. "
            + (f"The last good checkpoint is step {last} in {os.path.join(checkpoints.out, 'checkpoints')}."
               if last is not None else "No checkpoint was written yet."))


def fit(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, dataset: Dataset | None = None,
        log=print):
    """Train ``config`` (see :class:`TrainConfig`); returns the list of per-epoch metric dicts (one list per seed
    when ``config.seeds > 1``).

    ``resume`` continues the run in ``config.out`` (every setting but those in
    :data:`jaxconv.config.RESUMABLE` must match its ``config.json``); ``overwrite`` replaces it.
    The global batch is split across ``config.devices`` devices of every process (see :mod:`jaxconv.parallel`);
    ``config.seeds`` runs of seeds ``seed, seed + 1, ...`` train together as one program, each in
    ``OUT/seed_S/`` (a complete run folder of its own), with their mean and spread in ``OUT/seeds.jsonl``.
    """
    started = time.perf_counter()
    config = resolve(config)
    with _StopSignals() as signals:  # from here on, SIGINT/SIGTERM are answered between steps
        histories = _fit(config, resume, overwrite, dataset, log if parallel.is_writer() else _silent, signals,
                         started)
    return histories[0] if config.seeds == 1 else histories


def _silent(*args, **kwargs):
    pass


class _Replica:
    """One seed's run folder (``OUT`` itself for a one-seed run) and its metrics."""

    def __init__(self, config: TrainConfig, k: int, validation_rows):
        self.k, self.seed = k, config.seed + k
        self.out = config.out if config.seeds == 1 else os.path.join(config.out, f"seed_{self.seed}")
        self.config = dataclasses.replace(config, seed=self.seed, seeds=1, out=self.out)
        self.validation_rows, self.history, self.best_accuracy = validation_rows, [], -1.0

    def open(self, writer: bool, resumed_from: int | None):
        self.events = None
        if writer:
            os.makedirs(self.out, exist_ok=True)
            runs.save_config(self.out, self.config)
            runs.write_metrics(self.out, self.history)
            self.events = EventLog(self.out, resumed_from=resumed_from)

    def record(self, record: dict):
        self.history.append(record)
        if self.events is not None:
            runs.write_metrics(self.out, self.history)
            self.events.write(record)

    def close(self):
        if self.events is not None:
            self.events.close()

    def best_step(self):
        if self.validation_rows is None or not self.history:
            return None
        best = max(range(len(self.history)), key=lambda i: (self.history[i]["val_accuracy"], -i))
        return self.history[best]["step"]


class _Checkpoints:
    """The run's checkpoints: ``OUT/checkpoints`` (the latest two) and ``OUT/best``. A one-seed run keeps its
    state as it is; a many-seed run keeps the stacked state of all its seeds in one checkpoint (one write per
    epoch, not one per seed), ``best`` holding in each seed's slot that seed's best state so far, and at the
    end writes each seed's own checkpoints into ``OUT/seed_S`` (see :meth:`export`)."""

    def __init__(self, out: str, mesh, seeds: int, with_best: bool):
        self.out, self.one, self.with_best = out, seeds == 1, with_best
        replicated = parallel.replicated(mesh)
        self._take = jax.jit(lambda state, k: jax.tree.map(lambda a: a[k], state), out_shardings=replicated)
        self._grow = jax.jit(lambda state: jax.tree.map(lambda a: a[None], state), out_shardings=replicated)
        self.latest = self.best = None

    def open(self):
        self.latest = ckpt.manager(os.path.join(self.out, "checkpoints"), keep=2)
        if self.with_best:
            self.best = ckpt.manager(os.path.join(self.out, "best"), keep=1)

    def stored_form(self, state):
        return self._take(state, 0) if self.one else state

    def save(self, which: str, at: int, state):
        ckpt.save(getattr(self, which), at, self.stored_form(state))

    def restore(self, state):
        """``(state, best_state)`` from the run's latest checkpoints (``None`` for a folder that holds none)."""
        found = []
        for name in ("checkpoints", "best"):
            folder = os.path.join(self.out, name)
            mgr = ckpt.reader(folder) if os.path.isdir(folder) else None
            step = mgr.latest_step() if mgr else None
            if step is None:
                found.append(None)
                continue
            one = ckpt.restore(mgr, self.stored_form(state), step, where=f"checkpoint {step} in {folder}")
            found.append(self._grow(one) if self.one else one)
        return found[0], found[1]

    def export(self, replicas, state, best_state, at: int):
        """A many-seed run's end: each seed's latest and best state as its own run folder's checkpoints."""
        for r in replicas:
            with contextlib.closing(ckpt.manager(os.path.join(r.out, "checkpoints"), keep=2)) as mgr:
                ckpt.save(mgr, at, self._take(state, r.k))
            if best_state is not None and r.best_step() is not None:
                with contextlib.closing(ckpt.manager(os.path.join(r.out, "best"), keep=1)) as mgr:
                    ckpt.save(mgr, r.best_step(), self._take(best_state, r.k))

    def close(self):
        for manager in (self.latest, self.best):
            if manager:
                manager.close()


def _fit(config, resume, overwrite, dataset, log, signals, started):
    out, writer = config.out, parallel.is_writer()
    existing = runs.claim(out, resume=resume, overwrite=overwrite)
    if resume:
        check_resume(resolve(runs.load_config(out)), config)
    parallel.sync("checked")  # every process has looked at the folder before process 0 writes to it
    data = dataset or load_dataset(config.dataset, data_dir=config.data_dir, source=config.source)
    info = DATASETS[config.dataset]
    n_all, seeds = len(data.train), [config.seed + k for k in range(config.seeds)]
    # Every replica trains on rows of the one training array on the devices (its validation rows held out).
    splits = [split_indices(n_all, config.val_split, s) if config.val_split else (np.arange(n_all), None)
              for s in seeds]
    replicas = [_Replica(config, k, held) for k, (_, held) in enumerate(splits)]
    n_train = len(splits[0][0])
    batch = min(config.batch_size, n_train)
    mesh = parallel.make_mesh(config.devices, batch=batch)
    parallel.check_batch(batch, mesh)
    steps = n_train // batch  # the last partial batch is dropped: one compiled shape
    state, graphdef_train, graphdef_eval, tx = init_replicas(config, seeds, data.train.images.shape[1:],
                                                             info.num_classes, steps, mesh)
    checkpoints = _Checkpoints(out, mesh, config.seeds, with_best=bool(config.val_split))
    best_state = None
    if resume:
        saved, best_state = checkpoints.restore(state)
        state = state if saved is None else saved
        _resume_metrics(replicas, int(parallel.fetch(state.step)[0]), steps, out)
    if overwrite and writer:  # everything above is validated: now the old run may go
        runs.remove(out, existing)
    parallel.sync("claimed")
    if writer:
        os.makedirs(out, exist_ok=True)
        runs.save_config(out, config)
    start = int(parallel.fetch(state.step)[0])
    for replica in replicas:
        replica.open(writer, start if resume else None)
    parallel.sync("opened")
    checkpoints.open()

    train_step, eval_step = make_replica_steps(graphdef_train, graphdef_eval, tx, config, info, mesh, config.seeds)
    put = functools.partial(parallel.put, mesh)
    train_x, train_y = put(data.train.images), put(data.train.labels)
    members = put(np.stack([rows for rows, _ in splits]).astype(np.int32))
    test = (put(data.test.images), put(data.test.labels), None)
    validation = (train_x, train_y, np.stack([r.validation_rows for r in replicas])) if config.val_split else None
    per_epoch = {"val": validation} if validation else {"test": test}
    if validation and config.test_every_epoch:
        per_epoch["test"] = test
    schedule = jax.jit(make_schedule(config, steps))  # one program for the logged rate, not one per op
    order_of = _order_function(mesh, steps, batch)
    keep_best = jax.jit(lambda better, new, old: jax.tree.map(
        lambda a, b: jnp.where(better.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old),
        out_shardings=parallel.replicated(mesh))

    def evaluate_on(arrays, at):
        images, labels, rows = arrays  # rows None: every example, for every replica
        rows = np.broadcast_to(np.arange(len(labels)), (config.seeds, len(labels))) if rows is None else rows
        with _explain_out_of_memory("evaluation", "--eval-batch-size", config.eval_batch_size):
            return evaluate(eval_step, at, images, labels, rows, config.eval_batch_size, mesh)

    held = f" / {len(replicas[0].validation_rows)} validation" if validation else ""
    per_dispatch = config.steps_per_dispatch or compiler.steps_per_dispatch()
    log(f"{config.dataset} ({data.source}): {n_train} train{held} / {len(data.test)} test; model {config.model}; "
        f"{config.epochs} epochs x {steps} steps of {batch}; {describe(config)}; on {parallel.describe(mesh)}"
        + (f", {per_dispatch} steps per dispatch" if per_dispatch > 1 else "")
        + (f" (of {jax.device_count()}: the batch of {batch} does not divide by more)"
           if mesh.size < jax.device_count() and config.devices == "all" else ""))
    if resume:
        log(f"resuming {out} at step {start} (epoch {start // steps + 1}, step {start % steps + 1} of {steps})")
    progress = _Progress(sys.stderr, live=writer and sys.stderr.isatty())
    history0 = replicas[0].history
    wall_start = time.perf_counter() - (history0[-1]["wall_s"] if history0 else 0.0)
    where = dict(devices=mesh.size, device_kind="/".join(parallel.device_kinds(mesh)), processes=jax.process_count())
    if signals.caught:
        name = signal.Signals(signals.caught).name
        raise Stopped(f"stopped by {name} before the first training step of this process; continue with: "
                      f"jaxconv train --out {out} --resume", signals.caught)
    for epoch in range(start // steps, config.epochs):
        first = start - epoch * steps if epoch == start // steps else 0
        if first == 0:
            state = state.new_epoch()
        order = order_of(state.key, members, epoch)
        t0, losses, checked = time.perf_counter(), [], epoch * steps + first  # checked: steps whose loss was seen
        i = first
        while i < steps:
            n = _steps_to_dispatch(epoch * steps, i, steps, per_dispatch, config.checkpoint_every)
            with _explain_out_of_memory("training", "--batch-size", batch):
                state, loss = train_step(state, train_x, train_y, order, i, n)
            if not losses and epoch * steps + i == start:  # the time to first step, compilation included
                jax.block_until_ready(loss)
                progress.clear()
                log(f"first step done {time.perf_counter() - started:.2f} s after fit() began "
                    f"(data, model, compilation)")
            losses.append(loss)
            i += n
            progress.update(epoch + 1, config.epochs, i, steps)
            at = epoch * steps + i
            if i < steps and (signals.caught or (config.checkpoint_every and at % config.checkpoint_every == 0)):
                _check_finite(losses, checked + 1, epoch, replicas, checkpoints)
                losses, checked = [], at
                checkpoints.save("latest", at, state)
                if signals.caught:
                    progress.clear()
                    raise _stopped(signals.caught, out, at, epoch, i, steps)
        jax.block_until_ready(state)  # steps are dispatched ahead: the epoch's time is its last step's end
        train_time = time.perf_counter() - t0
        progress.clear()
        _check_finite(losses, checked + 1, epoch, replicas, checkpoints)
        at = (epoch + 1) * steps
        loss_sum, correct_sum = parallel.fetch(state.loss_sum), parallel.fetch(state.correct_sum)
        evaluated = {name: evaluate_on(arrays, state) for name, arrays in per_epoch.items()}
        wall = time.perf_counter() - wall_start
        rate = (steps - first) * batch / train_time
        improved = np.zeros(config.seeds, bool)
        for replica in replicas:
            k = replica.k
            record = dict(epoch=epoch + 1, step=at, lr=float(schedule(at - 1)),
                          train_loss=float(loss_sum[k]) / steps, train_accuracy=float(correct_sum[k]) / (steps * batch))
            for name, (loss, accuracy, _) in evaluated.items():
                record[f"{name}_loss"], record[f"{name}_accuracy"] = float(loss[k]), float(accuracy[k])
            record.update(images_per_s=rate, images_per_s_per_device=rate / mesh.size, wall_s=wall, **where)
            replica.record(record)
            if validation and record["val_accuracy"] > replica.best_accuracy:
                replica.best_accuracy, improved[k] = record["val_accuracy"], True
        if improved.any():
            best_state = keep_best(put(improved), state, state if best_state is None else best_state)  # a copy:
            # the next step donates ``state``
            checkpoints.save("best", at, best_state)
        checkpoints.save("latest", at, state)
        if config.seeds > 1 and writer:
            runs.write_seed_summary(out, [r.history for r in replicas], seeds)
        _log_epoch(log, config, replicas, per_epoch, rate, wall)
        if signals.caught and epoch + 1 < config.epochs:
            raise _stopped(signals.caught, out, at, epoch, steps, steps)
    if replicas[0].history:
        if config.seeds > 1:
            checkpoints.export(replicas, state, best_state, replicas[0].history[-1]["step"])
        final = _finish(config, replicas, state, best_state, info, data, test, evaluate_on, writer, log)
        if config.seeds > 1 and writer:
            runs.write_seed_results(out, seeds, final)
            plot_seed_band([r.history for r in replicas], os.path.join(out, "curves.png"),
                           title=f"{config.model} on {config.dataset}, seeds {seeds[0]}..{seeds[-1]}")
    checkpoints.close()
    for replica in replicas:
        replica.close()
    parallel.sync("finished")
    return [r.history for r in replicas]


def _resume_metrics(replicas, step: int, steps: int, out: str) -> None:
    """Each seed's metrics, cut to the checkpoint the run resumes from (a kill may land between the two writes)."""
    done = step // steps
    for r in replicas:
        r.history = runs.read_metrics(r.out)[:done]
        if len(r.history) < done or (r.history and r.history[-1]["step"] != done * steps):
            raise ValueError(f"--resume: the checkpoint in {out}/checkpoints is at step {step}, which does not "
                             f"match {r.out}/metrics.jsonl at {steps} steps per epoch (is --data-dir another dataset?)")
        if r.validation_rows is not None:
            r.best_accuracy = max((h["val_accuracy"] for h in r.history), default=-1.0)


def _order_function(mesh, steps: int, batch: int):
    """``order(keys [K, 2], members [K, n], epoch) -> [K, steps, batch]``: each replica's rows of the training
    array for every step of the epoch, a permutation drawn from its key and the epoch."""
    def order(keys, members, epoch):
        def one(key, rows):
            perm = jax.random.permutation(jax.random.fold_in(key, epoch), rows.shape[0])[: steps * batch]
            return rows[perm].reshape(steps, batch)
        return jax.vmap(one)(keys, members)
    return jax.jit(order, out_shardings=parallel.replicated(mesh))


def _log_epoch(log, config, replicas, per_epoch, rate, wall):
    def mean(key):
        values = [r.history[-1][key] for r in replicas]
        return f"{np.mean(values):.4f}" + (f"±{np.std(values):.4f}" if len(values) > 1 else "")

    record = replicas[0].history[-1]
    log("  ".join([f"epoch {record['epoch']:3d}/{config.epochs}",
                   f"train loss {mean('train_loss')} acc {mean('train_accuracy')}",
                   *(f"{n} loss {mean(n + '_loss')} acc {mean(n + '_accuracy')}" for n in per_epoch),
                   f"{rate:,.0f} img/s" + (f" x {len(replicas)} seeds" if len(replicas) > 1 else "")
                   + f" ({rate / record['devices']:,.0f}/device)", f"{wall:.1f}s"]))


def _stopped(signum, out, at, epoch, i, steps) -> Stopped:
    name = signal.Signals(signum).name
    return Stopped(f"stopped by {name} after step {at} (epoch {epoch + 1}, step {i}/{steps}); checkpoint written; "
                   f"continue with: jaxconv train --out {out} --resume", signum)


def _finish(config, replicas, state, best_state, info, data, test, evaluate_on, writer, log):
    """Each seed's test numbers for its latest (and best) state, its confusion matrix and its curves."""
    loss, accuracy, preds = evaluate_on(test, state)
    best = evaluate_on(test, best_state) if best_state is not None else None
    final = []
    for r in replicas:
        k, out, history = r.k, r.out, r.history
        results = {"latest": dict(epoch=history[-1]["epoch"], step=history[-1]["step"], test_loss=float(loss[k]),
                                  test_accuracy=float(accuracy[k]))}
        if best is not None and r.best_step() is not None:
            record = next(h for h in history if h["step"] == r.best_step())
            results["best"] = dict(epoch=record["epoch"], step=record["step"], val_accuracy=record["val_accuracy"],
                                   test_loss=float(best[0][k]), test_accuracy=float(best[1][k]))
        matrix = confusion_matrix(data.test.labels, preds[k], info.num_classes)
        results["confusion_matrix"] = "confusion_matrix.csv"
        final.append(results)
        if writer:
            runs.write_json(out, "results.json", results)
            runs.write_confusion_csv(out, matrix, info.classes)
            if config.seeds == 1:  # a many-seed run draws every seed in one picture (plot_seed_band)
                plot_curves(history, os.path.join(out, "curves.png"), title=f"{config.model} on {config.dataset}")
        if config.seeds == 1:
            log("test confusion matrix (rows: true class, columns: predicted):\n" + format_matrix(matrix, info.classes))
        if "best" in results:
            log(f"{'' if config.seeds == 1 else f'seed {r.seed}: '}best validation accuracy "
                f"{results['best']['val_accuracy']:.4f} at epoch {results['best']['epoch']}: "
                f"test accuracy {results['best']['test_accuracy']:.4f} (checkpoint in {out}/best)")
    if config.seeds == 1:
        log(f"final test accuracy {float(accuracy[0]):.4f}; metrics, results, curves.png and checkpoints in {config.out}")
    else:
        log(f"final test accuracy over seeds {replicas[0].seed}..{replicas[-1].seed}: {np.mean(accuracy):.4f} ± "
            f"{np.std(accuracy):.4f} (min {np.min(accuracy):.4f}, max {np.max(accuracy):.4f}); each seed's run in "
            f"{config.out}/seed_S, their mean and spread in {config.out}/seeds.jsonl")
    return final
