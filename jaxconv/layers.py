"""Flax NNX modules over :mod:`jaxconv.functional`: one protocol for leaf and composite layers.

Every layer answers five questions about itself, for one example's shape ``in_shape`` (no batch axis):

* ``__call__(x)`` — the forward pass on a batch, or on one example where the layer knows its rank
  (convs, pools with a rank or per-axis window, dense, upsampling with per-axis scales, the
  elementwise layers), as PyTorch's layers do;
* ``forward_and_backward(x) -> (y, back)`` with ``back(g) -> (dx, param_grads)``: the hand-written
  backward, ``param_grads`` a nested dict shaped like the layer's parameters (what
  :func:`jaxconv.backprop.manual_value_and_grad` chains);
* ``output_shape(in_shape)``;
* ``receptive_field(in_shape, field)`` — maps the receptive field of its input (per axis
  ``(size, jump)`` in model-input pixels, or :data:`GLOBAL`) to that of its output;
* ``flops(in_shape)`` — forward FLOPs for one example, a multiply-add counted as 2.

A **leaf** declares, it does not wire: ``spec(x)`` names its forward op from ``functional``, the
parameter arrays that follow ``x`` in that op's signature (by attribute name), any other arrays
(statistics, a PRNG key) and the keyword options. :class:`Layer` derives ``__call__`` (through
:func:`jaxconv.grads.manual` when ``grad="manual"``) and ``forward_and_backward`` (through the op's
registered vjp) from that one declaration. Options are validated and normalised in ``__init__``.

A **composite** (:class:`Sequential`, :class:`Residual`, :class:`Concat`) answers each question by
asking its children. A layer that does not answer a question raises; nothing counts as 0 by default.

``grad`` can be switched on a built model in one call: ``model.set_attributes(grad="manual")``.
"""
from __future__ import annotations

import contextlib
import math
from fractions import Fraction
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxconv import functional as F
from jaxconv import grads as G

GLOBAL = "global"  # the receptive field once a layer mixes every position (flatten, dense, global pooling)

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


_RECORDING: list[list] = []


@contextlib.contextmanager
def recording():
    """Within this block every leaf layer called appends ``(layer, output)`` to the list it yields, in call
    order: the feature maps of a forward pass (``jaxconv visualize``). Meant for eager calls; under
    ``jit`` the outputs are tracers."""
    seen: list = []
    _RECORDING.append(seen)
    try:
        yield seen
    finally:
        _RECORDING.pop()


def example_shape(x, spatial_rank: int | None) -> tuple:
    """The shape of one example of ``x``: ``x`` itself when it has ``spatial_rank + 1`` axes (one example,
    as PyTorch's layers accept), else ``x`` without its batch axis."""
    return tuple(x.shape) if spatial_rank is not None and x.ndim == spatial_rank + 1 else tuple(x.shape[1:])


class Spec(NamedTuple):
    """A leaf's declaration of one forward call: ``op(x, *params.values(), *extras, **options)``."""

    op: Callable
    params: dict      # attribute name -> array (or None, e.g. no bias), in the op's argument order
    extras: tuple = ()  # further array arguments that get no gradient here (statistics, a PRNG key)
    options: dict = {}


