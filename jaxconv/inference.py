"""Use a trained run: ``jaxconv.load(run_dir)`` gives a callable model with its normalisation inside.

>>> model = jaxconv.load("runs/mnist_mnist_cnn_s0")
>>> logits = model(images)              # uint8 [N, 28, 28, 1] (or one image [28, 28, 1] / [28, 28])
>>> model.top(images, k=3)              # [[('7', 0.98), ('9', 0.01), ('1', 0.003)], ...]

Inputs are what the dataset holds: uint8 pixels, or floats in [0, 1] (uint8 / 255, as torchvision's
``ToTensor`` gives); MNIST-1D takes its float values as they are. The model normalises them with the
training set's mean and standard deviation, exactly as the training step did.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxconv import checkpoints as ckpt
from jaxconv import runs
from jaxconv.data import DATASETS
from jaxconv.steps import build_model, normalise


def read_weights(out: str, which: str = "auto"):
    """``(config, model, checkpoint)`` of the run in ``out``: the model (eval mode) holds the weights of its
    ``which`` checkpoint: ``"best"`` (by validation accuracy), ``"latest"``, or ``"auto"`` (best when the
    run kept one). ``checkpoint`` is ``{"which", "step", "epoch"}``."""
    if which not in ("auto", "best", "latest"):
        raise ValueError(f"which must be auto, best or latest, got {which!r}")
    config = runs.load_config(out)
    info = DATASETS[config.dataset]
    managers = {name: ckpt.reader(os.path.join(out, folder))
                for name, folder in (("best", "best"), ("latest", "checkpoints"))
                if os.path.isdir(os.path.join(out, folder))}
    if which == "auto":
        which = "best" if "best" in managers and managers["best"].latest_step() is not None else "latest"
    named, step = ckpt.read(managers[which]) if which in managers else ({}, None)
    if step is None:
        raise ValueError(f"{out} has no {which} checkpoint" + (" (the run kept a best checkpoint only with "
                                                              "--val-split)" if which == "best" else ""))
    model = build_model(config, info.input_shape, info.num_classes)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    wanted = {name: value for name, value in named.items() if name.split("/")[0] in ("params", "model_state")}
    restored = ckpt.restore_into({"params": params, "model_state": rest}, wanted,
                                 where=f"the {which} checkpoint (step {step}) in {out}")
    model = nnx.merge(graphdef, restored["params"], restored["model_state"])
    epoch_steps = [h["step"] for h in runs.read_metrics(out)]
    epoch = next((i + 1 for i, s in enumerate(epoch_steps) if s == step), None)
    return config, model, {"which": which, "step": step, "epoch": epoch}


class Classifier:
    """A trained model: ``model(images) -> logits``, with the run's input normalisation inside.

    ``class_names``, ``input_shape``, ``config`` (the run's :class:`~jaxconv.config.TrainConfig`),
    ``checkpoint`` (which one was loaded) and ``module`` (the Flax NNX model) describe it."""

    def __init__(self, config, module, checkpoint, batch_size: int = 1000):
        self.config, self.module, self.checkpoint, self.batch_size = config, module, checkpoint, batch_size
        info = DATASETS[config.dataset]
        self.info, self.class_names, self.input_shape = info, info.classes, info.input_shape
        real = jnp.float64 if config.dtype == "float64" else jnp.float32
        self._mean, self._std = jnp.asarray(info.mean, real), jnp.asarray(info.std, real)
        graphdef, state = nnx.split(module)
        self._apply = jax.jit(lambda st, x: nnx.merge(graphdef, st)(self.normalised(x)).astype(real))
        self._state = state

    def normalised(self, batch):
        """A batch from :meth:`prepare` as the network sees it: the run's input normalisation applied."""
        return normalise(jnp.asarray(batch), self._mean, self._std)

    def __repr__(self):
        c = self.checkpoint
        return (f"Classifier({self.config.model} on {self.config.dataset}, {c['which']} checkpoint: step {c['step']}"
                + (f", epoch {c['epoch']}" if c["epoch"] else "") + ")")

    def prepare(self, images) -> tuple[np.ndarray, bool]:
        """``(batch, was_one_example)``; ``ValueError`` for a shape or value range the model cannot take."""
        x = np.asarray(images)
        shape = self.input_shape
        one = x.shape == shape or (shape[-1] == 1 and x.shape == shape[:-1])
        if one:
            x = x[None]
        if shape[-1] == 1 and x.shape[1:] == shape[:-1]:
            x = x[..., None]
        if x.shape[1:] != shape:
            raise ValueError(f"{self.config.model} on {self.config.dataset} takes examples of shape {shape} "
                             f"(or a batch [N, {', '.join(map(str, shape))}]); got {tuple(np.shape(images))}")
        if x.dtype == np.uint8:
            return x, one
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"images must be uint8 or floating point, got {x.dtype}")
        if self.info.pixels and x.size and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"float images are read as pixel values in [0, 1] (uint8 / 255); these span "
                             f"[{x.min():g}, {x.max():g}]: pass uint8 pixels, or divide by 255")
        return x.astype(np.float32), one

    def __call__(self, images) -> np.ndarray:
        """Logits: ``[N, classes]`` for a batch, ``[classes]`` for one example (per position for dense models)."""
        x, one = self.prepare(images)
        parts = [np.asarray(self._apply(self._state, x[i:i + self.batch_size]))
                 for i in range(0, len(x), self.batch_size)]
        logits = np.concatenate(parts) if parts else np.zeros((0,) + (len(self.class_names),), np.float32)
        return logits[0] if one else logits

    def probabilities(self, images) -> np.ndarray:
        return np.asarray(jax.nn.softmax(jnp.asarray(self(images)), axis=-1))

    def top(self, images, k: int = 3):
        """The ``k`` likeliest classes of each example, as ``(name, probability)`` pairs."""
        if DATASETS[self.config.dataset].per_pixel:
            raise ValueError(f"{self.config.model} labels every pixel; use probabilities() for its per-pixel maps")
        p = self.probabilities(images)
        single = p.ndim == 1
        p = np.atleast_2d(p)
        best = np.argsort(-p, axis=-1, kind="stable")[:, :k]
        ranked = [[(self.class_names[j], float(row[j])) for j in idx] for row, idx in zip(p, best)]
        return ranked[0] if single else ranked


def load(out: str, which: str = "auto") -> Classifier:
    """The trained model of the run in ``out`` (see :class:`Classifier`); ``which``: auto | best | latest."""
    config, module, checkpoint = read_weights(out, which)
    return Classifier(config, module, checkpoint, batch_size=config.eval_batch_size)


def read_image(path: str, input_shape) -> np.ndarray:
    """A PNG/JPEG (grey or colour as the model wants) or a ``.npy`` file, as an array for :class:`Classifier`."""
    if path.lower().endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"{path}: not a readable .npy file ({err})") from err
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img = img.convert("L" if input_shape[-1] == 1 else "RGB")
            pixels = np.asarray(img)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not an image PIL can read ({err})") from err
    if pixels.shape[:2] != tuple(input_shape[:2]):
        raise ValueError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} pixels; the model takes "
                         f"{input_shape[1]}x{input_shape[0]} (resize it first)")
    return pixels.reshape(input_shape)
