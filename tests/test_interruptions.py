"""A run loses nothing: kills at random moments, signals, resumes that change settings, checkpoints by name."""
import json
import os
import signal
import time

import jax
import pytest

from jaxconv import checkpoints as ckpt
from jaxconv import compiler
from jaxconv.data import load_dataset
from jaxconv.train import TIMING_FIELDS, TrainConfig, fit, init_state, resolve
from tests.kill_chain import differences, kill_chain, outcome, timed, train
from tests.test_train import quiet, subset

# MNIST-1D, 6 epochs of 36 steps, a validation split (so a best checkpoint too), a checkpoint every 5 steps.
ARGS = ["--epochs", "6", "--checkpoint-every", "5", "--val-split", "0.1"]


def test_killed_at_random_moments_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """SIGKILL or SIGTERM at six random moments of one run (startup, steps, checkpoint writes, evaluation,
    metrics writes, wherever they land), each followed by --resume: the metrics, results, confusion
    matrix and every array of the latest and best checkpoints equal those of a run never interrupted."""
    (rc, _, err), seconds = timed(train, [*ARGS, "--out", str(tmp_path / "full")])
    assert rc == 0, err
    attempts = kill_chain(str(tmp_path / "chain"), ARGS, kills=6, window=(1.5, 0.5 * seconds), seed=1,
                          signals=(signal.SIGKILL, signal.SIGTERM))
    assert attempts[-1]["returncode"] == 0, attempts[-1]["stderr"]
    assert len(attempts) >= 3  # at least two kills landed before the run could finish (the load varies)
    for a in attempts[:-1]:
        if a["signal"] == "SIGTERM" and a["returncode"] == -15:  # while Python was still importing jaxconv
            assert a["stdout"] == "" and not os.path.exists(tmp_path / "chain" / "checkpoints" / "1"), a
        elif a["signal"] == "SIGTERM":  # one line; in training, after a checkpoint, with how to resume
            assert a["returncode"] == 143 and a["stderr"].count("\n") == 1, a
            assert a["stderr_tail"].startswith("jaxconv train: stopped by SIGTERM ")
            assert a["stderr_tail"].endswith(f"continue with: jaxconv train --out {tmp_path / 'chain'} --resume"), a
        else:
            assert a["returncode"] == -9, a
    assert differences(outcome(str(tmp_path / "full")), outcome(str(tmp_path / "chain"))) == []


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = str(tmp_path / "run")
    proc = train(["--epochs", "200", "--out", out], wait=False)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "metrics.jsonl")) or os.path.getsize(
            os.path.join(out, "metrics.jsonl")) == 0:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxconv train: stopped by SIGINT after step "), err
    step = int(lines[0].split("after step ")[1].split()[0])
    assert sorted(int(s) for s in os.listdir(os.path.join(out, "checkpoints")))[-1] == step  # the step it names


def test_resume_keeps_the_run_settings_and_writes_nothing_when_refused(tmp_path):
    data = subset(load_dataset("mnist1d"), 400, 100)
    out = str(tmp_path / "run")
    fit(TrainConfig(epochs=1, out=out), dataset=data, log=quiet)
    saved = {n: open(os.path.join(out, n), "rb").read() for n in ("config.json", "metrics.jsonl")}
    for change, message in [(dict(lr=0.5), "--lr is 0.5 but the run in .* was made with 0.01"),
                            (dict(dataset="mnist"), "--dataset is 'mnist' but the run in .* was made with 'mnist1d'"),
                            (dict(seed=1, out=out), "--seed is 1 but .* was made with 0"),
                            (dict(val_split=0.2), "--val-split is 0.2 but .* was made with 0.0")]:
        with pytest.raises(ValueError, match=message):
            fit(TrainConfig(**{"epochs": 1, "out": out, **change}), dataset=data, log=quiet, resume=True)
    assert {n: open(os.path.join(out, n), "rb").read() for n in saved} == saved
    history = fit(TrainConfig(epochs=2, out=out, eval_batch_size=30), dataset=data, log=quiet, resume=True)
    assert [h["epoch"] for h in history] == [1, 2]  # more epochs and another eval batch size may change


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path):
    data = subset(load_dataset("mnist1d"), 400, 100)
    fresh = fit(TrainConfig(epochs=2, out=str(tmp_path / "fresh")), dataset=data, log=quiet)
    out = tmp_path / "killed"
    out.mkdir()  # what a kill after config.json and before the first checkpoint leaves
    (out / "config.json").write_text(json.dumps({**json.load(open(tmp_path / "fresh" / "config.json")),
                                                 "out": str(out)}))
    resumed = fit(TrainConfig(epochs=2, out=str(out)), dataset=data, log=quiet, resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in h]
    assert strip(resumed) == strip(fresh)


