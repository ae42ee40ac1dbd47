"""train.py's pieces that do not need a training run, each against an independent expectation: the programs
a run dispatches against a step-by-step walk, the divergence and resume checks' decisions and messages, the
epoch order's permutation property, the log and stop lines word for word. (The run loop itself is checked
by tests/test_train.py and tests/test_interruptions.py, which train.)"""
import io
import json
import os
import signal
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxconv import parallel
from jaxconv import train as T


def _walk(epoch_start, i, steps, per_dispatch, checkpoint_every):
    """One step at a time: a program ends after step j (counted from the epoch's start) when j is a multiple of
    ``per_dispatch``, ends the epoch, or makes the run's step count a multiple of ``checkpoint_every``."""
    j = i
    while True:
        j += 1
        if j % per_dispatch == 0 or j == steps or (checkpoint_every and (epoch_start + j) % checkpoint_every == 0):
            return j - i


def test_steps_to_dispatch_ends_programs_where_a_step_by_step_walk_does():
    checked = 0
    for steps in (1, 5, 7, 12):
        for epoch in range(3):
            for per_dispatch in (1, 2, 3, 5, 16):
                for every in (0, 1, 4, 5, 9):
                    i, sizes = 0, []
                    while i < steps:
                        n = T._steps_to_dispatch(epoch * steps, i, steps, per_dispatch, every)
                        assert n == _walk(epoch * steps, i, steps, per_dispatch, every), (steps, epoch, per_dispatch,
                                                                                          every, i)
                        sizes.append(n)
                        i += n
                        checked += 1
                    assert sum(sizes) == steps and min(sizes) >= 1
    assert checked > 1000
    # the cases by hand: 7 steps in programs of 3 -> 3, 3, 1; a checkpoint every 5 steps cuts the first at 5
    assert [T._steps_to_dispatch(0, i, 7, 3, 0) for i in (0, 3, 6)] == [3, 3, 1]
    assert [T._steps_to_dispatch(7, i, 7, 4, 5) for i in (0, 3, 4)] == [3, 1, 3]


class _Checkpoints:
    def __init__(self, out, last):
        self.out, self.latest = out, SimpleNamespace(latest_step=lambda: last)


def _replicas(*seeds):
    return [SimpleNamespace(seed=s) for s in seeds]


def test_check_finite_names_the_first_bad_step_and_seed_and_the_last_checkpoint():
    good = np.ones((3, 2), np.float32)
    T._check_finite([good, good[:1]], 10, 0, _replicas(4, 5), _Checkpoints("/r", 8))  # all finite: no error
    T._check_finite([], 10, 0, _replicas(4, 5), _Checkpoints("/r", 8))  # no step run
    bad = good.copy()
    bad[2, 1] = np.inf
    later = good.copy()
    later[0, 0] = np.nan
    with pytest.raises(T.TrainingDiverged) as err:
        T._check_finite([good, bad, later], 10, 2, _replicas(4, 5), _Checkpoints("/r", 8))
    assert str(err.value) == ("loss became inf for seed 5 at step 15 (epoch 3); training stopped. The last good "
                              "checkpoint is step 8 in /r/checkpoints.")
    one = np.array([[1.0], [np.nan]])
    with pytest.raises(T.TrainingDiverged) as err:
        T._check_finite([one], 1, 0, _replicas(0), _Checkpoints("/r", None))
    assert str(err.value) == "loss became nan at step 2 (epoch 1); training stopped. No checkpoint was written yet."


def _history(epochs, steps, val=None):
    return [dict(epoch=e + 1, step=(e + 1) * steps, **({} if val is None else {"val_accuracy": val[e]}))
            for e in range(epochs)]


