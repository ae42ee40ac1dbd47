"""Short real training runs: loss goes down, resume is exact, NaN stops, manual == auto gradients."""
import io
import json
import os
import pickle
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxconv.data import Dataset, Split, load_dataset
from jaxconv.train import TrainConfig, TrainingDiverged, fit, init_state, make_steps, resolve
from jaxconv.data import DATASETS
from tests.conftest import SHARED_DATA
from tests.test_data import MNIST_DIR, needs_mnist

CIFAR_JPEG = os.path.join(SHARED_DATA, "cifar10-jpeg.tar.gz")
quiet = lambda *args: None


def subset(data: Dataset, n_train, n_test):
    return Dataset(data.name, Split(data.train.images[:n_train], data.train.labels[:n_train]),
                   Split(data.test.images[:n_test], data.test.labels[:n_test]), data.source)


def losses_fall(history):
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"], history
    assert history[-1]["test_accuracy"] > 0.2  # well above the 10 % of chance


def test_mnist1d_family(tmp_path):
    data = subset(load_dataset("mnist1d"), 1000, 300)
    history = fit(TrainConfig(epochs=10, out=str(tmp_path)), dataset=data, log=quiet)
    losses_fall(history)
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["epoch"] for l in lines] == list(range(1, 11))
    assert all(set(l) == {"epoch", "step", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                          "images_per_s", "images_per_s_per_device", "wall_s", "devices", "device_kind",
                          "processes"} for l in lines)  # one record shape
    assert (lines[0]["devices"], lines[0]["device_kind"], lines[0]["processes"]) == (1, "cpu", 1)
    assert lines[0]["images_per_s_per_device"] == lines[0]["images_per_s"]
    matrix = np.loadtxt(tmp_path / "confusion_matrix.csv", delimiter=",", skiprows=1, usecols=range(1, 11))
    assert matrix.sum() == 300  # every test example counted once
    assert json.load(open(tmp_path / "results.json"))["latest"]["test_accuracy"] == lines[-1]["test_accuracy"]
    assert (tmp_path / "curves.png").stat().st_size > 1000


@needs_mnist
def test_mnist_family_on_real_digits(tmp_path):
    data = subset(load_dataset("mnist", data_dir=MNIST_DIR), 1024, 500)
    history = fit(TrainConfig(dataset="mnist", model="lenet5", epochs=3, batch_size=64, out=str(tmp_path)),
                  dataset=data, log=quiet)
    losses_fall(history)


