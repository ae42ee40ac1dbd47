"""Hand-written backward passes, one per op in :mod:`jaxconv.functional`.

Convention: ``op_vjp(g, <the forward's positional arguments>, **<its keyword options>)`` returns
the cotangent of each differentiable array argument (a tuple when there is more than one), where
``g`` is the upstream gradient of the forward's output. No Jacobian is ever formed, and nothing
here calls ``jax.grad``/``jax.vjp``: each rule is the closed-form "upstream times local
derivative" of the lectures, expressed with ``jax.lax``.

:func:`manual` wraps a forward op in ``jax.custom_vjp`` so that autodiff runs these rules
instead of its own; layers built with ``grad="manual"`` use it.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv import grouped
from jaxconv import onednn_conv
from jaxconv import functional as F


def _check_g(g, expected_shape, *, fn: str):
    if not hasattr(g, "shape"):
        raise TypeError(f"{fn}: `g` must be an array, got {type(g).__name__}")
    if tuple(g.shape) != tuple(expected_shape):
        raise ValueError(
            f"{fn}: `g` must have the forward output's shape {tuple(expected_shape)}, got {tuple(g.shape)}"
        )


def one_example(forward):
    """The vjp twin of :func:`jaxconv.functional.one_example`: where ``x`` is one example for
    ``forward``, ``g`` and ``x`` gain a batch axis of one, and ``dx`` loses it again (the parameter
    cotangents of a batch of one are the example's own)."""
    def decorate(vjp):
        @functools.wraps(vjp)
        def call(g, x, *args, **options):
            if not F.is_one_example(x, forward.batched_rank(*args, **options)):
                return vjp(g, x, *args, **options)
            try:
                cts = vjp(jnp.asarray(g)[None], x[None], *args, **options)
            except ValueError as e:
                raise ValueError(f"{e} (one example: a batch axis of 1 was added to `g` and `x`)") from None
            return (cts[0][0], *cts[1:]) if isinstance(cts, tuple) else cts[0]
        return call
    return decorate


# --------------------------------------------------------------------------- convolution


@one_example(F.conv)
def conv_vjp(g, x, w, b=None, *, stride=1, padding="VALID", dilation=1, groups: int = 1, precision=None):
    """Cotangents ``(dx, dw, db)`` of :func:`jaxconv.functional.conv`.

    Per spatial axis, with input size W, kernel K, stride S, dilation D, padding (P_lo, P_hi),
    effective kernel ``M = K + (K-1)(D-1)`` and output size O, the forward is
    ``y[o] = sum_k x[o*S + k*D - P_lo] w[k]``.

    **dx** — every x[i] receives ``g[o] w[k]`` where ``o*S + k*D = i + P_lo``: the transposed
    convolution of g (:func:`jaxconv.functional.conv_transpose`, PyTorch's weight being
    ``swapaxes(w)``), whose output_padding is the ``r = (W + P_lo + P_hi - M) mod S`` input rows the
    forward's floor left unread. Spread g out by S (``lhs_dilation = S``) and correlate it with the
    spatially flipped kernel at ``rhs_dilation = D``; substituting ``k' = K-1-k`` gives
    ``dx[i] = sum_k' g_dil[i + k'D - (M-1-P_lo)] w[K-1-k']``, so the padding of g_dil is::

        lo = M - 1 - P_lo,      hi = M - 1 - P_hi + r = W - 1 + P_lo - (O-1)S

    (either may be negative, which crops). With groups G the kernel ``[*K, C_in/G, C_out]`` is
    regrouped to ``[*K, C_out/G, C_in]`` so each group's block is transposed on its own.

    **dw** — a correlation of x with g over positions, contracting the batch axis
    (:func:`jaxconv.functional.conv_weight_grad` gives the padding).

    **db** — g summed over every axis but the last.

    **On a CPU** the backward runs what autodiff of :func:`jaxconv.functional.conv` runs there: for a one-group
    conv, oneDNN's kernels where :func:`jaxconv.onednn_conv.runs` (:func:`jaxconv.onednn_conv.input_grad`,
    :func:`jaxconv.onednn_conv.weight_grad`), else the products :func:`jaxconv.functional.cpu_kernels` chooses,
    written out (:func:`jaxconv.functional.patch_matmul_input_grad`,
    :func:`jaxconv.functional.patch_matmul_weight_grad`); for a depthwise conv or a grouped one of few channels per
    group, sums over the kernel's taps
    (:func:`jaxconv.grouped.input_grad`, :func:`jaxconv.grouped.weight_grad`).
    GPUs and TPUs run the convolutions above.
    """
    fn = "conv_vjp"
    stride, pads, dilation = F.conv_geometry(x, w, fn=fn, stride=stride, padding=padding, dilation=dilation,
                                             groups=groups)
    n = x.ndim - 2
    in_spatial = tuple(x.shape[1:-1])
    out_spatial = F.output_spatial(in_spatial, pads, w.shape[:n], stride, dilation)
    _check_g(g, (x.shape[0], *out_spatial, w.shape[-1]), fn=fn)

    geometry = dict(stride=stride, pads=pads, dilation=dilation)
    # dx: the transposed convolution of g, its output_padding the input rows the forward's floor dropped.
    input_grad = lambda g, w: F.conv_input_grad(g, w, in_spatial, groups=groups, precision=precision, **geometry)
    weight_grad = lambda x, g: F.conv_weight_grad(x, g.astype(x.dtype), w.shape[:n], groups=groups,
                                                  precision=precision, **geometry)
    by_convolutions = lambda g, x, w: (input_grad(g, w), weight_grad(x, g))
    if grouped.runs(x.shape[-1], groups):  # what autodiff of F.conv runs (by taps on a CPU)
        g_x = g.astype(x.dtype)
        dx = grouped.input_grad(g_x, w, x.shape, precision=precision, **geometry)
        dw = grouped.weight_grad(x, g_x, w.shape[:n], group_channels=w.shape[-2], precision=precision, **geometry)
    elif groups == 1 and onednn_conv.runs(x, w, **geometry):  # oneDNN's kernels on a CPU, as autodiff of F.conv
        g_x = g.astype(x.dtype)
        dx = onednn_conv.input_grad(g_x, w, in_spatial, precision=precision, **geometry)
        dw = onednn_conv.weight_grad(x, g_x, w.shape[:n], precision=precision, **geometry)
    elif groups == 1 and any(chosen := F.cpu_kernels(x.shape, w.shape, stride, pads, dilation)[1:]):
        # one group: on a CPU, the products functional.cpu_kernels chooses for autodiff, written out
        spread_x, dot_w = chosen

        def on_a_cpu(g, x, w):
            g = g.astype(x.dtype)
            return (F.patch_matmul_input_grad(g, w, x.shape, precision=precision, **geometry) if spread_x
                    else input_grad(g, w),
                    F.patch_matmul_weight_grad(x, g, w.shape[:n], precision=precision, **geometry) if dot_w
                    else weight_grad(x, g))
        dx, dw = lax.platform_dependent(g, x, w, default=by_convolutions, cpu=on_a_cpu)
    elif groups > 1:  # on a CPU, each group's dense backward, as F.conv runs it there
        dense = lambda g, x, w: conv_vjp(g, x, w, stride=stride, padding=pads, dilation=dilation,
                                         precision=precision)[:2]
        dx, dw = lax.platform_dependent(g, x, w, default=by_convolutions,
                                        cpu=lambda g, x, w: F.per_group(dense, groups, g, x, w))
    else:
        dx, dw = by_convolutions(g, x, w)
    db = jnp.sum(g, axis=tuple(range(g.ndim - 1)))
    return dx.astype(x.dtype), dw.astype(w.dtype), db


@one_example(F.conv_transpose)
def conv_transpose_vjp(g, x, w, b=None, *, stride=1, padding=0, output_padding=0, dilation=1, groups: int = 1,
                       precision=None):
    """Cotangents ``(dx, dw, db)`` of :func:`jaxconv.functional.conv_transpose`.

    dx is a plain conv of g and dw the weight gradient of that conv
    (:func:`jaxconv.functional.conv_transpose_backward` derives both; ``conv_transpose``'s ``custom_jvp`` is
    written so that reverse mode runs the same two, because autodiff's own weight gradient is 25x slower on
    XLA:CPU);
    db is g summed over every axis but the last.
    """
    fn = "conv_transpose_vjp"
    stride, pads, output_padding, dilation = F.conv_transpose_geometry(
        x, w, fn=fn, stride=stride, padding=padding, output_padding=output_padding, dilation=dilation,
        groups=groups)
    n = x.ndim - 2
    out_spatial = F.transpose_output_spatial(x.shape[1:-1], pads, w.shape[:n], stride, dilation, output_padding)
    _check_g(g, (x.shape[0], *out_spatial, w.shape[-1] * groups), fn=fn)
    dx, dw = F.conv_transpose_backward(g, x, w, stride=stride, pads=pads, dilation=dilation, groups=groups,
                                       precision=precision)
    return dx, dw, jnp.sum(g, axis=tuple(range(g.ndim - 1)))


# --------------------------------------------------------------------------- pooling


@one_example(F.max_pool)
def max_pool_vjp(g, x, window, *, stride=None, padding="VALID"):
    """Cotangent of :func:`jaxconv.functional.max_pool`.

    Each window's gradient goes to its first maximum in row-major window order (as JAX autodiff
    does); where windows overlap, the contributions add. The forward's running maximum is redone
    to find, per window offset, where a later element took over; the cotangent then walks that
    chain backwards, so each window's ``g`` lands on the element that last took over.
    """
    fn = "max_pool_vjp"
    window, stride, pads = F.pool_geometry(x, window, fn=fn, stride=stride, padding=padding)
    out_spatial = F.output_spatial(x.shape[1:-1], pads, window, stride)
    _check_g(g, (x.shape[0], *out_spatial, x.shape[-1]), fn=fn)
    x_pad = jnp.pad(x, ((0, 0),) + pads + ((0, 0),), constant_values=-jnp.inf)
    windows = list(F.window_slices(x_pad.shape, window, stride, out_spatial))
    offsets = [offset for offset, *_ in windows]
    _, takes = F.running_max([lax.slice(x_pad, start, limit, strides) for _, start, limit, strides in windows])
    dx_pad = jnp.zeros(x_pad.shape, g.dtype)
    for offset, take in zip(offsets[:0:-1], takes[::-1]):
        dx_pad = dx_pad + F.place_in_window(jnp.where(take, g, 0), offset, stride, x_pad.shape)
        g = jnp.where(take, 0, g)
    dx_pad = dx_pad + F.place_in_window(g, offsets[0], stride, x_pad.shape)
    return F.crop(dx_pad, pads).astype(x.dtype)


@one_example(F.avg_pool)
def avg_pool_vjp(g, x, window, *, stride=None, padding="VALID", count_include_pad: bool = True):
    """Cotangent of :func:`jaxconv.functional.avg_pool`: each window spreads ``g / divisor`` evenly."""
    fn = "avg_pool_vjp"
    window, stride, pads = F.pool_geometry(x, window, fn=fn, stride=stride, padding=padding)
    out_spatial = F.output_spatial(x.shape[1:-1], pads, window, stride)
    _check_g(g, (x.shape[0], *out_spatial, x.shape[-1]), fn=fn)
    if count_include_pad:
        share = g / math.prod(window)
    else:
        counts = F.window_counts(x.shape[1:-1], window, stride, pads)
        share = g / jnp.asarray(counts, g.dtype)[None, ..., None]
    return F.spread_back([share] * math.prod(window), x.shape, window, stride=stride, pads=pads).astype(x.dtype)


@one_example(F.global_avg_pool)
def global_avg_pool_vjp(g, x, *, spatial_rank=None):
    """Cotangent of :func:`jaxconv.functional.global_avg_pool`: ``g / (H*W)`` broadcast over space."""
    F.global_avg_pool(x, spatial_rank=spatial_rank)
    _check_g(g, (x.shape[0], x.shape[-1]), fn="global_avg_pool_vjp")
    spatial = x.shape[1:-1]
    g = g.reshape(g.shape[0], *(1,) * len(spatial), g.shape[-1]) / math.prod(spatial)
    return jnp.broadcast_to(g, x.shape).astype(x.dtype)


# --------------------------------------------------------------------------- dense, activations, reshapes


@one_example(F.dense)
def dense_vjp(g, x, w, b=None, *, precision=None):
    """Cotangents ``(dx, dw, db)`` of :func:`jaxconv.functional.dense`: ``g w^T``, ``x^T g``, ``sum_n g``."""
    fn = "dense_vjp"
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"{fn}: `x` [N, D_in] and `w` [D_in, D_out] do not match: {tuple(x.shape)}, {tuple(w.shape)}")
    _check_g(g, (x.shape[0], w.shape[1]), fn=fn)
    dx = F.matmul(g, w.T.astype(g.dtype), precision=precision)
    dw = F.matmul(x.T.astype(g.dtype), g, precision=precision)
    return dx.astype(x.dtype), dw.astype(w.dtype), jnp.sum(g, axis=0)


