"""A trained model you can use: jaxconv.load, jaxconv predict, the validation split, the best checkpoint."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxconv
from jaxconv.cli import main
from jaxconv.data import load_dataset
from jaxconv.train import TrainConfig, fit
from tests.test_data import MNIST_DIR, needs_mnist
from tests.test_train import quiet, subset


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """A LeNet-5 trained for two epochs on 1,000 real digits, 10 % held out for validation."""
    out = str(tmp_path_factory.mktemp("run"))
    data = subset(load_dataset("mnist", data_dir=MNIST_DIR), 1000, 250)
    history = fit(TrainConfig(dataset="mnist", model="lenet5", epochs=2, batch_size=50, val_split=0.1,
                              eval_batch_size=64, out=out), dataset=data, log=quiet)
    return out, data, history


@needs_mnist
def test_load_normalises_inside_and_matches_the_run(mnist_run):
    out, data, history = mnist_run
    model = jaxconv.load(out)
    results = json.load(open(os.path.join(out, "results.json")))
    best_epoch = int(np.argmax([h["val_accuracy"] for h in history])) + 1
    assert model.checkpoint == {"which": "best", "step": 18 * best_epoch, "epoch": best_epoch}
    assert model.class_names == tuple("0123456789") and model.input_shape == (28, 28, 1)
    x = data.test.images
    logits = model(x)
    normalised = jnp.asarray((x.astype(np.float32) / 255 - 0.1307) / 0.3081)
    by_hand = np.asarray(nnx.jit(lambda m, x: m(x))(model.module, normalised))  # one program, not op by op
    np.testing.assert_allclose(logits, by_hand, rtol=1e-5, atol=1e-5)
    assert np.mean(logits.argmax(-1) == data.test.labels) == pytest.approx(results["best"]["test_accuracy"], abs=1e-9)
    np.testing.assert_allclose(model(x.astype(np.float32) / 255), logits, rtol=1e-5, atol=1e-5)  # floats in [0, 1]
    np.testing.assert_allclose(model(x[3]), logits[3], rtol=1e-5, atol=1e-5)  # one example, with its channel
    np.testing.assert_allclose(model(x[3, ..., 0]), logits[3], rtol=1e-5, atol=1e-5)  # or without
    latest = jaxconv.load(out, "latest")
    assert latest.checkpoint["step"] == 36
    acc = np.mean(latest(x).argmax(-1) == data.test.labels)
    assert acc == pytest.approx(results["latest"]["test_accuracy"], abs=1e-9)
    top = model.top(x[:2], k=3)
    p = model.probabilities(x[:2])
    assert [name for name, _ in top[0]] == [str(j) for j in np.argsort(-p[0])[:3]]
    assert top[0][0][1] == pytest.approx(p[0].max()) and top[0][0][1] >= top[0][1][1] >= top[0][2][1]
    np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-6)


@needs_mnist
def test_load_refuses_inputs_it_would_misread(mnist_run):
    out, data, _ = mnist_run
    model = jaxconv.load(out)
    with pytest.raises(ValueError, match=r"float images are read as pixel values in \[0, 1\] \(uint8 / 255\); "
                                         r"these span \[0, 255\]: pass uint8 pixels, or divide by 255"):
        model(data.test.images.astype(np.float32))
    with pytest.raises(ValueError, match=r"lenet5 on mnist takes examples of shape \(28, 28, 1\) .* got \(32, 32, 3\)"):
        model(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="images must be uint8 or floating point, got int64"):
        model(np.zeros((28, 28), np.int64))
    with pytest.raises(ValueError, match="has no best checkpoint"):
        _no_best(out)


def _no_best(out):
    import shutil
    import tempfile
    copy = tempfile.mkdtemp()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(os.path.join(out, name), copy)
    shutil.copytree(os.path.join(out, "checkpoints"), os.path.join(copy, "checkpoints"))
    assert jaxconv.load(copy).checkpoint["which"] == "latest"  # auto falls back to the latest
    jaxconv.load(copy, "best")


@needs_mnist
def test_predict_classifies_png_files(mnist_run, tmp_path, capsys):
    from PIL import Image
    out, data, _ = mnist_run
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(data.test.images[i, ..., 0]).save(paths[-1])
    np.save(tmp_path / "two.npy", data.test.images[3:5])
    assert main(["predict", "--out", out, *paths, str(tmp_path / "two.npy"), "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("Classifier(lenet5 on mnist, best checkpoint")
    expected = jaxconv.load(out)(data.test.images[:5]).argmax(-1)
    names = [line.split(": ")[1].split()[0] for line in lines[1:]]
    assert names == [str(k) for k in expected]
    assert lines[4].startswith(f"{tmp_path / 'two.npy'}[0]: ") and len(lines[1].split(", ")) == 2
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "small.png")
    assert main(["predict", "--out", out, str(tmp_path / "small.png")]) == 2
    assert "small.png is 20x20 pixels; the model takes 28x28 (resize it first)" in capsys.readouterr().err


def test_records_with_validation_keep_one_shape_and_the_test_set_for_the_end(tmp_path):
    data = subset(load_dataset("mnist1d"), 500, 120)
    history = fit(TrainConfig(epochs=2, val_split=0.2, test_every_epoch=True, out=str(tmp_path)), dataset=data,
                  log=quiet)
    keys = {"epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss",
            "test_accuracy", "images_per_s", "images_per_s_per_device", "wall_s", "devices", "device_kind", "processes"}
    assert all(set(h) == keys for h in history)
    assert history[-1]["step"] == 2 * 4  # 400 training examples in batches of 100
    results = json.load(open(tmp_path / "results.json"))
    assert results["latest"]["test_accuracy"] == history[-1]["test_accuracy"]
