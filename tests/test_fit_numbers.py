"""One small run of ``fit`` checked number by number: every metrics field, file, checkpoint and log line against
an independent computation (the saved models evaluated with NumPy, the schedule's formula, a count by hand), and
the run's invariances (steps per program, mid-epoch checkpoints, a stop and its resume, seeds trained together)
as equalities. Small enough (a few seconds a run) to be the training tests of mutation testing on train.py.

The run: 250 MNIST-1D examples, 50 of them held out for validation, 200 trained on in 6 steps of 32 an epoch
(8 dropped), 70 test examples; evaluation batches of 32 (both evaluations end in a padded batch)."""
import dataclasses
import json
import math
import os
import re
import signal
import threading

import jax
import numpy as np
import pytest
from flax import nnx

import jaxconv
from jaxconv.config import describe, resolve
from jaxconv.data import load_dataset, split_indices
from jaxconv.train import TIMING_FIELDS, Stopped, TrainConfig, fit
from tests.conftest import shared_by_the_module
from tests.test_train import subset

RUN = dict(dataset="mnist1d", model="mnist1d_cnn", epochs=3, batch_size=32, optimizer="adam", lr=0.05,
           schedule="cosine", warmup_epochs=1, weight_decay=0.0, label_smoothing=0.0, crop=0, flip=False,
           val_split=0.2, eval_batch_size=32)
N_TRAIN, N_TEST, STEPS = 250, 70, 6
FIELDS = {"epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_s",
          "images_per_s_per_device", "wall_s", "devices", "device_kind", "processes"}


@pytest.fixture(scope=shared_by_the_module)
def data():
    return subset(load_dataset("mnist1d"), N_TRAIN, N_TEST)


@pytest.fixture(scope=shared_by_the_module)
def base(tmp_path_factory, data):
    """``(out, history, log lines, threads left running)`` of the run ``RUN`` with seed 0."""
    out = str(tmp_path_factory.mktemp("base") / "run")
    lines, threads = [], set(threading.enumerate())
    history = fit(TrainConfig(**RUN, out=out), dataset=data, log=lines.append)
    return out, history, lines, set(threading.enumerate()) - threads


def numpy_scores(logits, labels):
    """Mean cross-entropy and accuracy, in float64 NumPy."""
    logits = np.asarray(logits, np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    return -np.mean(log_p[np.arange(len(labels)), labels]), np.mean(logits.argmax(-1) == labels)


def without_timing(history):
    return [{k: v for k, v in record.items() if k not in TIMING_FIELDS} for record in history]


def params_of(out, which="latest"):
    return jax.tree.leaves(nnx.state(jaxconv.load(out, which).module))


def assert_same_params(a, b, tol=0.0):
    """Equal arrays, or to ``tol`` relative and absolute (float32 rounding of weights of size about 0.1-1)."""
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def assert_same_metrics(history, reference, rtol):
    """Equal records (timings aside), losses to ``rtol``."""
    assert [{k: v for k, v in h.items() if not k.endswith("_loss")} for h in without_timing(history)] == \
        [{k: v for k, v in h.items() if not k.endswith("_loss")} for h in without_timing(reference)]
    for h, r in zip(history, reference):
        for key in ("train_loss", "val_loss"):
            assert h[key] == pytest.approx(r[key], rel=rtol, abs=0), key


def test_every_record_holds_its_epoch_step_and_learning_rate(base):
    out, history, _, left_running = base
    assert not left_running  # the event file's writer and every checkpoint manager closed
    assert all(set(record) == FIELDS for record in history)
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 6), (2, 12), (3, 18)]
    peak, warmup, total = RUN["lr"], STEPS, 3 * STEPS  # linear warm-up over epoch 1, cosine to 0 at step 18

    def lr(t):
        if t < warmup:
            return peak * t / warmup
        return peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
    for h in history:  # the rate of the epoch's last step
        assert h["lr"] == pytest.approx(lr(h["step"] - 1), rel=1e-5)  # float32
    for h in history:
        assert (h["devices"], h["device_kind"], h["processes"]) == (1, "cpu", 1)
        assert h["images_per_s_per_device"] == h["images_per_s"] > 0
        assert h["train_accuracy"] * STEPS * 32 == pytest.approx(round(h["train_accuracy"] * STEPS * 32), abs=1e-6)
        assert h["val_accuracy"] * 50 == pytest.approx(round(h["val_accuracy"] * 50), abs=1e-6)
    assert 0 < history[0]["wall_s"] < history[1]["wall_s"] < history[2]["wall_s"]
    spans = np.diff([0.0] + [h["wall_s"] for h in history])  # each epoch's training is part of its wall time
    assert all(STEPS * 32 / h["images_per_s"] < span for h, span in zip(history, spans))
    assert history[-1]["train_loss"] < 0.9 * history[0]["train_loss"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line) for line in f] == history
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == dataclasses.asdict(resolve(TrainConfig(**RUN, out=out)))