def relu_vjp(g, x):
    """Cotangent of :func:`jaxconv.functional.relu`: 0 where ``x <= 0`` (also at 0), else g."""
    _check_g(g, x.shape, fn="relu_vjp")
    return jnp.where(x <= 0, jnp.zeros_like(g), g)


def flatten_vjp(g, x):
    """Cotangent of :func:`jaxconv.functional.flatten`: g reshaped back to x's shape."""
    _check_g(g, (x.shape[0], math.prod(x.shape[1:])), fn="flatten_vjp")
    return g.reshape(x.shape)


def log_softmax_vjp(g, x, axis: int = -1):
    """Cotangent of :func:`jaxconv.functional.log_softmax`: ``g - softmax(x) * sum(g)``."""
    _check_g(g, x.shape, fn="log_softmax_vjp")
    return g - F.softmax(x, axis=axis) * jnp.sum(g, axis=axis, keepdims=True)


def softmax_vjp(g, x, axis: int = -1):
    """Cotangent of :func:`jaxconv.functional.softmax`: ``s * (g - sum(g * s))``."""
    _check_g(g, x.shape, fn="softmax_vjp")
    s = F.softmax(x, axis=axis)
    return s * (g - jnp.sum(g * s, axis=axis, keepdims=True))


def cross_entropy_vjp(g, logits, labels, *, label_smoothing: float = 0.0, reduction: str = "mean"):
    """Fused cotangent of :func:`jaxconv.functional.cross_entropy` w.r.t. the logits.

    ``(softmax(z) - q) * g / N`` for the mean, ``* g`` for the sum, ``* g[:, None]`` for
    ``reduction="none"``, with ``q = (1 - eps) onehot(y) + eps / K``.
    """
    fn = "cross_entropy_vjp"
    F._check_labels(logits, labels, label_smoothing, fn=fn)
    g = jnp.asarray(g, logits.dtype)
    _check_g(g, labels.shape if reduction == "none" else (), fn=fn)
    q = F.smoothed_targets(labels, logits.shape[-1], label_smoothing, logits.dtype)
    diff = F.softmax(logits) - q
    if reduction == "none":
        return diff * g[..., None]
    return diff * (g / labels.size if reduction == "mean" else g)


