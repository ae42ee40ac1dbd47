"""One-group convolutions as three JAX primitives that run oneDNN's kernels on a CPU (:mod:`jaxconv.onednn`).

``conv(x, w)``, ``input_grad(g, w)`` and ``weight_grad(x, g)`` are the three faces of one trilinear form
``<conv(x, w), g>``: each is bilinear in its two operands, and its transposes are the other two (``conv``'s in x is
``input_grad``, in w ``weight_grad``; ``input_grad``'s in g is ``conv``, in w ``weight_grad``; ``weight_grad``'s in x
is ``input_grad``, in g ``conv``). So reverse mode, forward mode (``jax.jvp``), ``jax.hessian``, reverse over reverse
and the hand-written backward (``grads.conv_vjp``) all run oneDNN's three kernels on a CPU. Each primitive lowers to
the custom call on a CPU and to XLA's convolutions elsewhere. ``jax.vmap`` over the batch of the data folds it into
the batch; any other mapping runs XLA's convolutions under ``vmap``.

:func:`runs` says when ``functional.conv`` takes this path: oneDNN loaded (:func:`jaxconv.onednn.status`), float32
or bfloat16 where oneDNN builds the conv's primitives on this CPU (:func:`jaxconv.onednn.builds`; bfloat16 needs
AVX-512 in oneDNN 3.2, so an AVX2-only CPU gets XLA's convolutions for it), 2 or 3 spatial axes, no negative padding,
a CPU as JAX's default backend (a GPU or TPU host loads nothing), and a process with one device (a custom call is not
split across devices by XLA's partitioner; a mesh of several CPU devices keeps XLA's convolutions). 1-D convs stay
XLA's: through oneDNN, MNIST-1D's small ones made whole training steps slower (mnist1d_cnn 0.99 against 0.59 ms,
mnist1d_deep 7.22 against 6.45 ms, batch 128, alternating in one process), though each layer alone ran 2-4x faster.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching

from jaxconv import functional as F
from jaxconv import onednn
from jaxconv.grouped import platform_primitive, typed

DTYPES = (jnp.float32, jnp.bfloat16)


_suspended = [0]


def runs(x, w, *, stride, pads, dilation) -> bool:
    """Whether :func:`conv` runs oneDNN for a one-group conv of ``x`` and ``w`` with these resolved options: also
    whether oneDNN can build this geometry's primitives in this dtype on this CPU (:func:`jaxconv.onednn.builds`)."""
    if not (not _suspended[0] and jnp.dtype(x.dtype) in DTYPES and x.dtype == w.dtype and 2 <= x.ndim - 2 <= 3
            and all(lo >= 0 and hi >= 0 for lo, hi in pads) and jax.default_backend() == "cpu"
            and jax.device_count() == 1 and onednn.available()):
        return False
    out = F.output_spatial(x.shape[1:-1], pads, w.shape[:x.ndim - 2], stride, dilation)
    return onednn.builds(x.dtype, x.shape, w.shape, (x.shape[0], *out, w.shape[-1]), stride, dilation, pads)


@contextlib.contextmanager
def xla_convolutions():
    """Within it, convs traced are XLA's (a program to hand to XLA's cost analysis, which counts no custom call)."""
    _suspended[0] += 1
    try:
        yield
    finally:
        _suspended[0] -= 1


def conv(x, w, *, stride, pads, dilation, precision=None):
    """``y [N, *out, C_out]`` of a one-group conv of ``x [N, *spatial, C_in]`` with ``w [*kernel, C_in, C_out]``."""
    return conv_p.bind(x, w, **_options(stride, pads, dilation, precision))


def input_grad(g, w, in_spatial, *, stride, pads, dilation, precision=None):
    """``dx [N, *in_spatial, C_in]`` of :func:`conv` for the output cotangent ``g``."""
    return input_grad_p.bind(g, w, in_spatial=tuple(in_spatial), **_options(stride, pads, dilation, precision))


def weight_grad(x, g, kernel, *, stride, pads, dilation, precision=None):
    """``dw [*kernel, C_in, C_out]`` of :func:`conv` for the output cotangent ``g``."""
    return weight_grad_p.bind(x, g, kernel=tuple(kernel), **_options(stride, pads, dilation, precision))


def _options(stride, pads, dilation, precision):
    return dict(stride=tuple(stride), pads=tuple(map(tuple, pads)), dilation=tuple(dilation), precision=precision)


# --------------------------------------------------------------------------- XLA's convolutions (other platforms)

def _conv_xla(x, w, *, stride, pads, dilation, precision):
    return F._xla_conv(x, w, stride, pads, dilation, 1, precision)


def _input_grad_xla(g, w, *, in_spatial, stride, pads, dilation, precision):
    return F.conv_input_grad(g, w, in_spatial, stride=stride, pads=pads, dilation=dilation, groups=1,
                             precision=precision)