def test_validation_and_test_numbers_are_those_of_the_saved_models(base, data):
    """The latest and best checkpoints, loaded and evaluated here in NumPy on the held-out rows (drawn here with
    split_indices) and on the test set: the records, results.json and the confusion matrix must agree."""
    out, history, _, _ = base
    _, held = split_indices(N_TRAIN, RUN["val_split"], 0)
    val_x, val_y = data.train.images[held], data.train.labels[held]
    latest = jaxconv.load(out, "latest")
    assert latest.checkpoint == {"which": "latest", "step": 18, "epoch": 3}
    val_loss, val_acc = numpy_scores(latest(val_x), val_y)
    assert history[-1]["val_loss"] == pytest.approx(val_loss, rel=1e-5)
    assert history[-1]["val_accuracy"] == pytest.approx(val_acc, abs=1e-9)

    accuracies = [h["val_accuracy"] for h in history]
    best_epoch = accuracies.index(max(accuracies)) + 1  # the first of equals
    assert best_epoch == 2, accuracies  # the run is chosen so: best is neither the first nor the latest state
    best = jaxconv.load(out, "best")
    assert best.checkpoint == {"which": "best", "step": 6 * best_epoch, "epoch": best_epoch}
    assert numpy_scores(best(val_x), val_y)[1] == pytest.approx(max(accuracies), abs=1e-9)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["12", "18"]  # the latest two
    assert os.listdir(os.path.join(out, "best")) == [str(6 * best_epoch)]

    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    test_loss, test_acc = numpy_scores(latest(data.test.images), data.test.labels)
    assert results["latest"]["epoch"] == 3 and results["latest"]["step"] == 18
    assert results["latest"]["test_loss"] == pytest.approx(test_loss, rel=1e-5)
    assert results["latest"]["test_accuracy"] == pytest.approx(test_acc, abs=1e-9)
    best_test_loss, best_test_acc = numpy_scores(best(data.test.images), data.test.labels)
    assert results["best"] == pytest.approx(dict(epoch=best_epoch, step=6 * best_epoch, val_accuracy=max(accuracies),
                                                 test_loss=best_test_loss, test_accuracy=best_test_acc), rel=1e-5)
    assert results["confusion_matrix"] == "confusion_matrix.csv"
    predicted = latest(data.test.images).argmax(-1)
    expected = np.zeros((10, 10), int)
    for true, guess in zip(data.test.labels, predicted):
        expected[true, guess] += 1
    matrix = np.loadtxt(os.path.join(out, "confusion_matrix.csv"), delimiter=",", skiprows=1, usecols=range(1, 11))
    np.testing.assert_array_equal(matrix, expected)
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000


def test_the_log_says_what_the_run_did_line_by_line(base, data):
    out, history, lines, _ = base
    config = resolve(TrainConfig(**RUN, out=out))
    assert lines[0] == (f"mnist1d ({data.source}): 200 train / 50 validation / 70 test; model mnist1d_cnn; "
                        f"3 epochs x 6 steps of 32; {describe(config)}; on 1 cpu device(s)")
    assert re.fullmatch(r"first step done \d+\.\d\d s after fit\(\) began \(data, model, compilation\)", lines[1])
    for h, line in zip(history, lines[2:5]):
        assert line == (f"epoch {h['epoch']:3d}/3  train loss {h['train_loss']:.4f} acc {h['train_accuracy']:.4f}  "
                        f"val loss {h['val_loss']:.4f} acc {h['val_accuracy']:.4f}  "
                        f"{h['images_per_s']:,.0f} img/s ({h['images_per_s']:,.0f}/device)  {h['wall_s']:.1f}s")
    assert lines[5].startswith("test confusion matrix (rows: true class, columns: predicted):\n")
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    best = results["best"]
    assert lines[6] == (f"best validation accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}: "
                        f"test accuracy {best['test_accuracy']:.4f} (checkpoint in {out}/best)")
    assert lines[7] == (f"final test accuracy {results['latest']['test_accuracy']:.4f}; metrics, results, "
                        f"curves.png and checkpoints in {out}")
    assert len(lines) == 8