# --------------------------------------------------------------------------- composition, resampling


def add_vjp(g, a, b):
    """Cotangents ``(da, db)`` of :func:`jaxconv.functional.add`: ``g`` to both."""
    _check_g(g, a.shape, fn="add_vjp")
    return g, g


def concat_vjp(g, xs, *, axis: int = -1):
    """Cotangent of :func:`jaxconv.functional.concat`: ``g`` cut back into the pieces' sizes (a list)."""
    ax = axis % xs[0].ndim
    shape = list(xs[0].shape)
    shape[ax] = sum(v.shape[ax] for v in xs)
    _check_g(g, shape, fn="concat_vjp")
    cuts = np.cumsum([v.shape[ax] for v in xs])[:-1]
    return list(jnp.split(g, cuts, axis=ax))


def identity_vjp(g, x):
    """Cotangent of :func:`jaxconv.functional.identity`: ``g``."""
    _check_g(g, x.shape, fn="identity_vjp")
    return g


@one_example(F.upsample)
def upsample_vjp(g, x, scale, *, method: str = "nearest"):
    """Cotangent of :func:`jaxconv.functional.upsample`: per axis, nearest sums each ``scale``-long
    block of g; bilinear applies the transposed interpolation matrix."""
    fn = "upsample_vjp"
    n = x.ndim - 2
    scale = F.int_tuple(scale, n, fn=fn, name="scale")
    _check_g(g, (x.shape[0], *[w * s for w, s in zip(x.shape[1:-1], scale)], x.shape[-1]), fn=fn)
    for axis, (w, s) in enumerate(zip(x.shape[1:-1], scale), 1):
        if s == 1:
            continue
        if method == "nearest":
            g = jnp.sum(g.reshape(*g.shape[:axis], w, s, *g.shape[axis + 1:]), axis=axis + 1)
        else:
            g = F._along(g, jnp.asarray(F.interpolation_matrix(w, s).T, g.dtype), axis)
    return g.astype(x.dtype)