class Layer(nnx.Module):
    """The protocol's base. Leaves implement ``spec``, ``output_shape``, ``window`` and ``flops``."""

    _grad: str = "auto"
    dtype = None

    @property
    def grad(self) -> str:
        """``"auto"`` (JAX autodiff) or ``"manual"`` (the hand-written rules of :mod:`jaxconv.grads`)."""
        return self._grad

    @grad.setter
    def grad(self, value: str):
        if value not in _GRADS:
            raise ValueError(f"{type(self).__name__}: `grad` must be 'auto' or 'manual', got {value!r}")
        self._grad = value

    # ---- a leaf's declaration
    def spec(self, x) -> Spec:
        raise NotImplementedError(f"{type(self).__name__} must declare `spec(x)` (its op, params and options) "
                                  f"or implement `__call__` and `forward_and_backward` as a composite")

    def cast(self, *arrays):
        if self.dtype is None:
            return arrays
        return tuple(None if a is None else a.astype(self.dtype) for a in arrays)

    def _args(self, x):
        """The declaration for ``x`` and the op's positional arguments, all in the compute dtype."""
        (x,) = self.cast(x)
        spec = self.spec(x)
        params = dict(zip(spec.params, self.cast(*spec.params.values())))
        return spec, (x, *params.values(), *spec.extras), params

    # ---- derived from the declaration
    def __call__(self, x):
        spec, args, _ = self._args(x)
        op = G.manual(spec.op) if self.grad == "manual" else spec.op
        y = op(*args, **spec.options)
        if _RECORDING:
            _RECORDING[-1].append((self, y))
        return y

    def forward_and_backward(self, x):
        spec, args, params = self._args(x)
        y = spec.op(*args, **spec.options)
        vjp = G.vjp_of(spec.op)

        def back(g):
            cts = vjp(g, *args, **spec.options)
            cts = cts if isinstance(cts, tuple) else (cts,)
            grads = {name: ct for (name, value), ct in zip(params.items(), cts[1:]) if value is not None}
            return cts[0], grads
        return y, back

    # ---- the static questions
    def output_shape(self, in_shape) -> tuple:
        raise NotImplementedError(f"{type(self).__name__} does not implement `output_shape(in_shape)`")

    def window(self, in_shape):
        """Per spatial axis ``(span, stride)`` of the input window one output reads; ``None`` for a
        pointwise layer; :data:`GLOBAL` where the spatial axes end."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `window(in_shape)` "
                                  f"(needed for its receptive field)")

    def flops(self, in_shape) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not implement `flops(in_shape)`")

    def receptive_field(self, in_shape, field):
        """``field`` (per axis ``(size, jump)``, or :data:`GLOBAL`) after this layer:
        ``size += (span - 1) * jump``, ``jump *= stride``."""
        window = self.window(in_shape)
        if field == GLOBAL or window == GLOBAL:
            return GLOBAL
        if window is None:
            return field
        return tuple((r + (m - 1) * j, j * s) for (r, j), (m, s) in zip(field, window))

    def children(self, in_shape, field=None):
        """``(label, child, child_in_shape, child_in_field)`` for a composite's children (fields ``None``
        when ``field`` is); a leaf has none."""
        return []


class Pointwise(Layer):
    """A parameter-free leaf whose output has its input's shape: ``op(x)``, ``flops_per_element`` each."""

    op = staticmethod(F.identity)
    flops_per_element = 0

    def __init__(self, *, grad: str = "auto"):
        self.grad = grad

    def spec(self, x):
        return Spec(type(self).op, {})

    def output_shape(self, in_shape):
        return tuple(in_shape)

    def window(self, in_shape):
        return None

    def flops(self, in_shape):
        return self.flops_per_element * math.prod(in_shape)


class Identity(Pointwise):
    """Passes its input through (an identity shortcut or skip branch)."""


class ReLU(Pointwise):
    """``max(x, 0)``."""
    op, flops_per_element = staticmethod(F.relu), 1


def _check_rank(layer, in_shape, n):
    if len(in_shape) != n + 1:
        raise ValueError(f"{layer}: a {n}-D kernel needs inputs [*spatial, C] of rank {n + 1}, "
                         f"got shape {tuple(in_shape)}")


def _kernel_tuple(layer: str, kernel_size, rank: int | None) -> tuple:
    """An int kernel is 1-D for the generic layers (as in Flax) and ``rank``-D for the ``...{rank}d`` aliases."""
    if isinstance(kernel_size, int):
        return (kernel_size,) * (rank or 1)
    kernel_size = tuple(kernel_size)
    if rank is not None and len(kernel_size) != rank:
        raise ValueError(f"{layer}: `kernel_size` must be an int or {rank} ints, got {kernel_size}")
    return kernel_size


