"""Recipes as files (``configs/*.py``, installed as ``jaxconv.configs``): what each holds, how
``--dataset``/``--model`` find them, and ``jaxconv train --config`` with flags on top."""
import dataclasses
import json
import os

import pytest

from jaxconv.cli import main
from jaxconv.config import RECIPE_FIELDS, TrainConfig, recipes, resolve
from jaxconv.data import DATASETS
from jaxconv.models import MODELS

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def test_every_dataset_has_a_recipe_file_and_every_file_is_complete_and_documented():
    found = recipes()
    assert set(DATASETS) <= set(found)
    pairs = [(c.dataset, c.model) for c in found.values()]
    assert len(pairs) == len(set(pairs)), "two recipe files for one dataset and model"
    for name, config in found.items():
        assert isinstance(config, TrainConfig) and config.model in MODELS and config.dataset in DATASETS, name
        assert all(getattr(config, k) is not None for k in RECIPE_FIELDS), name
        assert resolve(config) is not None   # every value passes the checks
        text = open(os.path.join(CONFIGS, f"{name}.py")).read()
        assert "jaxconv train" in text and "CPU" in text, f"configs/{name}.py: its docstring gives no command or cost"
    assert set(os.listdir(CONFIGS)) >= {f"{name}.py" for name in found}


def test_dataset_and_model_flags_find_their_recipe():
    # He et al.'s optimiser for resnet20 on CIFAR-10 (configs/cifar10_resnet20.py), written out here
    r20 = resolve(TrainConfig(dataset="cifar10", model="resnet20"))
    assert (r20.optimizer, r20.lr, r20.weight_decay, r20.batch_size, r20.crop, r20.flip, r20.epochs,
            r20.label_smoothing) == ("nesterov", 0.1, 5e-4, 128, 4, True, 60, 0.1)
    # the dataset's own file for its default model, and for a model with no file of its own
    assert resolve(TrainConfig(dataset="cifar10")).model == "convnetjs_cifar"
    vgg = resolve(TrainConfig(dataset="cifar10", model="cifar_vgg"))
    assert (vgg.model, vgg.optimizer, vgg.lr, vgg.epochs) == ("cifar_vgg", "adam", 4e-3, 70)
    assert resolve(TrainConfig(dataset="mnist1d", model="mnist1d_deep")).epochs == 30
    # a flag beats the recipe
    assert resolve(TrainConfig(dataset="cifar10", model="resnet20", lr=0.05)).lr == 0.05


def test_train_config_file_with_flags_on_top(tmp_path, capsys):
    path = tmp_path / "my_config.py"
    path.write_text(
        "from jaxconv.config import TrainConfig\n"
        "def get_config():\n"
        "    return TrainConfig(dataset='mnist1d', model='mnist1d_cnn', epochs=5, batch_size=250, optimizer='sgd',\n"
        "                       lr=0.0123, schedule='constant', warmup_epochs=0, weight_decay=0.0,\n"
        "                       label_smoothing=0.05, crop=0, flip=False)\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--epochs", "1", "--out", str(out)]) == 0
    stored = json.load(open(out / "config.json"))
    assert (stored["epochs"], stored["lr"], stored["optimizer"], stored["batch_size"], stored["label_smoothing"]) == (
        1, 0.0123, "sgd", 250, 0.05)
    opening = capsys.readouterr().out
    assert "sgd lr 0.0123 constant; weight decay 0; label smoothing 0.05; augmentation none" in opening
    assert len(json.load(open(out / "results.json"))) > 0


def test_a_bundled_recipe_by_name(tmp_path):
    out = tmp_path / "deep"
    assert main(["train", "--config", "mnist1d_deep", "--epochs", "1", "--out", str(out)]) == 0
    stored = json.load(open(out / "config.json"))
    assert stored["model"] == "mnist1d_deep" and stored["lr"] == 0.01


@pytest.mark.parametrize("content, message", [
    (None, "--config {path}: no such file (bundled recipes: cifar10, cifar10_resnet20,"),
    ("x = 1\n", "--config {path}: the file defines no get_config()"),
    ("def get_config():\n    return {'lr': 1}\n", "--config {path}: get_config() must return a jaxconv.config.TrainConfig, got dict"),
    ("import no_such_module_here\n", "--config {path}: ModuleNotFoundError: No module named 'no_such_module_here'"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "c.py"
    if content is not None:
        path.write_text(content)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message.format(path=path) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_config_with_resume_is_refused(tmp_path, capsys):
    assert main(["train", "--config", "mnist1d", "--resume", "--out", str(tmp_path / "r")]) == 2
    assert "--config starts a run; --resume continues one" in capsys.readouterr().err


def test_a_recipe_file_is_a_plain_dataclass_a_user_can_copy():
    config = recipes()["cifar10_resnet20"]
    assert dataclasses.replace(config, epochs=60).epochs == 60


# Each recipe as it was when its result was measured, and that result, which its docstring and the README report.
MEASURED = {
    "mnist1d": (("mnist1d_cnn", 120, 100, "adam", 0.01, "cosine", 0, 0.0, 0.0, 4, False), "94.50 %"),
    "mnist1d_deep": (("mnist1d_deep", 30, 100, "adam", 0.01, "cosine", 0, 0.0, 0.0, 4, False), "99.00 %"),
    "mnist": (("mnist_cnn", 12, 64, "adam", 2e-3, "onecycle", 0, 0.0, 0.1, 2, False), "99.10 %"),
    "fashion_mnist": (("seed_cnn", 15, 128, "adam", 2e-3, "onecycle", 0, 0.0, 0.1, 0, True), "93.15 %"),
    "cifar10": (("convnetjs_cifar", 70, 128, "adam", 4e-3, "onecycle", 0, 0.0, 0.0, 2, True), "75.64 %"),
    "cifar10_resnet20": (("resnet20", 60, 128, "nesterov", 0.1, "onecycle", 0, 5e-4, 0.1, 4, True), "88.66 %"),
    "mnist_seg": (("unet_small", 4, 64, "adam", 3e-3, "onecycle", 0, 0.0, 0.0, 0, False), "91.41 %"),
}


def test_every_recipe_is_the_one_whose_measured_result_its_docstring_and_the_readme_give():
    """A recipe changed without measuring it again would leave its documented result standing for another run."""
    with open(os.path.join(CONFIGS, "..", "README.md")) as f:
        readme = f.read()
    assert set(recipes()) == set(MEASURED)
    for name, config in recipes().items():
        values, result = MEASURED[name]
        assert tuple(getattr(config, k) for k in RECIPE_FIELDS) == values, (
            f"configs/{name}.py differs from the recipe that measured {result}: measure it again, then update its "
            f"docstring, the README and MEASURED")
        assert result in open(os.path.join(CONFIGS, f"{name}.py")).read(), name
        assert result in readme, name