def test_the_epoch_train_metrics_are_over_the_training_rows_only(tmp_path, data):
    """With a learning rate too small to move the weights, each epoch's training loss and accuracy are the initial
    model's over exactly the 200 rows not held out (5 steps of 40: none dropped), and the validation numbers are
    over the 50 held out."""
    train, held = split_indices(N_TRAIN, RUN["val_split"], 0)
    out = str(tmp_path / "run")
    history = fit(TrainConfig(**{**RUN, "epochs": 2, "batch_size": 40, "lr": 1e-30, "schedule": "constant",
                                 "warmup_epochs": 0}, out=out), dataset=data, log=lambda *a: None)
    model = jaxconv.load(out, "latest")
    train_loss, train_acc = numpy_scores(model(data.train.images[train]), data.train.labels[train])
    val_loss, val_acc = numpy_scores(model(data.train.images[held]), data.train.labels[held])
    for h in history:
        assert h["train_loss"] == pytest.approx(train_loss, rel=1e-5)
        assert h["train_accuracy"] == pytest.approx(train_acc, abs=1e-9)
        assert h["val_loss"] == pytest.approx(val_loss, rel=1e-5)
        assert h["val_accuracy"] == pytest.approx(val_acc, abs=1e-9)
    assert [h["step"] for h in history] == [5, 10]
    assert model.checkpoint["step"] == 10
    assert jaxconv.load(out, "best").checkpoint == {"which": "best", "step": 5, "epoch": 1}  # the first of equals
    with open(os.path.join(out, "results.json")) as f:
        assert (json.load(f)["best"]["epoch"], history[0]["val_accuracy"]) == (1, history[1]["val_accuracy"])


def test_without_validation_the_test_set_is_evaluated_every_epoch_and_no_best_is_kept(tmp_path, data):
    """No --val-split: all 250 rows train (7 steps of 32, 26 dropped), each epoch reports the test set, and the run
    keeps no best checkpoint."""
    out = str(tmp_path / "run")
    lines = []
    history = fit(TrainConfig(**{**RUN, "val_split": 0.0, "epochs": 2}, out=out), dataset=data, log=lines.append)
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 7), (2, 14)]
    assert set(history[0]) == FIELDS - {"val_loss", "val_accuracy"} | {"test_loss", "test_accuracy"}
    latest = jaxconv.load(out)  # auto: the latest, there being no best
    assert latest.checkpoint == {"which": "latest", "step": 14, "epoch": 2}
    test_loss, test_acc = numpy_scores(latest(data.test.images), data.test.labels)
    assert history[-1]["test_loss"] == pytest.approx(test_loss, rel=1e-5)
    assert history[-1]["test_accuracy"] == pytest.approx(test_acc, abs=1e-9)
    assert not os.path.exists(os.path.join(out, "best"))
    with open(os.path.join(out, "results.json")) as f:
        assert set(json.load(f)) == {"latest", "confusion_matrix"}
    assert lines[0].startswith(f"mnist1d ({data.source}): 250 train / 70 test; model mnist1d_cnn; "
                               f"2 epochs x 7 steps of 32; ")
    for h, line in zip(history, lines[2:4]):
        assert f"acc {h['train_accuracy']:.4f}  test loss {h['test_loss']:.4f} acc {h['test_accuracy']:.4f}  " in line
    assert lines[5].startswith(f"final test accuracy {test_acc:.4f}; ") and len(lines) == 6
    with pytest.raises(ValueError, match=r"already holds a run .*; pass --resume to continue it, or --overwrite"):
        fit(TrainConfig(**RUN, out=out), dataset=data, log=lambda *a: None)