class Conv(Layer):
    """N-d convolution. ``kernel_size`` int means 1-D (as in Flax); give a tuple for 2-D and 3-D, or use
    :class:`Conv2d` / :class:`Conv3d` (PyTorch's names), where an int means the same on every spatial axis."""

    spatial_rank: int | None = None  # fixed by the Conv1d/2d/3d aliases

    def __init__(self, in_features: int, out_features: int, kernel_size, *, stride=1, padding="VALID",
                 dilation=1, groups: int = 1, use_bias: bool = True, kernel_init="he_normal",
                 param_dtype=jnp.float32, dtype=None, grad: str = "auto", rngs: nnx.Rngs):
        name = type(self).__name__
        kernel_size = _kernel_tuple(name, kernel_size, self.spatial_rank)
        n = len(kernel_size)
        for arg, value in (("in_features", in_features), ("out_features", out_features)):
            if value % groups:
                raise ValueError(f"{name}: `{arg}` (={value}) must be divisible by `groups` (={groups})")
        self.kernel_size = F.int_tuple(kernel_size, n, fn=name, name="kernel_size")
        self.stride = F.int_tuple(stride, n, fn=name, name="stride")
        self.dilation = F.int_tuple(dilation, n, fn=name, name="dilation")
        self.padding, self.groups = padding, groups
        self.grad, self.dtype = grad, dtype
        self.kernel = nnx.Param(initializer(kernel_init)(rngs.params(), self._kernel_shape(in_features, out_features),
                                                         param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def _kernel_shape(self, c_in, c_out):
        return (*self.kernel_size, c_in // self.groups, c_out)

    def _options(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def spec(self, x):
        self._check_spatial(x.ndim - 2, x.shape)
        return Spec(F.conv, {"kernel": self.kernel[...], "bias": None if self.bias is None else self.bias[...]},
                    options=self._options())

    def _check_spatial(self, spatial: int, shape):
        """`Conv(3, 16, 3)` on images: say how to write a 2-D kernel rather than fail on the kernel's rank."""
        if self.spatial_rank is None and len(self.kernel_size) == 1 and spatial > 1:
            k = self.kernel_size[0]
            raise ValueError(f"{type(self).__name__}: an int kernel_size ({k}) means a 1-D kernel, but the input "
                             f"{tuple(shape)} has {spatial} spatial axes: give kernel_size={(k,) * spatial}, or use "
                             f"{type(self).__name__}{spatial}d, where {k} means {'x'.join([str(k)] * spatial)}")

    def _pads(self, in_shape):
        self._check_spatial(len(in_shape) - 1, in_shape)
        _check_rank(type(self).__name__, in_shape, len(self.kernel_size))
        return F.resolve_padding(self.padding, fn=type(self).__name__, in_spatial=in_shape[:-1],
                                 window=self.kernel_size, stride=self.stride, dilation=self.dilation)

    def output_shape(self, in_shape):
        pads = self._pads(in_shape)
        F._check_fits(type(self).__name__, in_shape[:-1], pads, self.kernel_size, self.dilation)
        return (*F.output_spatial(in_shape[:-1], pads, self.kernel_size, self.stride, self.dilation),
                self.kernel.shape[-1])

    def window(self, in_shape):
        return [(F.effective_kernel(k, d), s) for k, d, s in zip(self.kernel_size, self.dilation, self.stride)]

    def flops(self, in_shape):
        """``2 * taps * (the kernel's two channel axes)`` plus one per output for the bias: the
        multiply-adds done, as XLA counts them."""
        out = self.output_shape(in_shape)
        bias = (self.bias is not None) * math.prod(out)
        return 2 * self._taps(in_shape, out) * math.prod(self.kernel.shape[-2:]) + bias

    def _taps(self, in_shape, out):
        """The (output, kernel tap) pairs that land on the input, not on its padding (``out * K`` per
        axis without padding)."""
        return math.prod(F.valid_taps(w, k, s, d, lo, o) for w, k, s, d, (lo, _), o in zip(
            in_shape[:-1], self.kernel_size, self.stride, self.dilation, self._pads(in_shape), out[:-1]))


class ConvTranspose(Conv):
    """N-d transposed convolution, PyTorch's ``ConvTranspose``: kernel ``[*K, C_in, C_out // groups]``."""

    def __init__(self, in_features: int, out_features: int, kernel_size, *, stride=1, padding=0,
                 output_padding=0, dilation=1, groups: int = 1, use_bias: bool = True, kernel_init="he_normal",
                 param_dtype=jnp.float32, dtype=None, grad: str = "auto", rngs: nnx.Rngs):
        n = len(_kernel_tuple(type(self).__name__, kernel_size, self.spatial_rank))
        self.output_padding = F.int_tuple(output_padding, n, fn="ConvTranspose", name="output_padding", minimum=0)
        super().__init__(in_features, out_features, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, use_bias=use_bias, kernel_init=kernel_init, param_dtype=param_dtype,
                         dtype=dtype, grad=grad, rngs=rngs)

    def _kernel_shape(self, c_in, c_out):
        return (*self.kernel_size, c_in, c_out // self.groups)

    def _options(self):
        return {**super()._options(), "output_padding": self.output_padding}

    def spec(self, x):
        self._check_spatial(x.ndim - 2, x.shape)
        return Spec(F.conv_transpose, {"kernel": self.kernel[...],
                                       "bias": None if self.bias is None else self.bias[...]},
                    options=self._options())

    def resolved_padding(self, in_shape):
        """Per axis ``(lo, hi)`` cropped from the output (``"SAME"`` resolved) for one example's shape."""
        _check_rank("ConvTranspose", in_shape, len(self.kernel_size))
        probe = jax.ShapeDtypeStruct((1, *in_shape), jnp.float32)
        w = jax.ShapeDtypeStruct(self.kernel.shape, jnp.float32)
        return F.conv_transpose_geometry(probe, w, fn="ConvTranspose", **self._options())[1]

    def output_shape(self, in_shape):
        pads = self.resolved_padding(in_shape)
        return (*F.transpose_output_spatial(in_shape[:-1], pads, self.kernel_size, self.stride, self.dilation,
                                            self.output_padding), self.kernel.shape[-1] * self.groups)

    def window(self, in_shape):
        # one output reads at most ceil(M / S) consecutive inputs; input steps are 1/S output steps
        return [(-(-F.effective_kernel(k, d) // s), Fraction(1, s))
                for k, d, s in zip(self.kernel_size, self.dilation, self.stride)]

    def _taps(self, in_shape, out):
        """The (input, kernel tap) pairs whose output lands inside the output, not in what ``padding``
        crops: :meth:`Conv._taps` with input and output in swapped roles."""
        return math.prod(F.valid_taps(o, k, s, d, lo, w) for w, k, s, d, (lo, _), o in zip(
            in_shape[:-1], self.kernel_size, self.stride, self.dilation, self.resolved_padding(in_shape), out[:-1]))


class Dense(Layer):
    """Fully connected layer ``x @ kernel + bias`` on ``[N, D_in]``."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, kernel_init="he_normal",
                 param_dtype=jnp.float32, dtype=None, grad: str = "auto", rngs: nnx.Rngs):
        self.grad, self.dtype = grad, dtype
        self.kernel = nnx.Param(initializer(kernel_init)(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def spec(self, x):
        return Spec(F.dense, {"kernel": self.kernel[...], "bias": None if self.bias is None else self.bias[...]})

    def output_shape(self, in_shape):
        if len(in_shape) != 1 or in_shape[0] != self.kernel.shape[0]:
            raise ValueError(f"Dense: expects inputs of shape ({self.kernel.shape[0]},), got {tuple(in_shape)}")
        return (self.kernel.shape[1],)

    def window(self, in_shape):
        return GLOBAL

    def flops(self, in_shape):
        return 2 * math.prod(self.kernel.shape) + (self.bias is not None) * self.kernel.shape[1]


class _Pool(Layer):
    op = None
    spatial_rank: int | None = None  # fixed by the MaxPool1d/2d/3d and AvgPool1d/2d/3d aliases

    def __init__(self, window, *, stride=None, padding="VALID", grad: str = "auto"):
        name = type(self).__name__
        n = 1 if isinstance(window, int) else len(window)  # an int means "the same on every spatial axis"
        F.int_tuple(window, n, fn=name, name="window")
        if stride is not None:
            F.int_tuple(stride, 1 if isinstance(stride, int) else len(stride), fn=name, name="stride")
        self.window_size, self.stride, self.padding, self.grad = window, stride, padding, grad

    def _options(self):
        return dict(stride=self.stride, padding=self.padding)

    def _resolved(self, in_shape):
        n, name = len(in_shape) - 1, type(self).__name__
        if self.spatial_rank is not None and n != self.spatial_rank:
            raise ValueError(f"{name}: takes inputs [*spatial, C] with {self.spatial_rank} spatial axes, "
                             f"got shape {tuple(in_shape)}")
        window = F.int_tuple(self.window_size, n, fn=name, name="window")
        stride = window if self.stride is None else F.int_tuple(self.stride, n, fn=name, name="stride")
        pads = F.resolve_padding(self.padding, fn=name, in_spatial=in_shape[:-1], window=window, stride=stride)
        return window, stride, pads

    def spec(self, x):
        n = self.spatial_rank or (None if isinstance(self.window_size, int) else len(self.window_size))
        window, stride, _ = self._resolved(example_shape(x, n))
        return Spec(type(self).op, {}, (window,), {**self._options(), "stride": stride})

    def output_shape(self, in_shape):
        window, stride, pads = self._resolved(in_shape)
        F._check_fits(type(self).__name__, in_shape[:-1], pads, window, (1,) * len(window), what="window")
        return (*F.output_spatial(in_shape[:-1], pads, window, stride), in_shape[-1])

    def window(self, in_shape):
        window, stride, _ = self._resolved(in_shape)
        return list(zip(window, stride))

    def flops(self, in_shape):
        window, _, _ = self._resolved(in_shape)
        return math.prod(self.output_shape(in_shape)) * math.prod(window)


class MaxPool(_Pool):
    """Max pooling; ``stride=None`` means stride = window."""
    op = staticmethod(F.max_pool)


class AvgPool(_Pool):
    """Average pooling; ``count_include_pad`` as in PyTorch."""
    op = staticmethod(F.avg_pool)

    def __init__(self, window, *, stride=None, padding="VALID", count_include_pad: bool = True, grad="auto"):
        super().__init__(window, stride=stride, padding=padding, grad=grad)
        self.count_include_pad = count_include_pad

    def _options(self):
        return {**super()._options(), "count_include_pad": self.count_include_pad}


class Flatten(Pointwise):
    """``[N, ...] -> [N, prod(...)]`` (channels-last order)."""
    op = staticmethod(F.flatten)

    def output_shape(self, in_shape):
        return (math.prod(in_shape),)

    def window(self, in_shape):
        return GLOBAL


# PyTorch's names, the spatial rank fixed: an int kernel or window means the same on every spatial axis.
def _with_rank(base, rank: int):
    return type(f"{base.__name__}{rank}d", (base,), {
        "spatial_rank": rank, "__module__": __name__,
        "__doc__": f"{base.__name__} on {rank}-D inputs ``[*{rank} spatial, C]``: an int kernel or window means "
                   f"{'x'.join(['k'] * rank)}."})


Conv1d, Conv2d, Conv3d = (_with_rank(Conv, r) for r in (1, 2, 3))
ConvTranspose1d, ConvTranspose2d, ConvTranspose3d = (_with_rank(ConvTranspose, r) for r in (1, 2, 3))
MaxPool1d, MaxPool2d, MaxPool3d = (_with_rank(MaxPool, r) for r in (1, 2, 3))
AvgPool1d, AvgPool2d, AvgPool3d = (_with_rank(AvgPool, r) for r in (1, 2, 3))


class GlobalAvgPool(Pointwise):
    """Mean over all spatial axes: ``[N, *spatial, C] -> [N, C]``."""
    op, flops_per_element = staticmethod(F.global_avg_pool), 1

    def output_shape(self, in_shape):
        return (in_shape[-1],)

    def window(self, in_shape):
        return GLOBAL


class Upsample(Layer):
    """Upsample every spatial axis by an integer ``scale``: ``"nearest"`` or ``"bilinear"`` (PyTorch's,
    ``align_corners=False``)."""

    def __init__(self, scale, *, method: str = "nearest", grad: str = "auto"):
        if method not in ("nearest", "bilinear"):
            raise ValueError(f"Upsample: `method` must be 'nearest' or 'bilinear', got {method!r}")
        F.int_tuple(scale, 1 if isinstance(scale, int) else len(scale), fn="Upsample", name="scale")
        self.scale, self.method, self.grad = scale, method, grad

    def _scale(self, in_shape):
        return F.int_tuple(self.scale, len(in_shape) - 1, fn="Upsample", name="scale")

    def spec(self, x):
        n = None if isinstance(self.scale, int) else len(self.scale)
        return Spec(F.upsample, {}, (self._scale(example_shape(x, n)),), {"method": self.method})

    def output_shape(self, in_shape):
        return (*[w * s for w, s in zip(in_shape[:-1], self._scale(in_shape))], in_shape[-1])

    def window(self, in_shape):
        span = 1 if self.method == "nearest" else 2
        return [(span, Fraction(1, s)) for s in self._scale(in_shape)]

    def flops(self, in_shape):
        # bilinear: per axis, each output element is a 2-tap weighted sum (3 FLOPs); nearest copies
        if self.method == "nearest":
            return 0
        total, shape = 0, list(in_shape)
        for axis, s in enumerate(self._scale(in_shape)):
            shape[axis] *= s
            total += 3 * math.prod(shape) if s > 1 else 0
        return total


class Dropout(Pointwise):
    """Inverted dropout, active unless ``deterministic`` (``model.eval()`` sets it)."""

    flops_per_element = 1

    def __init__(self, drop_rate: float, *, deterministic: bool = False, grad: str = "auto", rngs: nnx.Rngs):
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"Dropout: `drop_rate` must be in [0, 1), got {drop_rate}")
        super().__init__(grad=grad)
        self.drop_rate, self.deterministic = drop_rate, deterministic
        self.rngs = rngs["dropout"].fork()

    def spec(self, x):
        if self.deterministic or self.drop_rate == 0:
            return Spec(F.identity, {})
        return Spec(F.dropout, {}, (self.rngs(),), {"drop_rate": self.drop_rate})


class _Affine(Pointwise):
    """A normalisation with a per-channel ``scale`` and ``bias``."""

    flops_per_element = 2

    def __init__(self, num_features: int, *, epsilon: float, param_dtype, dtype, grad):
        if not epsilon > 0:
            raise ValueError(f"{type(self).__name__}: `epsilon` must be > 0, got {epsilon}")
        super().__init__(grad=grad)
        self.epsilon, self.dtype = epsilon, dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

    def _affine(self):
        return {"scale": self.scale[...], "bias": self.bias[...]}


class BatchNorm(_Affine):
    """Batch normalisation over the last axis; running statistics as ``nnx.BatchStat``.

    Training (``use_running_average=False``) normalises with this batch's biased variance and
    updates ``mean <- momentum * mean + (1 - momentum) * batch_mean`` (the same for var), as Flax.
    Under ``jit`` with a sharded batch the statistics are those of the global batch.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
                 use_running_average: bool = False, param_dtype=jnp.float32, dtype=None, grad: str = "auto",
                 rngs: nnx.Rngs | None = None):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm: `momentum` must be in [0, 1] (the running statistics' decay), got {momentum}")
        super().__init__(num_features, epsilon=epsilon, param_dtype=param_dtype, dtype=dtype, grad=grad)
        self.momentum, self.use_running_average = momentum, use_running_average
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def spec(self, x):
        if self.use_running_average:
            stats = self.cast(self.mean[...], self.var[...])
            return Spec(F.batch_norm, self._affine(), stats, {"epsilon": self.epsilon})
        mean, var = F.batch_moments(jax.lax.stop_gradient(x).astype(jnp.float32))
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1 - m) * mean
        self.var[...] = m * self.var[...] + (1 - m) * var
        return Spec(F.batch_norm_train, self._affine(), options={"epsilon": self.epsilon})


class LayerNorm(_Affine):
    """Normalises each position over its channels (the last axis), as Flax's ``LayerNorm``."""

    def __init__(self, num_features: int, *, epsilon: float = 1e-5, param_dtype=jnp.float32, dtype=None,
                 grad: str = "auto", rngs: nnx.Rngs | None = None):
        super().__init__(num_features, epsilon=epsilon, param_dtype=param_dtype, dtype=dtype, grad=grad)

    def spec(self, x):
        return Spec(F.layer_norm, self._affine(), options={"epsilon": self.epsilon})


class GroupNorm(_Affine):
    """PyTorch's ``GroupNorm``: statistics per example and channel group, independent of the batch."""

    def __init__(self, num_features: int, num_groups: int = 32, *, epsilon: float = 1e-5, param_dtype=jnp.float32,
                 dtype=None, grad: str = "auto", rngs: nnx.Rngs | None = None):
        if not isinstance(num_groups, int) or num_groups < 1 or num_features % num_groups:
            raise ValueError(f"GroupNorm: `num_groups` (={num_groups}) must be a positive int dividing "
                             f"`num_features` (={num_features})")
        super().__init__(num_features, epsilon=epsilon, param_dtype=param_dtype, dtype=dtype, grad=grad)
        self.num_groups = num_groups

    def spec(self, x):
        return Spec(F.group_norm, self._affine(), options={"epsilon": self.epsilon, "num_groups": self.num_groups})


# --------------------------------------------------------------------------- composites


def _check_layer(child, where):
    if not isinstance(child, Layer):
        raise TypeError(f"{where} must be a jaxconv.layers.Layer (subclass it and declare `spec`, `output_shape`, "
                        f"`window` and `flops`), got {type(child).__name__}")
    return child


class Composite(Layer):
    """A layer made of layers; ``grad`` set on it reaches its own combining op (add, concat).

    ``parallel``: whether every child reads the composite's input (branches, as in :class:`Residual` and
    :class:`Concat`) or each child reads the previous one's output (a chain, as in :class:`Sequential`); the
    training FLOP count (:func:`jaxconv.shapes.training_flops`) follows the data that way."""

    parallel = False

    def spec(self, x):
        raise TypeError(f"{type(self).__name__} is a composite: it has no single op")

    def window(self, in_shape):
        raise TypeError(f"{type(self).__name__} is a composite: ask `receptive_field`")

    def _combine(self, op):
        return G.manual(op) if self.grad == "manual" else op


class Sequential(Composite):
    """Layers applied in order; ``input_shape`` (per example) is remembered for the top-level model."""

    def __init__(self, layers, *, input_shape=None, name: str = "sequential", grad: str = "auto"):
        layers = list(layers)
        for i, layer in enumerate(layers):
            _check_layer(layer, f"Sequential: layer {i}")
        self.layers = nnx.List(layers)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.name, self.grad = name, grad

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_and_backward(self, x):
        backs = []
        for layer in self.layers:
            x, back = layer.forward_and_backward(x)
            backs.append(back)

        def back(g):
            grads = {}
            for i in reversed(range(len(backs))):
                g, grads[i] = backs[i](g)
            return g, {"layers": grads}
        return x, back

    def children(self, in_shape, field=None):
        out, shape = [], tuple(in_shape)
        for i, layer in enumerate(self.layers):
            out.append((str(i), layer, shape, field))
            field = None if field is None else layer.receptive_field(shape, field)
            shape = layer.output_shape(shape)
        return out

    def shapes(self, input_shape=None):
        """Per-example output shape after each layer (shape arithmetic only, nothing runs)."""
        return [layer.output_shape(shape) for _, layer, shape, _ in self.children(input_shape or self.input_shape)]

    def output_shape(self, in_shape):
        for layer in self.layers:
            in_shape = layer.output_shape(in_shape)
        return tuple(in_shape)

    def receptive_field(self, in_shape, field):
        for _, layer, shape, _ in self.children(in_shape):
            field = layer.receptive_field(shape, field)
        return field

    def flops(self, in_shape):
        return sum(layer.flops(shape) for _, layer, shape, _ in self.children(in_shape))


def _widest(fields):
    if any(f == GLOBAL for f in fields):
        return GLOBAL
    return tuple((max(r for r, _ in axis), max(j for _, j in axis)) for axis in zip(*fields))


class Residual(Composite):
    """``body(x) + shortcut(x)``, the shortcut the identity when ``None`` (He et al. 2016).

    Backward: the upstream gradient goes to both branches, and their input gradients add.
    Receptive field: the wider branch's; FLOPs: both branches plus the add.
    """

    parallel = True

    def __init__(self, body, shortcut=None, *, grad: str = "auto"):
        self.body = _check_layer(body, "Residual: `body`")
        self.shortcut = Identity() if shortcut is None else _check_layer(shortcut, "Residual: `shortcut`")
        self.grad = grad

    def __call__(self, x):
        return self._combine(F.add)(self.body(x), self.shortcut(x))

    def forward_and_backward(self, x):
        y_body, back_body = self.body.forward_and_backward(x)
        y_short, back_short = self.shortcut.forward_and_backward(x)

        def back(g):
            g_body, g_short = G.add_vjp(g, y_body, y_short)
            dx_body, p_body = back_body(g_body)
            dx_short, p_short = back_short(g_short)
            return F.add(dx_body, dx_short), {"body": p_body, "shortcut": p_short}
        return F.add(y_body, y_short), back

    def children(self, in_shape, field=None):
        return [("body", self.body, tuple(in_shape), field), ("shortcut", self.shortcut, tuple(in_shape), field)]

    def output_shape(self, in_shape):
        body, short = self.body.output_shape(in_shape), self.shortcut.output_shape(in_shape)
        if body != short:
            raise ValueError(f"Residual: the body's output {body} and the shortcut's {short} differ for input "
                             f"{tuple(in_shape)}; give a projection shortcut (e.g. a strided 1x1 Conv)")
        return body

    def receptive_field(self, in_shape, field):
        return _widest([self.body.receptive_field(in_shape, field), self.shortcut.receptive_field(in_shape, field)])

    def flops(self, in_shape):
        return (self.body.flops(in_shape) + self.shortcut.flops(in_shape)
                + math.prod(self.output_shape(in_shape)))


class Concat(Composite):
    """Parallel branches on one input, joined on the channel axis (a U-Net skip: ``Concat(Identity(), deeper)``).

    Backward: the upstream gradient is cut by channels, one piece per branch, and their input
    gradients add. Receptive field: the widest branch's; FLOPs: the branches' (joining costs none).
    """

    parallel = True

    def __init__(self, *branches, grad: str = "auto"):
        if len(branches) < 2:
            raise ValueError(f"Concat: needs at least 2 branches, got {len(branches)}")
        self.branches = nnx.List([_check_layer(b, f"Concat: branch {i}") for i, b in enumerate(branches)])
        self.grad = grad

    def __call__(self, x):
        return self._combine(F.concat)([branch(x) for branch in self.branches])

    def forward_and_backward(self, x):
        ys, backs = zip(*[branch.forward_and_backward(x) for branch in self.branches])

        def back(g):
            dx, grads = None, {}
            for i, (piece, back_i) in enumerate(zip(G.concat_vjp(g, list(ys)), backs)):
                dx_i, grads[i] = back_i(piece)
                dx = dx_i if dx is None else F.add(dx, dx_i)
            return dx, {"branches": grads}
        return F.concat(list(ys)), back

    def children(self, in_shape, field=None):
        return [(str(i), b, tuple(in_shape), field) for i, b in enumerate(self.branches)]

    def output_shape(self, in_shape):
        shapes = [b.output_shape(in_shape) for b in self.branches]
        if len({s[:-1] for s in shapes}) != 1:
            raise ValueError(f"Concat: the branches' outputs {shapes} differ in more than their channels for input "
                             f"{tuple(in_shape)}")
        return (*shapes[0][:-1], sum(s[-1] for s in shapes))

    def receptive_field(self, in_shape, field):
        return _widest([b.receptive_field(in_shape, field) for b in self.branches])

    def flops(self, in_shape):
        return sum(b.flops(in_shape) for b in self.branches)