def _weight_grad_xla(x, g, *, kernel, stride, pads, dilation, precision):
    return F.conv_weight_grad(x, g, kernel, stride=stride, pads=pads, dilation=dilation, groups=1,
                              precision=precision).astype(x.dtype)


# --------------------------------------------------------------------------- oneDNN's (a CPU)

def _call(target, shape, a, b, *, stride, pads, dilation):
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, a.dtype))
    return call(a, b, strides=np.array(stride, np.int64), dilations=np.array(dilation, np.int64),
                pads_lo=np.array([lo for lo, _ in pads], np.int64), pads_hi=np.array([hi for _, hi in pads], np.int64))


def _conv_cpu(x, w, *, stride, pads, dilation, precision):
    if not onednn.available():
        return _conv_xla(x, w, stride=stride, pads=pads, dilation=dilation, precision=precision)
    out = F.output_spatial(x.shape[1:-1], pads, w.shape[:x.ndim - 2], stride, dilation)
    return _call("jaxconv_onednn_conv", (x.shape[0], *out, w.shape[-1]), x, w, stride=stride, pads=pads,
                 dilation=dilation)


def _input_grad_cpu(g, w, *, in_spatial, stride, pads, dilation, precision):
    if not onednn.available():
        return _input_grad_xla(g, w, in_spatial=in_spatial, stride=stride, pads=pads, dilation=dilation,
                               precision=precision)
    return _call("jaxconv_onednn_input_grad", (g.shape[0], *in_spatial, w.shape[-2]), g, w, stride=stride,
                 pads=pads, dilation=dilation)


def _weight_grad_cpu(x, g, *, kernel, stride, pads, dilation, precision):
    if not onednn.available():
        return _weight_grad_xla(x, g, kernel=kernel, stride=stride, pads=pads, dilation=dilation, precision=precision)
    return _call("jaxconv_onednn_weight_grad", (*kernel, x.shape[-1], g.shape[-1]), x, g, stride=stride, pads=pads,
                 dilation=dilation)


# --------------------------------------------------------------------------- the primitives

def _conv_shape(x, w, *, stride, pads, dilation, precision):
    out = F.output_spatial(x.shape[1:-1], pads, w.shape[:x.ndim - 2], stride, dilation)
    return typed((x.shape[0], *out, w.shape[-1]), x, w, batch_axis=0)


def _input_grad_shape(g, w, *, in_spatial, stride, pads, dilation, precision):
    return typed((g.shape[0], *in_spatial, w.shape[-2]), g, w, batch_axis=0)


def _weight_grad_shape(x, g, *, kernel, stride, pads, dilation, precision):
    return typed((*kernel, x.shape[-1], g.shape[-1]), x, g, batch_axis=None)


conv_p = platform_primitive("jaxconv_onednn_conv", _conv_shape, _conv_cpu, _conv_xla)
input_grad_p = platform_primitive("jaxconv_onednn_input_grad", _input_grad_shape, _input_grad_cpu,
                                  _input_grad_xla)
weight_grad_p = platform_primitive("jaxconv_onednn_weight_grad", _weight_grad_shape, _weight_grad_cpu,
                                   _weight_grad_xla)


def _geometry(params):
    return {k: params[k] for k in ("stride", "pads", "dilation", "precision")}


ad.defbilinear(conv_p,
               lambda ct, x, w, **p: input_grad(ct, w, x.aval.shape[1:-1], **_geometry(p)),
               lambda ct, x, w, **p: weight_grad(x, ct, w.aval.shape[:-2], **_geometry(p)))
ad.defbilinear(input_grad_p,
               lambda ct, g, w, **p: conv(ct, w, **_geometry(p)),
               lambda ct, g, w, **p: weight_grad(ct, g, w.aval.shape[:-2], **_geometry(p)))
ad.defbilinear(weight_grad_p,
               lambda ct, x, g, **p: input_grad(g, ct, x.aval.shape[1:-1], **_geometry(p)),
               lambda ct, x, g, **p: conv(x, ct, **_geometry(p)))


def _batcher(p, xla, fold: bool):
    """vmap: the data's mapped axis alone (``fold``: the first operand's) joins the batch; otherwise XLA's
    convolutions under ``jax.vmap``."""
    def rule(args, dims, **params):
        (a, b), (da, db) = args, dims
        if fold and db is None:
            a = jnp.moveaxis(a, da, 0)
            out = p.bind(a.reshape(-1, *a.shape[2:]), b, **params)
            return out.reshape(*a.shape[:2], *out.shape[1:]), 0
        return jax.vmap(functools.partial(xla, **params), in_axes=(da, db))(a, b), 0
    return rule


batching.primitive_batchers[conv_p] = _batcher(conv_p, _conv_xla, fold=True)
batching.primitive_batchers[input_grad_p] = _batcher(input_grad_p, _input_grad_xla, fold=True)
batching.primitive_batchers[weight_grad_p] = _batcher(weight_grad_p, _weight_grad_xla, fold=False)