def test_resume_metrics_cuts_to_the_checkpoint_and_refuses_another_epoch_length(tmp_path):
    out = str(tmp_path)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in _history(3, 10, val=[0.5, 0.7, 0.6]))
    replica = SimpleNamespace(out=out, validation_rows=np.arange(4), history=None, best_accuracy=-1.0)
    T._resume_metrics([replica], 25, 10, out)  # a checkpoint mid-epoch 3: epoch 3's record is dropped
    assert [h["epoch"] for h in replica.history] == [1, 2] and replica.best_accuracy == 0.7
    T._resume_metrics([replica], 30, 10, out)
    assert len(replica.history) == 3 and replica.best_accuracy == 0.7
    no_val = SimpleNamespace(out=out, validation_rows=None, history=None, best_accuracy=-1.0)
    T._resume_metrics([no_val], 9, 10, out)
    assert no_val.history == [] and no_val.best_accuracy == -1.0
    message = (f"--resume: the checkpoint in {out}/checkpoints is at step 40, which does not match {out}/metrics.jsonl "
               f"at 10 steps per epoch (is --data-dir another dataset?)")
    with pytest.raises(ValueError) as err:  # 4 epochs done but only 3 recorded
        T._resume_metrics([no_val], 40, 10, out)
    assert str(err.value) == message
    with pytest.raises(ValueError, match="is at step 24, which does not match .* at 12 steps per epoch"):
        T._resume_metrics([no_val], 24, 12, out)  # 2 epochs of 12 = 24, but the records end epoch 2 at step 20


def test_epoch_order_is_a_permutation_of_each_replicas_rows_drawn_from_its_key_and_the_epoch():
    mesh = parallel.make_mesh(1)
    order = T._order_function(mesh, steps=3, batch=4)
    keys = jax.random.split(jax.random.key(0), 2)
    keys = jax.random.key_data(keys)
    members = np.stack([np.arange(14), np.arange(100, 114)])  # 14 rows each: 12 used, 2 left out per epoch
    a = np.asarray(order(keys, members, 0))
    assert a.shape == (2, 3, 4)
    for k in range(2):
        rows = a[k].ravel()
        assert len(set(rows)) == 12 and set(rows) <= set(members[k])
    np.testing.assert_array_equal(np.asarray(order(keys, members, 0)), a)  # the same epoch: the same order
    assert not np.array_equal(np.asarray(order(keys, members, 1)), a)  # another epoch: another order
    assert not np.array_equal(a[0], a[1] - 100)  # another replica's key: another order


def test_log_epoch_line_word_for_word():
    lines = []
    config = SimpleNamespace(epochs=12)
    record = dict(epoch=3, devices=2, train_loss=0.5, train_accuracy=0.75, val_loss=0.25, val_accuracy=0.875)
    T._log_epoch(lines.append, config, [SimpleNamespace(history=[record])], ["val"], 1234.4, 56.78)
    assert lines[-1] == ("epoch   3/12  train loss 0.5000 acc 0.7500  val loss 0.2500 acc 0.8750  1,234 img/s "
                         "(617/device)  56.8s")
    other = dict(record, train_loss=0.7, train_accuracy=0.25)
    T._log_epoch(lines.append, config, [SimpleNamespace(history=[record]), SimpleNamespace(history=[other])], [],
                 100.0, 1.0)
    assert lines[-1] == "epoch   3/12  train loss 0.6000±0.1000 acc 0.5000±0.2500  100 img/s x 2 seeds (50/device)  1.0s"


def test_stopped_says_where_and_how_to_continue():
    stop = T._stopped(signal.SIGTERM, "/runs/a", 57, 2, 7, 25)
    assert isinstance(stop, KeyboardInterrupt) and stop.signal == signal.SIGTERM
    assert str(stop) == ("stopped by SIGTERM after step 57 (epoch 3, step 7/25); checkpoint written; continue with: "
                         "jaxconv train --out /runs/a --resume")


def test_progress_bar_only_on_a_terminal_and_cleared_after_the_epoch():
    quiet = io.StringIO()
    progress = T._Progress(quiet, live=False)
    progress.update(1, 2, 1, 3)
    progress.clear()
    assert quiet.getvalue() == "" and progress.bar is None
    shown = io.StringIO()
    progress = T._Progress(shown, live=True)
    for step in (3, 4):  # resumed at step 3 of 4
        progress.update(2, 5, step, 4)
    assert progress.bar.n == 4 and progress.bar.total == 4
    assert "epoch 2/5" in shown.getvalue() and "4/4" in shown.getvalue()
    progress.clear()
    assert progress.bar is None