def test_programs_of_several_steps_and_mid_epoch_checkpoints_change_nothing(tmp_path, base, data):
    """4 steps a program and a checkpoint every 5 steps: programs of 4, 1, 1 and 4, 2 in the first two epochs;
    the same metrics and parameters as one step a program, to float32 rounding (XLA fuses a loop's body otherwise
    than a one-step program; tests/test_interruptions.py checks it to 1e-12 in float64)."""
    out = str(tmp_path / "run")
    history = fit(TrainConfig(**RUN, steps_per_dispatch=4, checkpoint_every=5, out=out), dataset=data,
                  log=lambda *a: None)
    assert_same_metrics(history, base[1], rtol=1e-5)
    assert_same_params(params_of(out), params_of(base[0]), tol=1e-5)
    assert_same_params(params_of(out, "best"), params_of(base[0], "best"), tol=1e-5)
    assert sorted(os.listdir(os.path.join(out, "checkpoints")), key=int) == ["15", "18"]


def test_a_stop_before_the_first_step_leaves_no_checkpoint_and_resumes_from_the_start(tmp_path, base, data):
    out = str(tmp_path / "run")

    def log(line):
        if line.startswith("mnist1d ("):  # the opening line, written before the first step
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Stopped, match=re.escape(f"stopped by SIGINT before the first training step of this process; "
                                                f"continue with: jaxconv train --out {out} --resume")) as stopped:
        fit(TrainConfig(**RUN, out=out), dataset=data, log=log)
    assert stopped.value.signal == signal.SIGINT
    assert sorted(os.listdir(out)) == ["best", "checkpoints", "config.json", "metrics.jsonl", "tensorboard"]
    assert os.listdir(os.path.join(out, "checkpoints")) == os.listdir(os.path.join(out, "best")) == []
    assert os.path.getsize(os.path.join(out, "metrics.jsonl")) == 0
    history = fit(TrainConfig(**RUN, out=out), dataset=data, log=lambda *a: None, resume=True)
    assert without_timing(history) == without_timing(base[1])
    assert_same_params(params_of(out, "best"), params_of(base[0], "best"))


@pytest.mark.parametrize("step", ["training", "evaluation"])
def test_a_device_out_of_memory_names_the_batch_size_to_lower(tmp_path, data, monkeypatch, step):
    """The device's RESOURCE_EXHAUSTED error (raised here by the compiled step) in either step of a run."""
    import jaxconv.train as train

    def exhausted(*args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB.")

    def steps(*args):
        train_step, eval_step = make_replica_steps(*args)
        return (exhausted, eval_step) if step == "training" else (train_step, exhausted)

    make_replica_steps = train.make_replica_steps
    monkeypatch.setattr(train, "make_replica_steps", steps)
    flag, batch = ("--batch-size", 32) if step == "training" else ("--eval-batch-size", 20)
    with pytest.raises(train.OutOfMemory, match=f"^the device ran out of memory in a {step} step of batch size "
                                                f"{batch}; try {flag} {batch // 2}$"):
        fit(TrainConfig(**{**RUN, "eval_batch_size": 20}, out=str(tmp_path / "run")), dataset=data,
            log=lambda *a: None)


def test_a_second_ctrl_c_interrupts_at_once_and_the_handlers_are_restored(tmp_path, data):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def log(line):
        if line.startswith("first step done"):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt) as caught:
        fit(TrainConfig(**RUN, out=str(tmp_path / "run")), dataset=data, log=log)
    assert type(caught.value) is KeyboardInterrupt  # not Stopped: no checkpoint was waited for
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


