"""Named architectures, built with the public :class:`Builder` and registered by :func:`register_model`.

    model = create_model("resnet20")                               # input [N, 32, 32, 3]
    model = create_model("seed_cnn", input_shape=(32, 32, 3), grad="manual")

    @register_model("tiny", input_shape=(28, 28, 1))
    def tiny(b: Builder, num_classes: int):
        b.conv(8, (3, 3), padding=1).relu()
        b.residual(lambda r: r.conv(8, (3, 3), padding=1).relu().conv(8, (3, 3), padding=1)).relu()
        b.global_avg_pool().dense(num_classes)

Every model is a :class:`~jaxconv.layers.Sequential` of layers that answer the layer protocol, so
the summary table, receptive fields, FLOPs and hand-written backprop work on any of them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxconv import layers as L
from jaxconv.layers import Sequential


class Builder:
    """Builds a layer list while tracking the per-example activation shape, so every layer's input
    size is derived (``conv(64, (3, 3))`` needs no input channel count). Methods chain.

    ``residual(body, shortcut)`` and ``concat(*branches)`` take functions that build each branch on
    a fresh builder at the current shape (``None``: the identity).
    """

    def __init__(self, input_shape, *, grad: str = "auto", dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.input_shape = self.shape = tuple(input_shape)
        self.layers = []
        self.grad, self.dtype, self.param_dtype = grad, dtype, param_dtype
        self.rngs = rngs if rngs is not None else nnx.Rngs(0)

    def _params(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, grad=self.grad)

    def add(self, layer: L.Layer) -> "Builder":
        """Append any protocol layer; its output shape is checked against the current shape now."""
        self.shape = layer.output_shape(self.shape)
        self.layers.append(layer)
        return self

    def conv(self, features, kernel, **options):
        return self.add(L.Conv(self.shape[-1], features, kernel, rngs=self.rngs, **self._params(), **options))

    def conv_transpose(self, features, kernel, **options):
        return self.add(L.ConvTranspose(self.shape[-1], features, kernel, rngs=self.rngs, **self._params(),
                                        **options))

    def dense(self, features, **options):
        if len(self.shape) != 1:
            self.flatten()
        return self.add(L.Dense(self.shape[0], features, rngs=self.rngs, **self._params(), **options))

    def conv_bn(self, features, kernel, **options):
        """Conv without bias (BatchNorm's shift makes it redundant: its gradient is exactly 0), then BN."""
        return self.conv(features, kernel, use_bias=False, **options).bn()

    def bn(self, **options):
        return self.add(L.BatchNorm(self.shape[-1], **self._params(), **options))

    def group_norm(self, num_groups, **options):
        return self.add(L.GroupNorm(self.shape[-1], num_groups, **self._params(), **options))

    def layer_norm(self, **options):
        return self.add(L.LayerNorm(self.shape[-1], **self._params(), **options))

    def relu(self):
        return self.add(L.ReLU(grad=self.grad))

    def flatten(self):
        return self.add(L.Flatten(grad=self.grad))

    def max_pool(self, window, **options):
        return self.add(L.MaxPool(window, grad=self.grad, **options))

    def avg_pool(self, window, **options):
        return self.add(L.AvgPool(window, grad=self.grad, **options))

    def global_avg_pool(self):
        return self.add(L.GlobalAvgPool(grad=self.grad))

    def upsample(self, scale, **options):
        return self.add(L.Upsample(scale, grad=self.grad, **options))

    def dropout(self, drop_rate):
        return self.add(L.Dropout(drop_rate, rngs=self.rngs, grad=self.grad))

    def branch(self, build: Callable | None) -> L.Layer:
        """A :class:`Sequential` built by ``build(sub_builder)`` at the current shape; ``None``: identity."""
        if build is None:
            return L.Identity(grad=self.grad)
        sub = Builder(self.shape, grad=self.grad, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)
        build(sub)
        return Sequential(sub.layers, grad=self.grad)

    def residual(self, body: Callable, shortcut: Callable | None = None):
        """Append ``Residual(body, shortcut)``: ``body(x) + shortcut(x)``."""
        return self.add(L.Residual(self.branch(body), self.branch(shortcut), grad=self.grad))

    def concat(self, *branches: Callable | None):
        """Append ``Concat(*branches)``: the branches' outputs joined on channels."""
        return self.add(L.Concat(*[self.branch(b) for b in branches], grad=self.grad))

    def build(self, name: str = "sequential") -> Sequential:
        return Sequential(self.layers, input_shape=self.input_shape, name=name, grad=self.grad)


@dataclass(frozen=True)
class ModelSpec:
    build: Callable           # build(builder, num_classes)
    input_shape: tuple        # per example, the one it was designed for
    num_classes: int = 10
    dense: bool = False       # one prediction per position (labels [N, *spatial]) rather than per example


_REGISTRY: dict[str, ModelSpec] = {}
MODELS = MappingProxyType(_REGISTRY)  # name -> ModelSpec, read-only: add models with register_model


def register_model(name: str, *, input_shape, num_classes: int = 10, dense: bool = False):
    """Decorator registering ``build(builder, num_classes)`` under ``name`` for :func:`create_model`,
    ``jaxconv summary/train/gradcheck`` and the PyTorch twins. A taken name is an error."""
    def decorate(build):
        if name in _REGISTRY:
            raise ValueError(f"register_model: a model named {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(build, tuple(input_shape), num_classes, dense)
        return build
    return decorate


# --------------------------------------------------------------------------- architectures


@register_model("mnist1d_cnn", input_shape=(40, 1))
def mnist1d_cnn(s: Builder, num_classes: int):
    """The lecture's 1-D CNN: 3 x (Conv1d 15ch, K=3, S=2, VALID, ReLU) -> 4x15=60 -> Dense 10. 2,050 params."""
    for _ in range(3):
        s.conv(15, 3, stride=2).relu()
    s.dense(num_classes)


@register_model("mnist1d_mlp", input_shape=(40, 1))
def mnist1d_mlp(s: Builder, num_classes: int):
    """Fully connected twin of ``mnist1d_cnn``: the CNN's activation widths 285, 135, 60. 59,065 params."""
    for width in (285, 135, 60):
        s.dense(width).relu()
    s.dense(num_classes)


@register_model("mnist1d_deep", input_shape=(40, 1))
def mnist1d_deep(s: Builder, num_classes: int):
    """A stronger MNIST-1D CNN: SAME convs with BatchNorm at full resolution, then strided ones."""
    s.conv_bn(32, 5, padding="SAME").relu()
    s.conv_bn(32, 5, padding="SAME").relu()
    s.conv_bn(64, 3, stride=2, padding="SAME").relu()
    s.conv_bn(64, 3, padding="SAME").relu()
    s.conv_bn(64, 3, stride=2, padding="SAME").relu()
    s.dense(num_classes)


@register_model("lenet5", input_shape=(28, 28, 1))
def lenet5(s: Builder, num_classes: int):
    """LeNet-5 (LeCun 1998) for 28x28x1, first conv padded by 2; ReLU and average pooling. 61,706 params."""
    s.conv(6, (5, 5), padding=2).relu().avg_pool(2)
    s.conv(16, (5, 5)).relu().avg_pool(2)
    s.dense(120).relu().dense(84).relu().dense(num_classes)


@register_model("seed_cnn", input_shape=(28, 28, 1))
def seed_cnn(s: Builder, num_classes: int):
    """CONV-RELU-POOL x2 -> FC, as in the Flax MNIST example (SAME 3x3 convs 32, 64; max pool 2; Dense 256)."""
    s.conv(32, (3, 3), padding="SAME").relu().max_pool(2)
    s.conv(64, (3, 3), padding="SAME").relu().max_pool(2)
    s.dense(256).relu().dense(num_classes)


@register_model("mnist_cnn", input_shape=(28, 28, 1))
def mnist_cnn(s: Builder, num_classes: int):
    """A fast 28x28 CNN with BatchNorm: conv 5x5 (32) -> pool -> conv 3x3 (64) -> pool -> conv 3x3 (128) -> Dense.

    Pools early so the costly layers run at 12x12 and 5x5: 6.1 MFLOPs per image against seed_cnn's 9.3.
    """
    s.conv_bn(32, (5, 5)).relu().max_pool(2)
    s.conv_bn(64, (3, 3)).relu().max_pool(2)
    s.conv_bn(128, (3, 3)).relu()
    s.dense(num_classes)


@register_model("convnetjs_cifar", input_shape=(32, 32, 3))
def convnetjs_cifar(s: Builder, num_classes: int):
    """The ConvNetJS CIFAR-10 demo: 3 x (conv 5x5 pad 2 [16, 20, 20], ReLU, max pool 2) -> Dense 10."""
    for width in (16, 20, 20):
        s.conv(width, (5, 5), padding=2).relu().max_pool(2)
    s.dense(num_classes)


@register_model("cifar_vgg", input_shape=(32, 32, 3))
def cifar_vgg(s: Builder, num_classes: int):
    """A VGG-style CIFAR-10 net with BatchNorm (after airbench): stem, 3 blocks of 2 convs with pooling."""
    s.conv_bn(32, (3, 3), padding="SAME").relu()
    for width in (64, 128, 256):
        s.conv(width, (3, 3), padding="SAME", use_bias=False).max_pool(2).bn().relu()
        s.conv_bn(width, (3, 3), padding="SAME").relu()
    s.global_avg_pool().dense(num_classes)


def _basic_block(s: Builder, width: int, stride: int):
    """Two 3x3 conv-BN (ReLU between) plus the shortcut, then ReLU; a 1x1 conv-BN projection where the
    shape changes (option B of He et al. 2016)."""
    project = stride != 1 or s.shape[-1] != width
    s.residual(lambda r: r.conv_bn(width, (3, 3), stride=stride, padding=1).relu().conv_bn(width, (3, 3), padding=1),
               (lambda p: p.conv_bn(width, (1, 1), stride=stride)) if project else None).relu()


def _bottleneck(s: Builder, width: int, stride: int):
    """1x1 (width) -> 3x3 (width, the stride: ResNet v1.5) -> 1x1 (4 x width), each with BN; projection
    shortcut where the shape changes; ReLU after the add."""
    out = 4 * width
    project = stride != 1 or s.shape[-1] != out
    s.residual(lambda r: r.conv_bn(width, (1, 1)).relu().conv_bn(width, (3, 3), stride=stride, padding=1).relu()
               .conv_bn(out, (1, 1)),
               (lambda p: p.conv_bn(out, (1, 1), stride=stride)) if project else None).relu()


def _stages(s: Builder, block, widths, depths):
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        for i in range(depth):
            block(s, width, 2 if stage > 0 and i == 0 else 1)


@register_model("resnet20", input_shape=(32, 32, 3))
def resnet20(s: Builder, num_classes: int):
    """He et al. 2016 section 4.2, CIFAR-10 ResNet-20: 3x3 conv 16, three stages of 3 basic blocks
    (16, 32, 64 channels; stride 2 entering stages 2 and 3), projection shortcuts, global average
    pooling, Dense. 272,474 params."""
    s.conv_bn(16, (3, 3), padding=1).relu()
    _stages(s, _basic_block, (16, 32, 64), (3, 3, 3))
    s.global_avg_pool().dense(num_classes)


@register_model("cifar_resnet18", input_shape=(32, 32, 3))
def cifar_resnet18(s: Builder, num_classes: int):
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem (64), no stem pooling, 2-2-2-2 basic blocks
    (64, 128, 256, 512). 11,173,962 params."""
    s.conv_bn(64, (3, 3), padding=1).relu()
    _stages(s, _basic_block, (64, 128, 256, 512), (2, 2, 2, 2))
    s.global_avg_pool().dense(num_classes)


def _imagenet_stem(s: Builder):
    s.conv_bn(64, (7, 7), stride=2, padding=3).relu().max_pool(3, stride=2, padding=1)


@register_model("resnet18", input_shape=(224, 224, 3), num_classes=1000)
def resnet18(s: Builder, num_classes: int):
    """ResNet-18, ImageNet layout (torchvision's): 7x7/2 stem, 3x3/2 max pool, 2-2-2-2 basic blocks.
    11,689,512 params."""
    _imagenet_stem(s)
    _stages(s, _basic_block, (64, 128, 256, 512), (2, 2, 2, 2))
    s.global_avg_pool().dense(num_classes)


@register_model("resnet50", input_shape=(224, 224, 3), num_classes=1000)
def resnet50(s: Builder, num_classes: int):
    """ResNet-50 v1.5 (torchvision's): bottleneck blocks 3-4-6-3, stride on the 3x3 conv. 25,557,032 params."""
    _imagenet_stem(s)
    _stages(s, _bottleneck, (64, 128, 256, 512), (3, 4, 6, 3))
    s.global_avg_pool().dense(num_classes)


def _inverted_residual(s: Builder, expansion: int, width: int, stride: int):
    """MobileNetV2's block: 1x1 expansion conv-BN-ReLU (none at expansion 1), 3x3 depthwise conv-BN-ReLU (the
    stride), 1x1 linear projection conv-BN; the input added where the shape is kept (Sandler et al. 2018)."""
    hidden = s.shape[-1] * expansion

    def body(r):
        if expansion != 1:
            r.conv_bn(hidden, (1, 1)).relu()
        r.conv_bn(hidden, (3, 3), stride=stride, padding=1, groups=hidden).relu().conv_bn(width, (1, 1))
    if stride == 1 and s.shape[-1] == width:
        s.residual(body)
    else:
        body(s)


@register_model("mobilenet_v2", input_shape=(32, 32, 3))
def mobilenet_v2(s: Builder, num_classes: int):
    """MobileNetV2 (Sandler et al. 2018, width 1.0) for 32x32 inputs, as CIFAR ports run it: the stem and the
    24-channel stage at stride 1 (32 -> 4 pixels in all), ReLU for ReLU6, no dropout. 2,236,682 params: torchvision's
    ImageNet model's 3,504,872 with a 10-class classifier."""
    s.conv_bn(32, (3, 3), padding=1).relu()
    for expansion, width, depth, stride in ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                                            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(depth):
            _inverted_residual(s, expansion, width, stride if i == 0 else 1)
    s.conv_bn(1280, (1, 1)).relu().global_avg_pool().dense(num_classes)


@register_model("unet_small", input_shape=(28, 28, 1), num_classes=2, dense=True)
def unet_small(s: Builder, num_classes: int):
    """A small U-Net (Ronneberger et al. 2015) with one prediction per pixel: two encoder levels of
    3x3 conv-GroupNorm-ReLU and 2x2 max pooling, decoders of stride-2 transposed convs, and at each
    level the encoder's features joined to the decoder's by a skip :class:`~jaxconv.layers.Concat`."""
    def block(b: Builder, width: int):
        b.conv(width, (3, 3), padding=1).group_norm(4).relu()

    def level(width: int, inner):
        def down_and_up(b: Builder):
            b.max_pool(2)
            block(b, 2 * width)
            if inner is not None:
                inner(b)
                block(b, 2 * width)
            b.conv_transpose(width, (2, 2), stride=2)
        return lambda b: b.concat(None, down_and_up)

    block(s, 16)
    level(16, level(32, None))(s)
    block(s, 16)
    s.conv(num_classes, (1, 1))


def create_model(name: str, *, input_shape=None, num_classes: int | None = None, grad: str = "auto", dtype=None,
                 param_dtype=jnp.float32, seed: int = 0, rngs: nnx.Rngs | None = None) -> Sequential:
    """Build a registered model for per-example ``input_shape`` (default: the one it was designed for).

    ``num_classes`` defaults to the model's (10; 1,000 for the ImageNet ResNets; 2 for unet_small).
    ``grad``: ``"auto"`` or ``"manual"`` (hand-written backward in every layer); ``dtype``: compute
    dtype (e.g. ``jnp.bfloat16``), ``param_dtype``: storage dtype of the parameters.

    Raises ``ValueError`` naming the model and the shape when the architecture cannot take that input.
    """
    if name not in _REGISTRY:
        raise ValueError(f"create_model: unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    spec = _REGISTRY[name]
    input_shape = tuple(spec.input_shape if input_shape is None else input_shape)
    if len(input_shape) != len(spec.input_shape):
        raise ValueError(
            f"create_model: {name} takes {len(spec.input_shape) - 1}-D inputs like {spec.input_shape}, "
            f"got input shape {input_shape}"
        )
    options = (name, input_shape, num_classes, grad, dtype, param_dtype)
    if rngs is None and type(seed) is int and 0 <= seed < 2 ** 31 - 1 and not _tracing():  # int32 seeds: the same keys
        # The initial state as one compiled program (the same numbers, bit for bit): eagerly, XLA compiled every
        # initialiser op for every shape on its own (ResNet-20: 4.52 -> 1.82 s in a fresh process, ResNet-50
        # 6.26 -> 5.27 s, the 2-core CPU). The graph definition comes from an abstract build. Under a
        # transformation (jit, vmap, eval_shape) the build is traced into the caller's program as it is.
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: _build(*options, seed=seed)))
        # the gradient mode and compute dtype change no weight: one program serves them all
        return nnx.merge(graphdef, _initial_state()(name, input_shape, num_classes, "auto", None, param_dtype,
                                                    jnp.int32(seed)))
    return _build(*options, seed=seed, rngs=rngs)


def _build(name, input_shape, num_classes, grad, dtype, param_dtype, *, seed, rngs=None) -> Sequential:
    spec = _REGISTRY[name]
    if rngs is None:  # a traced seed (models built under jax.vmap, one per seed) becomes a key as an int would
        key = (lambda s: s) if isinstance(seed, int) else jax.random.key
        rngs = nnx.Rngs(params=key(seed), dropout=key(seed + 1))
    builder = Builder(input_shape, grad=grad, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    try:
        spec.build(builder, spec.num_classes if num_classes is None else num_classes)
    except ValueError as err:
        raise ValueError(f"create_model: {name} does not fit input shape {input_shape}: {err}") from err
    return builder.build(name)


def _tracing() -> bool:
    """Whether this call is being traced (inside jit, vmap, eval_shape, ...): every array op made there is a tracer."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


@functools.cache
def _initial_state():
    """``(name, input_shape, num_classes, grad, dtype, param_dtype, seed) -> nnx.State`` of the built model, compiled
    once per model and options (the seed is traced), with :func:`jaxconv.compiler.jit_once`."""
    from jaxconv import compiler
    return compiler.jit_once(lambda *options: nnx.state(_build(*options[:-1], seed=options[-1])),
                             static_argnums=(0, 1, 2, 3, 4, 5))


def count_params(module) -> int:
    """Number of scalar parameters (``nnx.Param``) in a module."""
    state = nnx.state(module, nnx.Param)
    return int(sum(math.prod(v.shape) for v in nnx.to_flat_state(state).leaves))  # abstract ones too (eval_shape)
