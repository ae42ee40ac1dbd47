"""Flax NNX modules: thin holders of parameters that call :mod:`jaxconv.functional`.

Every layer takes ``grad="auto"`` (JAX autodiff) or ``grad="manual"`` (the hand-written rules of
:mod:`jaxconv.grads`, through ``jax.custom_vjp``), and ``dtype`` for the compute dtype (e.g.
``jnp.bfloat16``; parameters stay in ``param_dtype``). Besides ``__call__`` each layer has:

* ``output_shape(in_shape)`` — the shape arithmetic, per example (no batch axis);
* ``geometry_for(in_shape)`` — ``(kernel_span, stride, pad_lo)`` per spatial axis for windowed
  layers, ``None`` for pointwise ones, ``"global"`` where the spatial axes end (flatten, dense,
  global pooling);
* ``forward_and_backward(x)`` — ``(y, back)`` with ``back(g) -> (dx, {param: grad})`` built from
  the hand-written vjps, used by :func:`jaxconv.backprop.manual_value_and_grad`.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxconv import functional as F
from jaxconv import grads as G

_INITS = {
    "he_normal": lambda: jax.nn.initializers.he_normal(in_axis=-2, out_axis=-1),
    "he_uniform": lambda: jax.nn.initializers.he_uniform(in_axis=-2, out_axis=-1),
    "lecun_normal": lambda: jax.nn.initializers.lecun_normal(in_axis=-2, out_axis=-1),
    "lecun_uniform": lambda: jax.nn.initializers.lecun_uniform(in_axis=-2, out_axis=-1),
    "glorot_uniform": lambda: jax.nn.initializers.glorot_uniform(in_axis=-2, out_axis=-1),
    # PyTorch's default for Conv/Linear: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    "torch": lambda: jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1),
}
_GRADS = ("auto", "manual")


def initializer(spec) -> Callable:
    """A kernel initialiser from its name (``he_normal``, ``lecun_normal``, ``torch``, ...) or a callable."""
    if callable(spec):
        return spec
    if spec not in _INITS:
        raise ValueError(f"initializer: unknown `kernel_init` {spec!r}; expected one of {sorted(_INITS)} or a callable")
    return _INITS[spec]()


def _check_grad(grad, layer):
    if grad not in _GRADS:
        raise ValueError(f"{layer}: `grad` must be 'auto' or 'manual', got {grad!r}")
    return grad


class Layer(nnx.Module):
    """Shared plumbing: the op to call (autodiff or hand-written backward) and the compute dtype."""

    grad: str = "auto"
    dtype = None
    geometry = None

    def op(self, forward):
        return G.manual(forward) if self.grad == "manual" else forward

    def cast(self, *arrays):
        if self.dtype is None:
            return arrays
        return tuple(None if a is None else a.astype(self.dtype) for a in arrays)

    def output_shape(self, in_shape):
        return tuple(in_shape)

    def geometry_for(self, in_shape):
        return self.geometry


class Conv(Layer):
    """N-d convolution layer. ``kernel_size`` int means 1-D (as in Flax); give a tuple for 2-D."""

    def __init__(self, in_features: int, out_features: int, kernel_size, *, stride=1, padding="VALID",
                 dilation=1, groups: int = 1, use_bias: bool = True, kernel_init="he_normal",
                 param_dtype=jnp.float32, dtype=None, grad: str = "auto", rngs: nnx.Rngs):
        kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
        n = len(kernel_size)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if value % groups:
                raise ValueError(f"Conv: `{name}` (={value}) must be divisible by `groups` (={groups})")
        self.kernel_size = kernel_size
        self.stride = F.int_tuple(stride, n, fn="Conv", name="stride")
        self.dilation = F.int_tuple(dilation, n, fn="Conv", name="dilation")
        self.padding, self.groups = padding, groups
        self.grad, self.dtype = _check_grad(grad, "Conv"), dtype
        shape = (*kernel_size, in_features // groups, out_features)
        self.kernel = nnx.Param(initializer(kernel_init)(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def _options(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def _pads(self, in_spatial):
        return F.resolve_padding(self.padding, fn="Conv", in_spatial=in_spatial, window=self.kernel_size,
                                 stride=self.stride, dilation=self.dilation)

    def __call__(self, x):
        b = None if self.bias is None else self.bias[...]
        x, w, b = self.cast(x, self.kernel[...], b)
        return self.op(F.conv)(x, w, b, **self._options())

    def output_shape(self, in_shape):
        if len(in_shape) != len(self.kernel_size) + 1:
            raise ValueError(f"Conv: a {len(self.kernel_size)}-D kernel needs inputs [*spatial, C] of rank "
                             f"{len(self.kernel_size) + 1}, got shape {tuple(in_shape)}")
        pads = self._pads(in_shape[:-1])
        F._check_fits("Conv", in_shape[:-1], pads, self.kernel_size, self.dilation)
        return (*F.output_spatial(in_shape[:-1], pads, self.kernel_size, self.stride, self.dilation),
                self.kernel.shape[-1])

    def geometry_for(self, in_shape):
        pads = self._pads(in_shape[:-1])
        return [(F.effective_kernel(k, d), s, lo) for k, d, s, (lo, _) in zip(self.kernel_size, self.dilation,
                                                                            self.stride, pads)]

    def forward_and_backward(self, x):
        b = None if self.bias is None else self.bias[...]
        x, w, b = self.cast(x, self.kernel[...], b)
        y = F.conv(x, w, b, **self._options())

        def back(g):
            dx, dw, db = G.conv_vjp(g, x, w, **self._options())
            grads = {"kernel": dw} if b is None else {"kernel": dw, "bias": db}
            return dx, grads
        return y, back


class Dense(Layer):
    """Fully connected layer ``x @ kernel + bias`` on ``[N, D_in]``."""

    geometry = "global"

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, kernel_init="he_normal",
                 param_dtype=jnp.float32, dtype=None, grad: str = "auto", rngs: nnx.Rngs):
        self.grad, self.dtype = _check_grad(grad, "Dense"), dtype
        self.kernel = nnx.Param(initializer(kernel_init)(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x):
        b = None if self.bias is None else self.bias[...]
        x, w, b = self.cast(x, self.kernel[...], b)
        return self.op(F.dense)(x, w, b)

    def output_shape(self, in_shape):
        if len(in_shape) != 1 or in_shape[0] != self.kernel.shape[0]:
            raise ValueError(f"Dense: expects inputs of shape ({self.kernel.shape[0]},), got {tuple(in_shape)}")
        return (self.kernel.shape[1],)

    def forward_and_backward(self, x):
        b = None if self.bias is None else self.bias[...]
        x, w, b = self.cast(x, self.kernel[...], b)
        y = F.dense(x, w, b)

        def back(g):
            dx, dw, db = G.dense_vjp(g, x, w)
            return dx, ({"kernel": dw} if b is None else {"kernel": dw, "bias": db})
        return y, back


class _Pool(Layer):
    forward = None

    def __init__(self, window, *, stride=None, padding="VALID", grad: str = "auto"):
        self.window, self.stride, self.padding = window, stride, padding
        self.grad = _check_grad(grad, type(self).__name__)

    def _options(self):
        return dict(stride=self.stride, padding=self.padding)

    def _resolved(self, in_shape):
        n = len(in_shape) - 1
        window = F.int_tuple(self.window, n, fn=type(self).__name__, name="window")
        stride = window if self.stride is None else F.int_tuple(self.stride, n, fn=type(self).__name__,
                                                                name="stride")
        pads = F.resolve_padding(self.padding, fn=type(self).__name__, in_spatial=in_shape[:-1], window=window,
                                 stride=stride)
        return window, stride, pads

    def output_shape(self, in_shape):
        window, stride, pads = self._resolved(in_shape)
        F._check_fits(type(self).__name__, in_shape[:-1], pads, window, (1,) * len(window), what="window")
        return (*F.output_spatial(in_shape[:-1], pads, window, stride), in_shape[-1])

    def geometry_for(self, in_shape):
        window, stride, pads = self._resolved(in_shape)
        return [(k, s, lo) for k, s, (lo, _) in zip(window, stride, pads)]


class MaxPool(_Pool):
    """Max pooling; ``stride=None`` means stride = window."""

    def __call__(self, x):
        return self.op(F.max_pool)(x, self.window, **self._options())

    def forward_and_backward(self, x):
        y = F.max_pool(x, self.window, **self._options())
        return y, lambda g: (G.max_pool_vjp(g, x, self.window, **self._options()), {})


class AvgPool(_Pool):
    """Average pooling; ``count_include_pad`` as in PyTorch."""

    def __init__(self, window, *, stride=None, padding="VALID", count_include_pad: bool = True, grad="auto"):
        super().__init__(window, stride=stride, padding=padding, grad=grad)
        self.count_include_pad = count_include_pad

    def _options(self):
        return dict(stride=self.stride, padding=self.padding, count_include_pad=self.count_include_pad)

    def __call__(self, x):
        return self.op(F.avg_pool)(x, self.window, **self._options())

    def forward_and_backward(self, x):
        y = F.avg_pool(x, self.window, **self._options())
        return y, lambda g: (G.avg_pool_vjp(g, x, self.window, **self._options()), {})


class _Stateless(Layer):
    """A layer with no parameters whose op is ``forward(x)`` with backward ``vjp(g, x)``."""

    forward = staticmethod(lambda x: x)
    vjp = staticmethod(lambda g, x: g)

    def __init__(self, *, grad: str = "auto"):
        self.grad = _check_grad(grad, type(self).__name__)

    def __call__(self, x):
        return self.op(type(self).forward)(x)

    def forward_and_backward(self, x):
        return type(self).forward(x), lambda g: (type(self).vjp(g, x), {})


class ReLU(_Stateless):
    """``max(x, 0)``."""
    forward, vjp = staticmethod(F.relu), staticmethod(G.relu_vjp)


class Flatten(_Stateless):
    """``[N, ...] -> [N, prod(...)]``."""
    forward, vjp = staticmethod(F.flatten), staticmethod(G.flatten_vjp)
    geometry = "global"

    def output_shape(self, in_shape):
        return (math.prod(in_shape),)


class GlobalAvgPool(_Stateless):
    """Mean over all spatial axes: ``[N, *spatial, C] -> [N, C]``."""
    forward, vjp = staticmethod(F.global_avg_pool), staticmethod(G.global_avg_pool_vjp)
    geometry = "global"

    def output_shape(self, in_shape):
        return (in_shape[-1],)


class Dropout(Layer):
    """Inverted dropout, active unless ``deterministic`` (``model.eval()`` sets it)."""

    def __init__(self, drop_rate: float, *, deterministic: bool = False, grad: str = "auto", rngs: nnx.Rngs):
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"Dropout: `drop_rate` must be in [0, 1), got {drop_rate}")
        self.drop_rate, self.deterministic = drop_rate, deterministic
        self.grad = _check_grad(grad, "Dropout")
        self.rngs = rngs["dropout"].fork()

    def _key(self):
        return None if self.deterministic or self.drop_rate == 0 else self.rngs()

    def __call__(self, x):
        key = self._key()
        if key is None:
            return x
        return self.op(F.dropout)(x, key, drop_rate=self.drop_rate)

    def forward_and_backward(self, x):
        key = self._key()
        if key is None:
            return x, lambda g: (g, {})
        y = F.dropout(x, key, drop_rate=self.drop_rate)
        return y, lambda g: (G.dropout_vjp(g, x, key, drop_rate=self.drop_rate), {})


class BatchNorm(Layer):
    """Batch normalisation over the last axis; running statistics as ``nnx.BatchStat``.

    Training (``use_running_average=False``) normalises with this batch's biased variance and
    updates ``mean <- momentum * mean + (1 - momentum) * batch_mean`` (the same for var), as Flax.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
                 use_running_average: bool = False, param_dtype=jnp.float32, dtype=None, grad: str = "auto",
                 rngs: nnx.Rngs | None = None):
        self.momentum, self.epsilon = momentum, epsilon
        self.use_running_average = use_running_average
        self.grad, self.dtype = _check_grad(grad, "BatchNorm"), dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def _update_stats(self, x):
        mean, var = F.batch_moments(jax.lax.stop_gradient(x).astype(jnp.float32))
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1 - m) * mean
        self.var[...] = m * self.var[...] + (1 - m) * var

    def __call__(self, x):
        x, scale, bias = self.cast(x, self.scale[...], self.bias[...])
        if self.use_running_average:
            mean, var = self.cast(self.mean[...], self.var[...])
            return self.op(F.batch_norm)(x, scale, bias, mean, var, epsilon=self.epsilon)
        self._update_stats(x)
        return self.op(F.batch_norm_train)(x, scale, bias, epsilon=self.epsilon)

    def forward_and_backward(self, x):
        x, scale, bias = self.cast(x, self.scale[...], self.bias[...])
        if self.use_running_average:
            mean, var = self.cast(self.mean[...], self.var[...])
            y = F.batch_norm(x, scale, bias, mean, var, epsilon=self.epsilon)

            def back(g):
                dx, dscale, dbias, _, _ = G.batch_norm_vjp(g, x, scale, bias, mean, var, epsilon=self.epsilon)
                return dx, {"scale": dscale, "bias": dbias}
            return y, back
        self._update_stats(x)
        y = F.batch_norm_train(x, scale, bias, epsilon=self.epsilon)

        def back_train(g):
            dx, dscale, dbias = G.batch_norm_train_vjp(g, x, scale, bias, epsilon=self.epsilon)
            return dx, {"scale": dscale, "bias": dbias}
        return y, back_train