# --------------------------------------------------------------------------- normalisation, dropout


def _standardised_vjp(g_hat, x_hat, inv, mean):
    """Cotangent of x for ``x_hat = (x - mean(x)) * inv`` (:func:`jaxconv.functional.standardise`), given
    ``g_hat = dL/dx_hat``: ``inv * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat))``."""
    return inv * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat))


def layer_norm_vjp(g, x, scale, bias, *, epsilon: float = 1e-5):
    """Cotangents ``(dx, dscale, dbias)`` of :func:`jaxconv.functional.layer_norm`."""
    _check_g(g, x.shape, fn="layer_norm_vjp")
    mean = F.over_axes((-1,))
    x_hat, inv = F.standardise(x, mean, epsilon=epsilon)
    batch_axes = tuple(range(x.ndim - 1))
    return (_standardised_vjp(g * scale, x_hat, inv, mean), jnp.sum(g * x_hat, axis=batch_axes),
            jnp.sum(g, axis=batch_axes))


def group_norm_vjp(g, x, scale, bias, *, num_groups: int, epsilon: float = 1e-5):
    """Cotangents ``(dx, dscale, dbias)`` of :func:`jaxconv.functional.group_norm`: the standardisation's
    rule applied per (example, group), after ``scale`` (which varies inside a group) is folded into g."""
    _check_g(g, x.shape, fn="group_norm_vjp")
    mean = F.over_groups(num_groups)
    x_hat, inv = F.standardise(x, mean, epsilon=epsilon)
    batch_axes = tuple(range(x.ndim - 1))
    return (_standardised_vjp(g * scale, x_hat, inv, mean), jnp.sum(g * x_hat, axis=batch_axes),
            jnp.sum(g, axis=batch_axes))