@pytest.mark.parametrize("when", ["first step", "epoch 2"])
def test_a_stop_writes_a_checkpoint_and_the_resumed_run_is_the_uninterrupted_one(tmp_path, base, data, when):
    """SIGTERM arriving after the first step (mid-epoch) or while epoch 2 ends: the run stops with a checkpoint
    and says how to continue; ``resume`` ends exactly where the uninterrupted run did."""
    out = str(tmp_path / "run")
    trigger = "first step done" if when == "first step" else "epoch   2/3"

    def log(line):
        if line.startswith(trigger):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Stopped) as stopped:
        fit(TrainConfig(**RUN, out=out), dataset=data, log=log)
    where = "after step 1 (epoch 1, step 1/6)" if when == "first step" else "after step 12 (epoch 2, step 6/6)"
    assert str(stopped.value) == (f"stopped by SIGTERM {where}; checkpoint written; "
                                  f"continue with: jaxconv train --out {out} --resume")
    assert stopped.value.signal == signal.SIGTERM
    step = 1 if when == "first step" else 12
    assert sorted(os.listdir(os.path.join(out, "checkpoints")), key=int) == (["1"] if step == 1 else ["6", "12"])
    lines = []
    history = fit(TrainConfig(**RUN, out=out), dataset=data, log=lines.append, resume=True)
    assert lines[1] == f"resuming {out} at step {step} (epoch {step // 6 + 1}, step {step % 6 + 1} of 6)"
    assert without_timing(history) == without_timing(base[1])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line) for line in f] == history
    assert_same_params(params_of(out), params_of(base[0]))
    assert_same_params(params_of(out, "best"), params_of(base[0], "best"))


def test_a_signal_in_the_last_epoch_lets_the_run_finish(tmp_path, base, data):
    def log(line):
        if line.startswith("epoch   3/3"):
            os.kill(os.getpid(), signal.SIGTERM)

    history = fit(TrainConfig(**RUN, out=str(tmp_path / "run")), dataset=data, log=log)
    assert without_timing(history) == without_timing(base[1])
    assert os.path.exists(tmp_path / "run" / "results.json")


def test_two_seeds_in_one_program_are_two_runs(tmp_path, base, data):
    """Seeds 0 and 1 together: seed 0's folder holds the one-seed run of seed 0 (to float32 rounding: vmapped
    steps sum in another order), seeds.jsonl their mean and spread, the log line both."""
    out = str(tmp_path / "run")
    lines = []
    histories = fit(TrainConfig(**RUN, seeds=2, out=out), dataset=data, log=lines.append)
    alone = base[1]
    for a, b in zip(histories[0], alone):
        assert {k: a[k] for k in ("epoch", "step", "lr")} == {k: b[k] for k in ("epoch", "step", "lr")}
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4)
    for k, seed in enumerate((0, 1)):
        with open(os.path.join(out, f"seed_{seed}", "metrics.jsonl")) as f:
            assert [json.loads(line) for line in f] == histories[k]
        assert jaxconv.load(os.path.join(out, f"seed_{seed}"), "latest").checkpoint["step"] == 18
        with open(os.path.join(out, f"seed_{seed}", "config.json")) as f:
            saved = json.load(f)
        assert (saved["seed"], saved["seeds"], saved["out"]) == (seed, 1, os.path.join(out, f"seed_{seed}"))
    with open(os.path.join(out, "seeds.jsonl")) as f:
        summary = [json.loads(line) for line in f]
    for row, a, b in zip(summary, *histories):
        assert row["val_accuracy"] == [a["val_accuracy"], b["val_accuracy"]]
        assert row["train_loss_mean"] == pytest.approx((a["train_loss"] + b["train_loss"]) / 2, rel=1e-12)
        assert row["train_loss_std"] == pytest.approx(abs(a["train_loss"] - b["train_loss"]) / 2, rel=1e-9)
    with open(os.path.join(out, "results.json")) as f:
        summary = json.load(f)
    for k, seed in enumerate((0, 1)):
        with open(os.path.join(out, f"seed_{seed}", "results.json")) as f:
            assert summary["test_accuracy"][k] == json.load(f)["latest"]["test_accuracy"]
    assert summary["runs"] == ["seed_0", "seed_1"] and os.path.getsize(os.path.join(out, "curves.png")) > 1000
    bests = [line for line in lines if "best validation accuracy" in line]
    assert [line.split(":")[0] for line in bests] == ["seed 0", "seed 1"], lines
    h0, h1 = histories[0][0], histories[1][0]
    pair = lambda key: f"{(h0[key] + h1[key]) / 2:.4f}±{abs(h0[key] - h1[key]) / 2:.4f}"
    assert lines[2] == (f"epoch   1/3  train loss {pair('train_loss')} acc {pair('train_accuracy')}  "
                        f"val loss {pair('val_loss')} acc {pair('val_accuracy')}  "
                        f"{h0['images_per_s']:,.0f} img/s x 2 seeds ({h0['images_per_s']:,.0f}/device)  "
                        f"{h0['wall_s']:.1f}s")
