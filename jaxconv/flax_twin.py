"""Plain Flax NNX twins of jaxconv models: the program a Flax user would write for the same network
(``nnx.Conv``, ``nnx.BatchNorm``, ``nnx.Linear``, ``nnx.max_pool``, ``nnx.Sequential``, ...), with jaxconv's
weights copied in, so ``jaxconv bench --compare flax`` times the same model both ways.

    twin = flax_twin(model)            # an nnx.Module on the same channels-last input, same outputs

Kernels need no conversion: jaxconv's layouts are Flax's (conv ``[*K, C_in / G, C_out]``, dense
``[D_in, D_out]``). A transposed conv maps to ``nnx.ConvTranspose(transpose_kernel=True)``, PyTorch's
semantics, its kernel's channel axes swapped; Flax's has no groups, so a grouped one is an error. A layer
type without a converter is an error too.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxconv import functional as F
from jaxconv import layers as L
from jaxconv.converters import Converters

_convert = Converters("flax_twin", "Flax")
converts = _convert.register  # @converts(LayerType) registers convert(layer, in_shape) -> nnx.Module


class Function(nnx.Module):
    """A parameter-free step, ``fn(x)``: what a Flax user writes inline (``nnx.relu``, ``nnx.max_pool``...)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class Residual(nnx.Module):
    def __init__(self, body, shortcut):
        self.body, self.shortcut = body, shortcut

    def __call__(self, x):
        return self.body(x) + self.shortcut(x)


class Concat(nnx.Module):
    def __init__(self, branches):
        self.branches = nnx.List(branches)

    def __call__(self, x):
        return jnp.concatenate([b(x) for b in self.branches], axis=-1)


def _with(module, layer, *names, kernel=None):
    """``module`` with ``layer``'s arrays ``names`` copied into its same-named variables (a missing bias
    stays missing); ``kernel`` replaces ``layer.kernel`` when its layout differs."""
    for name in names:
        value = getattr(layer, name)
        if value is not None:
            variable = getattr(module, name)
            value = kernel if name == "kernel" and kernel is not None else value[...]
            variable[...] = jnp.asarray(np.asarray(value), variable[...].dtype)
    return module


def _rngs():
    return nnx.Rngs(0)


# The twin's kernels are overwritten by jaxconv's, so none is drawn: Flax's default (a truncated normal, compiled
# for every kernel shape) only cost time, 5.5 of the 8 s ResNet-20's twin took to build.
_NOT_DRAWN = dict(kernel_init=nnx.initializers.zeros_init())


@converts(L.Conv)
def _conv(layer, in_shape):
    c_in, c_out = layer.kernel.shape[-2] * layer.groups, layer.kernel.shape[-1]
    conv = nnx.Conv(c_in, c_out, layer.kernel_size, layer.stride, padding=layer._pads(in_shape),
                    kernel_dilation=layer.dilation, feature_group_count=layer.groups, use_bias=layer.bias is not None,
                    rngs=_rngs(), **_NOT_DRAWN)
    return _with(conv, layer, "kernel", "bias")


@converts(L.ConvTranspose)
def _conv_transpose(layer, in_shape):
    if layer.groups != 1:
        raise TypeError("flax_twin: nnx.ConvTranspose has no groups; a grouped transposed conv has no Flax twin")
    c_in, c_out = layer.kernel.shape[-2], layer.kernel.shape[-1]
    pads = layer.resolved_padding(in_shape)
    spans = [F.effective_kernel(k, d) for k, d in zip(layer.kernel_size, layer.dilation)]
    # PyTorch's crop (lo, hi) and output_padding, as padding of the stride-dilated input
    padding = [(m - 1 - lo, m - 1 - hi + op) for m, (lo, hi), op in zip(spans, pads, layer.output_padding)]
    conv = nnx.ConvTranspose(c_in, c_out, layer.kernel_size, layer.stride, padding=padding,
                             kernel_dilation=layer.dilation, use_bias=layer.bias is not None, transpose_kernel=True,
                             rngs=_rngs(), **_NOT_DRAWN)
    return _with(conv, layer, "kernel", "bias", kernel=np.swapaxes(np.asarray(layer.kernel[...]), -1, -2))


@converts(L.Dense)
def _dense(layer, in_shape):
    dense = nnx.Linear(*layer.kernel.shape, use_bias=layer.bias is not None, rngs=_rngs(), **_NOT_DRAWN)
    return _with(dense, layer, "kernel", "bias")


@converts(L.MaxPool)
def _max_pool(layer, in_shape):
    window, stride, pads = layer._resolved(in_shape)
    return Function(lambda x: nnx.max_pool(x, window, stride, pads))


@converts(L.AvgPool)
def _avg_pool(layer, in_shape):
    window, stride, pads = layer._resolved(in_shape)
    return Function(lambda x: nnx.avg_pool(x, window, stride, pads, count_include_pad=layer.count_include_pad))


@converts(L.GlobalAvgPool)
def _global_avg_pool(layer, in_shape):
    return Function(lambda x: jnp.mean(x, axis=tuple(range(1, x.ndim - 1))))


@converts(L.Flatten)
def _flatten(layer, in_shape):
    return Function(lambda x: x.reshape(x.shape[0], -1))


@converts(L.ReLU)
def _relu(layer, in_shape):
    return Function(nnx.relu)


@converts(L.Identity)
def _identity(layer, in_shape):
    return Function(lambda x: x)


@converts(L.Dropout)
def _dropout(layer, in_shape):
    return nnx.Dropout(layer.drop_rate, rngs=nnx.Rngs(dropout=0))


@converts(L.Upsample)
def _upsample(layer, in_shape):
    scale = layer._scale(in_shape)
    if layer.method == "nearest":
        def nearest(x):
            for axis, s in enumerate(scale, 1):
                x = jnp.repeat(x, s, axis=axis)
            return x
        return Function(nearest)
    raise TypeError("flax_twin: bilinear Upsample has no plain-Flax twin (jax.image.resize differs at the borders)")


@converts(L.BatchNorm)
def _batch_norm(layer, in_shape):
    norm = nnx.BatchNorm(layer.scale.shape[0], momentum=layer.momentum, epsilon=layer.epsilon, rngs=_rngs())
    return _with(norm, layer, "scale", "bias", "mean", "var")


@converts(L.GroupNorm)
def _group_norm(layer, in_shape):
    norm = nnx.GroupNorm(layer.scale.shape[0], num_groups=layer.num_groups, epsilon=layer.epsilon, rngs=_rngs())
    return _with(norm, layer, "scale", "bias")


@converts(L.LayerNorm)
def _layer_norm(layer, in_shape):
    norm = nnx.LayerNorm(layer.scale.shape[0], epsilon=layer.epsilon, rngs=_rngs())
    return _with(norm, layer, "scale", "bias")


@converts(L.Sequential)
def _sequential(layer, in_shape):
    return nnx.Sequential(*[_convert(child, shape) for _, child, shape, _ in layer.children(in_shape)])


@converts(L.Residual)
def _residual(layer, in_shape):
    return Residual(_convert(layer.body, in_shape), _convert(layer.shortcut, in_shape))


@converts(L.Concat)
def _concat(layer, in_shape):
    return Concat([_convert(child, shape) for _, child, shape, _ in layer.children(in_shape)])


def flax_twin(model, input_shape=None):
    """A plain Flax NNX module computing what ``model`` computes, its weights and batch statistics copied.
    ``twin.eval()`` matches ``model.eval()``; in training mode both normalise with the batch's statistics."""
    shape = input_shape if input_shape is not None else model.input_shape
    return _convert(model, shape)