# --------------------------------------------------------------------------- normalisation, dropout


def batch_norm_vjp(g, x, scale, bias, mean, var, *, epsilon: float = 1e-5):
    """Cotangents ``(dx, dscale, dbias, dmean, dvar)`` of :func:`jaxconv.functional.batch_norm`
    with the statistics as inputs (inference mode)."""
    _check_g(g, x.shape, fn="batch_norm_vjp")
    axes = tuple(range(x.ndim - 1))
    mean, var = F.statistics_for(x, mean, var)
    inv = lax.rsqrt(var + epsilon)
    x_hat = (x - mean) * inv
    dx = g * (scale * inv)
    dscale = jnp.sum(g * x_hat, axis=axes)
    dbias = jnp.sum(g, axis=axes)
    dmean = -jnp.sum(dx, axis=axes)
    dvar = -0.5 * dscale * scale / (var + epsilon)
    return dx, dscale, dbias, dmean, dvar


def batch_norm_train_vjp(g, x, scale, bias, *, epsilon: float = 1e-5):
    """Cotangents ``(dx, dscale, dbias)`` of :func:`jaxconv.functional.batch_norm_train`.

    With ``x_hat = (x - mu) / sigma`` over the m = N*H*W positions of each channel and
    ``d = g * scale``: ``dx = (d - mean(d) - x_hat * mean(d * x_hat)) / sigma``.
    """
    _check_g(g, x.shape, fn="batch_norm_train_vjp")
    axes = tuple(range(x.ndim - 1))
    mean = F.over_axes(axes)
    x_hat, inv = F.standardise(x, mean, epsilon=epsilon)
    return _standardised_vjp(g * scale, x_hat, inv, mean), jnp.sum(g * x_hat, axis=axes), jnp.sum(g, axis=axes)