def test_checkpoints_are_named_by_path_and_refuse_another_model_by_name(tmp_path):
    data = subset(load_dataset("mnist1d"), 400, 100)
    fit(TrainConfig(epochs=1, out=str(tmp_path)), dataset=data, log=quiet)
    named, step = ckpt.read(ckpt.reader(str(tmp_path / "checkpoints")))  # no live model needed
    assert step == 4
    assert {"params/layers/0/kernel", "params/layers/7/bias", "opt_state/0/mu/layers/0/kernel", "step",
            "key", "loss_sum"} <= set(named)
    assert named["params/layers/0/kernel"].shape == (3, 1, 15) and int(named["step"]) == 4
    config = resolve(TrainConfig(model="mnist1d_deep", out="unused"))
    other, *_ = init_state(config, (40, 1), 10, 4)
    with pytest.raises(ckpt.CheckpointMismatch, match=r"belongs to a different model or optimizer: it lacks "
                                                      r"params/layers/1/bias, .*; it has opt_state/0/mu/layers/0/bias, .*, which this model does not"):
        ckpt.restore_into(other, named)
    config = resolve(TrainConfig(optimizer="sgd", out="unused"))
    sgd, *_ = init_state(config, (40, 1), 10, 4)
    with pytest.raises(ckpt.CheckpointMismatch, match="it lacks opt_state/0/trace/"):
        ckpt.restore_into(sgd, named)
    named["params/layers/0/kernel"] = named["params/layers/0/kernel"][:2]
    same, *_ = init_state(resolve(TrainConfig(out="unused")), (40, 1), 10, 4)
    with pytest.raises(ckpt.CheckpointMismatch, match=r"holds params/layers/0/kernel as float32\[2, 1, 15\], "
                                                      r"this model wants float32\[3, 1, 15\]"):
        ckpt.restore_into(same, named)
    assert ckpt.path_name((jax.tree_util.GetAttrKey("params"), jax.tree_util.DictKey(0),
                           jax.tree_util.GetAttrKey("value"))) == "params/0"


@pytest.mark.x64
def test_steps_per_dispatch_and_a_resume_that_changes_it_give_the_one_step_result(tmp_path, monkeypatch):
    """Three steps per program (cut at epoch ends and at every 5th step's checkpoint, so programs of 1, 2 and 3
    steps), and a run of those killed after its first epoch and resumed with four: every metric and every
    checkpoint array equal those of the one-step-per-dispatch run, up to float64 rounding (XLA fuses a loop's body
    otherwise than the one-step program: 1.4e-15 relative here; in float32, 1.3e-6 after 14 steps). The run of
    three takes it as the platform's default (GPUs' and TPUs' is more than one), which the opening line states."""
    from tests.test_train import Killed
    data = subset(load_dataset("mnist1d"), 800, 200)  # 720 train rows: 7 steps of 100 an epoch
    config = dict(epochs=2, checkpoint_every=5, val_split=0.1, dtype="float64")
    fit(TrainConfig(**config, steps_per_dispatch=1, out=str(tmp_path / "one")), dataset=data, log=quiet)
    lines = []
    with monkeypatch.context() as patch:
        patch.setattr(compiler, "steps_per_dispatch", lambda backend=None: 3)
        fit(TrainConfig(**config, out=str(tmp_path / "three")), dataset=data, log=lines.append)
    assert lines[0].endswith("on 1 cpu device(s), 3 steps per dispatch") and "steps per dispatch" not in lines[1]
    one = outcome(str(tmp_path / "one"))
    assert differences(one, outcome(str(tmp_path / "three")), rtol=1e-12) == []

    def kill_after_first_epoch(line):
        if line.startswith("epoch   1/2"):
            raise Killed
    with pytest.raises(Killed):
        fit(TrainConfig(**config, steps_per_dispatch=3, out=str(tmp_path / "resumed")), dataset=data,
            log=kill_after_first_epoch)
    fit(TrainConfig(**config, steps_per_dispatch=4, out=str(tmp_path / "resumed")), dataset=data, log=quiet,
        resume=True)
    assert differences(one, outcome(str(tmp_path / "resumed")), rtol=1e-12) == []