def real_cifar_slice(folder, per_class=20):
    """A few real CIFAR-10 images per class, from the shared JPEG archive, as official pickles."""
    from PIL import Image
    wanted = {"train": per_class, "test": per_class // 2}
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    got = {s: {c: [] for c in classes} for s in wanted}
    with tarfile.open(CIFAR_JPEG) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and len(got[parts[0]][parts[1]]) < wanted[parts[0]]:
                img = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                got[parts[0]][parts[1]].append(img)
    os.makedirs(folder, exist_ok=True)
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        x = np.stack([img for c in classes for img in got[split][c]])
        y = [i for i, c in enumerate(classes) for _ in got[split][c]]
        order = np.random.default_rng(0).permutation(len(x))
        rows = x[order].transpose(0, 3, 1, 2).reshape(len(x), 3072)
        for k, name in enumerate(names):
            sl = slice(k * len(x) // len(names), (k + 1) * len(x) // len(names))
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump({b"data": rows[sl], b"labels": [y[i] for i in order[sl]]}, f)


@pytest.mark.skipif(not os.path.exists(CIFAR_JPEG), reason="../shared/data/cifar10-jpeg.tar.gz not present")
def test_cifar_family_on_real_images(tmp_path):
    real_cifar_slice(str(tmp_path / "data" / "cifar-10-batches-py"))
    history = fit(TrainConfig(dataset="cifar10", epochs=6, batch_size=20, lr=3e-3, data_dir=str(tmp_path / "data"),
                              out=str(tmp_path / "run")), log=quiet)
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"], history


def test_tfds_mock_family(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        data = load_dataset("fashion_mnist", source="tfds")
    history = fit(TrainConfig(dataset="fashion_mnist", model="lenet5", epochs=5, batch_size=16, lr=3e-3,
                              out=str(tmp_path)), dataset=data, log=quiet)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


class Killed(Exception):
    pass


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    data = subset(load_dataset("mnist1d"), 800, 200)
    config = dict(epochs=3, crop=2, out=None)
    full = fit(TrainConfig(**{**config, "out": str(tmp_path / "full")}), dataset=data, log=quiet)

    def kill_after_first_epoch(line):
        if line.startswith("epoch   1/3"):
            raise Killed  # after epoch 1's checkpoint was written, before epoch 2 starts
    run = TrainConfig(**{**config, "out": str(tmp_path / "killed")})
    with pytest.raises(Killed):
        fit(run, dataset=data, log=kill_after_first_epoch)
    resumed = fit(run, dataset=data, log=quiet, resume=True)
    assert [h["epoch"] for h in resumed] == [1, 2, 3]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert resumed[-1][key] == full[-1][key], key


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    data = subset(load_dataset("mnist1d"), 400, 100)
    corrupt = subset(data, 400, 100)
    corrupt.train.images = corrupt.train.images.copy()
    corrupt.train.images[17, 5, 0] = np.nan  # a corrupt sample: its batch's loss is NaN
    messages = []
    for per_dispatch in (1, 3):  # the same step named whether steps run one or three to a program
        out = str(tmp_path / str(per_dispatch))
        fit(TrainConfig(epochs=1, out=out), dataset=data, log=quiet)  # one good epoch: 4 steps
        with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at step \d+ \(epoch 2\); training "
                                                   r"stopped\. The last good checkpoint is step 4") as caught:
            fit(TrainConfig(epochs=3, steps_per_dispatch=per_dispatch, out=out), dataset=corrupt, log=quiet,
                resume=True)
        assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["4"]
        messages.append(str(caught.value).replace(out, "OUT"))
    assert messages[0] == messages[1]


@pytest.mark.x64
def test_manual_and_auto_training_agree_step_by_step():
    data = subset(load_dataset("mnist1d"), 500, 100)
    losses = {}
    for grad in ("auto", "manual"):
        config = resolve(TrainConfig(grad=grad, dtype="float64", crop=2, batch_size=50, out="unused"))
        info = DATASETS["mnist1d"]
        state, g_train, g_eval, tx = init_state(config, (40, 1), 10, steps_per_epoch=10)
        train_step, _ = make_steps(g_train, g_eval, tx, config, info)
        images, labels = jnp.asarray(data.train.images, jnp.float64), jnp.asarray(data.train.labels)
        order = jnp.arange(500).reshape(10, 50)
        trace = []
        for i in range(50):
            state, loss = train_step(state, images, labels, order, i % 10)
            trace.append(float(loss))
        losses[grad] = np.array(trace)
    assert np.max(np.abs(losses["manual"] - losses["auto"]) / np.abs(losses["auto"])) <= 1e-9
    assert losses["auto"][-1] < losses["auto"][0]


def test_resolve_fills_recipes_and_rejects_bad_values():
    c = resolve(TrainConfig())
    assert (c.model, c.optimizer, c.out) == ("mnist1d_cnn", "adam", os.path.join("runs", "mnist1d_mnist1d_cnn_s0"))
    assert resolve(TrainConfig(model="mnist1d_deep")).epochs == 30
    for bad, message in [(dict(epochs=-1), "--epochs must be >= 0, got -1"), (dict(lr=0.0), "--lr must be > 0"),
                         (dict(model="vgg99"), "unknown model 'vgg99'"), (dict(dataset="svhn"), "unknown dataset")]:
        with pytest.raises(ValueError, match=message):
            resolve(TrainConfig(**bad))


def test_bfloat16_compute_trains(tmp_path):
    data = subset(load_dataset("mnist1d"), 1000, 200)
    history = fit(TrainConfig(epochs=10, dtype="bfloat16", out=str(tmp_path)), dataset=data, log=quiet)
    losses_fall(history)


@needs_mnist
def test_per_pixel_training_and_its_accuracy_over_a_padded_last_batch(tmp_path):
    """unet_small on mnist_seg (each pixel: background or 1 + its digit). The reported test accuracy must
    be the share of correct pixels, counted here from the saved model's predictions with NumPy, over
    an evaluation whose last batch is padded (130 test images in batches of 50)."""
    import jaxconv
    data = subset(load_dataset("mnist_seg", data_dir=MNIST_DIR), 512, 130)
    np.testing.assert_array_equal(data.train.labels[0] > 0, data.train.images[0, ..., 0] >= 128)
    assert set(np.unique(data.train.labels)) <= set(range(11))
    config = TrainConfig(dataset="mnist_seg", epochs=2, eval_batch_size=50, out=str(tmp_path))
    history = fit(config, dataset=data, log=quiet)
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    module = jaxconv.load(str(tmp_path)).module  # the bare network: normalised here, independently
    x = (data.test.images.astype(np.float32) / 255 - 0.1307) / 0.3081
    pred = np.argmax(np.asarray(nnx.jit(lambda m, x: m(x))(module, x)), -1)  # one program, not op by op
    assert pred.shape == (130, 28, 28)
    assert history[-1]["test_accuracy"] == pytest.approx(np.mean(pred == data.test.labels), abs=1e-6)
    matrix = np.loadtxt(tmp_path / "confusion_matrix.csv", delimiter=",", skiprows=1, usecols=range(1, 12))
    assert matrix.shape == (11, 11) and matrix.sum() == 130 * 28 * 28
    assert open(tmp_path / "confusion_matrix.csv").readline().startswith("true\\predicted,background,0,1,")
    with pytest.raises(ValueError, match="--crop and --flip move pixels away from their per-pixel labels"):
        resolve(TrainConfig(dataset="mnist_seg", crop=2))
    with pytest.raises(ValueError, match="unet_small predicts a class per position and mnist labels whole examples; "
                                         "datasets for it: mnist_seg"):
        resolve(TrainConfig(dataset="mnist", model="unet_small"))
    with pytest.raises(ValueError, match="lenet5 predicts one class per example and mnist_seg labels every pixel"):
        resolve(TrainConfig(dataset="mnist_seg", model="lenet5"))


def test_a_run_folder_is_never_replaced_without_consent(tmp_path):
    """A second run into a folder holding a run refuses and touches nothing; --overwrite replaces it, but
    only after the new run is validated (a bad model leaves the old run whole)."""
    data = subset(load_dataset("mnist1d"), 200, 100)
    out = str(tmp_path / "run")
    fit(TrainConfig(epochs=1, out=out), dataset=data, log=quiet)
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    ckpts = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    with pytest.raises(ValueError, match=r"already holds a run \(config.json, metrics.jsonl, checkpoints, results.json, "
                                         r"confusion_matrix.csv, curves.png, tensorboard\); "
                                         r"pass --resume to continue it, or --overwrite to replace it"):
        fit(TrainConfig(epochs=2, out=out), dataset=data, log=quiet)
    with pytest.raises(ValueError, match="create_model: lenet5 takes 2-D inputs"):
        fit(TrainConfig(epochs=2, model="lenet5", out=out), dataset=data, log=quiet, overwrite=True)
    with pytest.raises(ValueError, match="give one of them"):
        fit(TrainConfig(epochs=2, out=out), dataset=data, log=quiet, overwrite=True, resume=True)
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ckpts
    history = fit(TrainConfig(epochs=2, seed=3, out=out), dataset=data, log=quiet, overwrite=True)
    assert [h["epoch"] for h in history] == [1, 2]
    assert json.load(open(tmp_path / "run" / "config.json"))["seed"] == 3
    assert not (tmp_path / "run" / "config.json.tmp").exists()
    assert len(os.listdir(tmp_path / "run" / "tensorboard")) == 1  # the old run's event file went with it


def test_epoch_train_metrics_are_the_mean_over_every_step_of_the_epoch(tmp_path):
    """With a learning rate too small to move the weights and no augmentation, an epoch's training loss and
    accuracy are those of the initial model over the whole training set, computed here independently:
    the bare network on NumPy-normalised inputs, cross-entropy and argmax in NumPy."""
    import jaxconv
    data = subset(load_dataset("mnist1d"), 600, 100)
    history = fit(TrainConfig(epochs=1, lr=1e-30, schedule="constant", crop=0, batch_size=100, out=str(tmp_path)),
                  dataset=data, log=quiet)
    module = jaxconv.load(str(tmp_path)).module
    logits = np.asarray(module(jnp.asarray(data.train.images)), np.float64)  # MNIST-1D: mean 0, std 1
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    loss = -np.mean(log_p[np.arange(600), data.train.labels])
    assert history[0]["train_loss"] == pytest.approx(loss, rel=1e-5)
    assert history[0]["train_accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == data.train.labels), abs=1e-9)
    assert history[0]["lr"] == pytest.approx(1e-30)


def test_resolve_rejects_settings_that_do_not_apply():
    for bad, message in [
        (dict(warmup_epochs=-1), "--warmup-epochs must be >= 0, got -1"),
        (dict(epochs=5, warmup_epochs=5), r"--warmup-epochs 5 is not shorter than the run \(5 epochs\)"),
        (dict(schedule="constant", warmup_epochs=1), "--warmup-epochs needs --schedule cosine or onecycle"),
        (dict(flip=True), "--flip mirrors images left to right; mnist1d's examples are 1-D: give --no-flip"),
        (dict(val_split=1.0), r"--val-split must be in \[0, 1\), got 1.0"),
        (dict(test_every_epoch=True), "--test-every-epoch adds the test set to the per-epoch validation"),
        (dict(checkpoint_every=-2), "--checkpoint-every must be >= 0 steps, got -2"),
        (dict(steps_per_dispatch=0), "--steps-per-dispatch must be >= 1, got 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve(TrainConfig(**bad))
    assert resolve(TrainConfig(epochs=5, warmup_epochs=4.5)).warmup_epochs == 4.5


def test_a_terminal_gets_a_progress_bar_with_rate_and_eta(tmp_path, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    fit(TrainConfig(epochs=1, out=str(tmp_path)), dataset=subset(load_dataset("mnist1d"), 400, 100), log=quiet)
    shown = screen.getvalue()
    assert "epoch 1/1:" in shown and "4/4" in shown  # 400 examples in steps of 100
    assert "step/s" in shown or "s/step" in shown  # the rate
    assert "<" in shown  # tqdm's "elapsed<remaining"