def dropout_vjp(g, x, key, *, drop_rate: float, deterministic: bool = False):
    """Cotangent of :func:`jaxconv.functional.dropout`: the same mask (regenerated from ``key``)."""
    _check_g(g, x.shape, fn="dropout_vjp")
    return F.dropout(g, key, drop_rate=drop_rate, deterministic=deterministic)


# --------------------------------------------------------------------------- custom_vjp wrappers

# forward op -> (its vjp, how many leading positional arguments are arrays, how many of those
# get a cotangent). Array arguments past that count (labels, PRNG keys) get none.
_RULES = {
    F.conv: (conv_vjp, 3, 3),
    F.conv_transpose: (conv_transpose_vjp, 3, 3),
    F.add: (add_vjp, 2, 2),
    F.concat: (concat_vjp, 1, 1),
    F.identity: (identity_vjp, 1, 1),
    F.upsample: (upsample_vjp, 1, 1),
    F.layer_norm: (layer_norm_vjp, 3, 3),
    F.group_norm: (group_norm_vjp, 3, 3),
    F.conv1d: (conv_vjp, 3, 3),
    F.conv2d: (conv_vjp, 3, 3),
    F.max_pool: (max_pool_vjp, 1, 1),
    F.avg_pool: (avg_pool_vjp, 1, 1),
    F.global_avg_pool: (global_avg_pool_vjp, 1, 1),
    F.dense: (dense_vjp, 3, 3),
    F.relu: (relu_vjp, 1, 1),
    F.flatten: (flatten_vjp, 1, 1),
    F.log_softmax: (log_softmax_vjp, 1, 1),
    F.softmax: (softmax_vjp, 1, 1),
    F.cross_entropy: (cross_entropy_vjp, 2, 1),
    F.batch_norm: (batch_norm_vjp, 5, 5),
    F.batch_norm_train: (batch_norm_train_vjp, 3, 3),
    F.dropout: (dropout_vjp, 2, 1),
}


def vjp_of(forward):
    """The hand-written vjp of a forward op from :mod:`jaxconv.functional`."""
    try:
        return _RULES[forward][0]
    except KeyError:
        raise ValueError(f"vjp_of: no hand-written backward registered for {getattr(forward, '__name__', forward)!r}")


@functools.lru_cache(maxsize=None)
def manual(forward):
    """``forward`` with its backward pass replaced by the hand-written rule, via ``jax.custom_vjp``.

    ``manual(F.conv)(x, w, b, stride=2)`` computes the same values as ``F.conv``; under
    ``jax.grad`` its cotangents come from :func:`conv_vjp`.
    """
    if forward not in _RULES:
        vjp_of(forward)
    vjp, n_arrays, n_diff = _RULES[forward]

    @functools.wraps(forward)
    def op(*args, **options):
        arrays, rest = list(args[:n_arrays]), args[n_arrays:]
        present = [a is not None for a in arrays]

        def full(arrs):
            it = iter(arrs)
            return [next(it) if p else None for p in present]

        @jax.custom_vjp
        def f(*arrs):
            return forward(*full(arrs), *rest, **options)

        def f_fwd(*arrs):
            return f(*arrs), arrs

        def f_bwd(arrs, g):
            cts = vjp(g, *full(arrs), *rest, **options)
            cts = list(cts) if isinstance(cts, tuple) else [cts]
            cts = cts + [None] * (n_arrays - n_diff)
            return tuple(ct for ct, p in zip(cts, present) if p)

        f.defvjp(f_fwd, f_bwd)
        return f(*[a for a in arrays if a is not None])

    return op
