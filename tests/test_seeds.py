"""Many seeds in one program (``--seeds K``): each replica is the single-seed run of its seed, the run keeps
every seed's folder and their mean and spread, and stops and resumes like any run."""
import json
import os
import signal

import numpy as np
import pytest

from jaxconv import checkpoints as ckpt
from jaxconv.data import load_dataset
from jaxconv.inference import load
from jaxconv.train import TIMING_FIELDS, Stopped, TrainConfig, fit
from tests.test_train import quiet, subset

LOSSES = ("train_loss", "val_loss", "test_loss")


@pytest.fixture(scope="module")
def data():
    return subset(load_dataset("mnist1d"), 1000, 300)


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("seeds") / "run"
    histories = fit(TrainConfig(epochs=2, seed=5, seeds=3, val_split=0.1, out=str(out)), dataset=data, log=quiet)
    return out, histories


def test_each_replica_is_the_single_seed_run_of_its_seed(tmp_path, data, three_seeds):
    out, histories = three_seeds
    alone = fit(TrainConfig(epochs=2, seed=6, val_split=0.1, out=str(tmp_path / "alone")), dataset=data, log=quiet)
    together = histories[1]
    assert [r["epoch"] for r in together] == [1, 2]
    worst = max(abs(a[k] - b[k]) / abs(a[k]) for a, b in zip(alone, together) for k in LOSSES if k in a)
    assert worst <= 1e-4, (alone, together)
    assert [r["val_accuracy"] for r in together] == [r["val_accuracy"] for r in alone]
    with open(out / "seed_6" / "metrics.jsonl") as f:
        assert [json.loads(line) for line in f] == together
    # the seed's folder is a run of its own: its config says seed 6, one seed; it loads and predicts
    assert json.load(open(out / "seed_6" / "config.json"))["seed"] == 6
    assert json.load(open(out / "seed_6" / "config.json"))["seeds"] == 1
    ours, theirs = load(str(out / "seed_6"), "latest"), load(str(tmp_path / "alone"), "latest")
    np.testing.assert_allclose(ours(data.test.images[:50]), theirs(data.test.images[:50]), rtol=1e-3, atol=1e-4)
    results = json.load(open(out / "seed_6" / "results.json"))
    assert results["latest"]["test_accuracy"] == pytest.approx(
        json.load(open(tmp_path / "alone" / "results.json"))["latest"]["test_accuracy"], abs=2 / 300)


def test_the_seeds_summary_is_the_mean_and_spread_of_the_seed_folders(three_seeds):
    out, histories = three_seeds
    rows = [json.loads(line) for line in open(out / "seeds.jsonl")]
    assert [r["seeds"] for r in rows] == [[5, 6, 7]] * 2
    for epoch, row in enumerate(rows):
        for key in ("train_loss", "val_accuracy"):
            values = [json.loads(open(out / f"seed_{s}" / "metrics.jsonl").readlines()[epoch])[key] for s in (5, 6, 7)]
            assert row[key] == values
            assert row[f"{key}_mean"] == pytest.approx(sum(values) / 3, rel=1e-12)
            assert row[f"{key}_std"] == pytest.approx((sum((v - sum(values) / 3) ** 2 for v in values) / 3) ** 0.5,
                                                      rel=1e-9)
    results = json.load(open(out / "results.json"))
    per_seed = [json.load(open(out / f"seed_{s}" / "results.json"))["latest"]["test_accuracy"] for s in (5, 6, 7)]
    assert results["test_accuracy"] == per_seed
    assert results["test_accuracy_mean"] == pytest.approx(np.mean(per_seed))
    assert (out / "curves.png").stat().st_size > 1000


def test_one_checkpoint_holds_every_seed(three_seeds):
    out, _ = three_seeds
    named, step = ckpt.read(ckpt.reader(str(out / "checkpoints")))
    assert step == 2 * 9  # 900 training examples in batches of 100
    assert named["params/layers/0/kernel"].shape == (3, 3, 1, 15)  # the seeds stacked in front
    seed6, _ = ckpt.read(ckpt.reader(str(out / "seed_6" / "checkpoints")))
    np.testing.assert_array_equal(seed6["params/layers/0/kernel"], named["params/layers/0/kernel"][1])
    best, best_step = ckpt.read(ckpt.reader(str(out / "seed_6" / "best")))
    assert best_step == max(json.loads(line)["step"] for line in open(out / "seed_6" / "metrics.jsonl")
                            if json.loads(line)["val_accuracy"] == max(json.loads(x)["val_accuracy"]
                                                                       for x in open(out / "seed_6" / "metrics.jsonl")))
    assert set(best) == set(seed6)


def test_a_stopped_many_seed_run_resumes_to_the_same_end(tmp_path, data):
    whole = fit(TrainConfig(epochs=2, seeds=2, out=str(tmp_path / "whole")), dataset=data, log=quiet)

    def preempt(line):
        if line.startswith("epoch   1/"):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Stopped, match="stopped by SIGTERM after step 10 .*--resume"):
        fit(TrainConfig(epochs=2, seeds=2, out=str(tmp_path / "cut")), dataset=data, log=preempt)
    resumed = fit(TrainConfig(epochs=2, seeds=2, out=str(tmp_path / "cut")), dataset=data, log=quiet, resume=True)
    strip = lambda hs: [[{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in h] for h in hs]
    assert strip(resumed) == strip(whole)


def test_a_many_seed_run_is_refused_like_any_run(tmp_path, data):
    fit(TrainConfig(epochs=1, seeds=2, out=str(tmp_path)), dataset=data, log=quiet)
    with pytest.raises(ValueError, match=r"already holds a run \(config.json, checkpoints, .*seeds.jsonl, seed_0, "
                                         r"seed_1\); pass --resume"):
        fit(TrainConfig(epochs=1, seeds=2, out=str(tmp_path)), dataset=data, log=quiet)
    with pytest.raises(ValueError, match="--resume: --seeds is 3 but the run .* was made with 2"):
        fit(TrainConfig(epochs=1, seeds=3, out=str(tmp_path)), dataset=data, log=quiet, resume=True)
    with pytest.raises(ValueError, match="--seeds must be >= 1, got 0"):
        fit(TrainConfig(seeds=0, out=str(tmp_path / "none")))


def test_vmapped_replicas_train_as_the_single_seed_runs_too(tmp_path, data, monkeypatch):
    """The strategy GPUs and TPUs get (jax.vmap; grouped convolutions): the same runs up to float32 rounding."""
    monkeypatch.setenv("JAXCONV_REPLICAS", "vmap")
    small = subset(data, 500, 100)
    together = fit(TrainConfig(epochs=2, seeds=2, out=str(tmp_path / "two")), dataset=small, log=quiet)
    alone = fit(TrainConfig(epochs=2, seed=1, out=str(tmp_path / "one")), dataset=small, log=quiet)
    worst = max(abs(a[k] - b[k]) / abs(a[k]) for a, b in zip(alone, together[1]) for k in LOSSES if k in a)
    assert worst <= 1e-4
