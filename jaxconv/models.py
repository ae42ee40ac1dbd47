"""Named architectures built from :mod:`jaxconv.layers`, reachable by name.

    model = create_model("lenet5", seed=0)              # input [N, 28, 28, 1]
    model = create_model("seed_cnn", input_shape=(32, 32, 3), grad="manual")

Every model is a :class:`Sequential`, so shape arithmetic, receptive fields, the summary table and
hand-written backprop can walk its layers in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax.numpy as jnp
from flax import nnx

from jaxconv import layers as L


class Sequential(nnx.Module):
    """Layers applied in order; remembers the per-example input shape it was built for."""

    def __init__(self, layers, *, input_shape, name: str = "sequential"):
        self.layers = nnx.List(list(layers))
        self.input_shape = tuple(input_shape)
        self.name = name

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def shapes(self, input_shape=None):
        """Per-example output shape after each layer (shape arithmetic only, nothing runs)."""
        shape, out = tuple(input_shape or self.input_shape), []
        for layer in self.layers:
            shape = layer.output_shape(shape)
            out.append(shape)
        return out


class _Stack:
    """Builds a layer list while tracking the activation shape, so Dense sizes are derived."""

    def __init__(self, input_shape, *, grad, dtype, param_dtype, rngs):
        self.shape, self.layers = tuple(input_shape), []
        self.common = dict(grad=grad)
        self.rngs = rngs
        self.params = dict(dtype=dtype, param_dtype=param_dtype)

    def add(self, layer):
        self.shape = layer.output_shape(self.shape)
        self.layers.append(layer)
        return self

    def conv(self, features, kernel, **options):
        return self.add(L.Conv(self.shape[-1], features, kernel, rngs=self.rngs, **self.params, **self.common,
                               **options))

    def dense(self, features, **options):
        if len(self.shape) != 1:
            self.add(L.Flatten(**self.common))
        return self.add(L.Dense(self.shape[0], features, rngs=self.rngs, **self.params, **self.common, **options))

    def conv_bn(self, features, kernel, **options):
        """Conv without bias (BatchNorm's shift makes it redundant: its gradient is exactly 0), then BN."""
        return self.conv(features, kernel, use_bias=False, **options).bn()

    def bn(self, **options):
        return self.add(L.BatchNorm(self.shape[-1], **self.params, **self.common, **options))

    def relu(self):
        return self.add(L.ReLU(**self.common))

    def max_pool(self, window, **options):
        return self.add(L.MaxPool(window, **self.common, **options))

    def avg_pool(self, window, **options):
        return self.add(L.AvgPool(window, **self.common, **options))

    def global_avg_pool(self):
        return self.add(L.GlobalAvgPool(**self.common))

    def dropout(self, drop_rate):
        return self.add(L.Dropout(drop_rate, rngs=self.rngs, **self.common))


# --------------------------------------------------------------------------- architectures


def mnist1d_cnn(s: _Stack, num_classes: int):
    """The lecture's 1-D CNN: 3 x (Conv1d 15ch, K=3, S=2, VALID, ReLU) -> 4x15=60 -> Dense 10. 2,050 params."""
    for _ in range(3):
        s.conv(15, 3, stride=2).relu()
    s.dense(num_classes)


def mnist1d_mlp(s: _Stack, num_classes: int):
    """Fully connected twin of ``mnist1d_cnn``: the CNN's activation widths 285, 135, 60. 59,065 params."""
    for width in (285, 135, 60):
        s.dense(width).relu()
    s.dense(num_classes)


def mnist1d_deep(s: _Stack, num_classes: int):
    """A stronger MNIST-1D CNN: SAME convs with BatchNorm at full resolution, then strided ones."""
    s.conv_bn(32, 5, padding="SAME").relu()
    s.conv_bn(32, 5, padding="SAME").relu()
    s.conv_bn(64, 3, stride=2, padding="SAME").relu()
    s.conv_bn(64, 3, padding="SAME").relu()
    s.conv_bn(64, 3, stride=2, padding="SAME").relu()
    s.dense(num_classes)


def lenet5(s: _Stack, num_classes: int):
    """LeNet-5 (LeCun 1998) for 28x28x1, first conv padded by 2; ReLU and average pooling. 61,706 params."""
    s.conv(6, (5, 5), padding=2).relu().avg_pool(2)
    s.conv(16, (5, 5)).relu().avg_pool(2)
    s.dense(120).relu().dense(84).relu().dense(num_classes)


def seed_cnn(s: _Stack, num_classes: int):
    """CONV-RELU-POOL x2 -> FC, as in the Flax MNIST example (SAME 3x3 convs 32, 64; max pool 2; Dense 256)."""
    s.conv(32, (3, 3), padding="SAME").relu().max_pool(2)
    s.conv(64, (3, 3), padding="SAME").relu().max_pool(2)
    s.dense(256).relu().dense(num_classes)


def mnist_cnn(s: _Stack, num_classes: int):
    """A fast 28x28 CNN with BatchNorm: conv 5x5 (32) -> pool -> conv 3x3 (64) -> pool -> conv 3x3 (128) -> Dense.

    Pools early so the costly layers run at 12x12 and 5x5: 6.1 MFLOPs per image against seed_cnn's 9.3.
    """
    s.conv_bn(32, (5, 5)).relu().max_pool(2)
    s.conv_bn(64, (3, 3)).relu().max_pool(2)
    s.conv_bn(128, (3, 3)).relu()
    s.dense(num_classes)


def convnetjs_cifar(s: _Stack, num_classes: int):
    """The ConvNetJS CIFAR-10 demo: 3 x (conv 5x5 pad 2 [16, 20, 20], ReLU, max pool 2) -> Dense 10."""
    for width in (16, 20, 20):
        s.conv(width, (5, 5), padding=2).relu().max_pool(2)
    s.dense(num_classes)


def cifar_vgg(s: _Stack, num_classes: int):
    """A VGG-style CIFAR-10 net with BatchNorm (after airbench): stem, 3 blocks of 2 convs with pooling."""
    s.conv_bn(32, (3, 3), padding="SAME").relu()
    for width in (64, 128, 256):
        s.conv(width, (3, 3), padding="SAME", use_bias=False).max_pool(2).bn().relu()
        s.conv_bn(width, (3, 3), padding="SAME").relu()
    s.global_avg_pool().dense(num_classes)


@dataclass(frozen=True)
class ModelSpec:
    build: Callable
    input_shape: tuple


MODELS: dict[str, ModelSpec] = {
    "mnist1d_cnn": ModelSpec(mnist1d_cnn, (40, 1)),
    "mnist1d_mlp": ModelSpec(mnist1d_mlp, (40, 1)),
    "mnist1d_deep": ModelSpec(mnist1d_deep, (40, 1)),
    "lenet5": ModelSpec(lenet5, (28, 28, 1)),
    "seed_cnn": ModelSpec(seed_cnn, (28, 28, 1)),
    "mnist_cnn": ModelSpec(mnist_cnn, (28, 28, 1)),
    "convnetjs_cifar": ModelSpec(convnetjs_cifar, (32, 32, 3)),
    "cifar_vgg": ModelSpec(cifar_vgg, (32, 32, 3)),
}


def create_model(name: str, *, input_shape=None, num_classes: int = 10, grad: str = "auto", dtype=None,
                 param_dtype=jnp.float32, seed: int = 0, rngs: nnx.Rngs | None = None) -> Sequential:
    """Build a registered model for per-example ``input_shape`` (default: the one it was designed for).

    ``grad``: ``"auto"`` or ``"manual"`` (hand-written backward in every layer); ``dtype``: compute
    dtype (e.g. ``jnp.bfloat16``), ``param_dtype``: storage dtype of the parameters.

    Raises ``ValueError`` naming the model and the shape when the architecture cannot take that input.
    """
    if name not in MODELS:
        raise ValueError(f"create_model: unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    input_shape = tuple(spec.input_shape if input_shape is None else input_shape)
    if len(input_shape) != len(spec.input_shape):
        raise ValueError(
            f"create_model: {name} takes {len(spec.input_shape) - 1}-D inputs like {spec.input_shape}, "
            f"got input shape {input_shape}"
        )
    rngs = rngs if rngs is not None else nnx.Rngs(params=seed, dropout=seed + 1)
    stack = _Stack(input_shape, grad=grad, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    try:
        spec.build(stack, num_classes)
    except ValueError as err:
        raise ValueError(f"create_model: {name} does not fit input shape {input_shape}: {err}") from err
    return Sequential(stack.layers, input_shape=input_shape, name=name)


def count_params(module) -> int:
    """Number of scalar parameters (``nnx.Param``) in a module."""
    state = nnx.state(module, nnx.Param)
    return int(sum(jnp.size(v) for v in nnx.to_flat_state(state).leaves))
