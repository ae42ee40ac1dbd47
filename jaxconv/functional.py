"""Pure forward ops, channels-last, built on ``jax.lax``.

Layouts: activations ``[N, *spatial, C]``; kernels ``[*kernel, C_in // groups, C_out]`` (HWIO).
Each op also takes one example, as PyTorch's do: an input with one axis fewer than a batch has
(a conv's ``x`` of rank ``w.ndim - 1``, a pool's of rank ``len(window) + 1``, ``dense``'s ``[D_in]``,
``cross_entropy``'s ``[K]``) gives the output without its batch axis; see :func:`one_example`.
Every option is validated here, at the Python boundary, so a bad call raises a ``ValueError`` or
``TypeError`` naming the function and argument before anything reaches XLA. Shapes and options
are static under ``jax.jit``, so these checks cost nothing in a compiled step.

Output size along one spatial axis, for conv and pooling alike::

    out = floor((W + P_lo + P_hi - M) / S) + 1,   M = K + (K - 1)(D - 1)

with input size W, kernel/window K, stride S, dilation D and padding (P_lo, P_hi).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Padding = Union[str, int, Sequence[int], Sequence[Sequence[int]]]

_SPATIAL_LETTERS = {1: "W", 2: "HW", 3: "DHW"}


# --------------------------------------------------------------------------- one example or a batch


def one_example(batched_rank):
    """Let an op take one example as well as a batch, as PyTorch's ops do.

    ``batched_rank(*args, **options)`` (the op's arguments after ``x``) says what rank a batch has, or
    ``None`` where the arguments cannot tell (an int pooling window fits any rank; ``x`` is then a
    batch). An ``x`` with one axis fewer is one example: the op runs on a batch of one and the batch
    axis is taken off again, so ``jax.vmap(lambda xi: conv(xi, w))(x)`` equals ``conv(x, w)``.
    """
    def decorate(op):
        @functools.wraps(op)
        def call(x, *args, **options):
            if is_one_example(x, batched_rank(*args, **options)):
                return op(x[None], *args, **options)[0]
            return op(x, *args, **options)
        call.batched_rank = batched_rank
        return call
    return decorate


def is_one_example(x, batched_rank) -> bool:
    return batched_rank is not None and getattr(x, "ndim", None) == batched_rank - 1


def _weight_rank(w, *_, **__):
    """Conv and transposed conv: a batch has the kernel's rank (``[N, *spatial, C]``)."""
    return getattr(w, "ndim", None)


def _window_rank(window, *_, **__):
    """Pooling and upsampling: a batch has ``len(window) + 2`` axes when the window is per axis."""
    return len(window) + 2 if isinstance(window, (tuple, list)) else None


def _matrix_rank(*_, **__):
    return 2


def _spatial_rank_option(*_, spatial_rank=None, **__):
    return None if spatial_rank is None else spatial_rank + 2


# --------------------------------------------------------------------------- validation helpers


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def int_tuple(value, n: int, *, fn: str, name: str, minimum: int = 1) -> tuple[int, ...]:
    """An int (the same on every axis) or a length-``n`` sequence of ints, each ``>= minimum``."""
    if _is_int(value):
        values = (int(value),) * n
    elif isinstance(value, (tuple, list)) and all(_is_int(v) for v in value):
        if len(value) != n:
            raise ValueError(
                f"{fn}: `{name}` must have one entry per spatial axis ({n}), got {len(value)}: {tuple(value)}"
            )
        values = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{fn}: `{name}` must be an int or a sequence of {n} ints, got {value!r}")
    bad = [v for v in values if v < minimum]
    if bad:
        raise ValueError(f"{fn}: `{name}` must be >= {minimum} on every axis, got {values}")
    return values


def _check_array(x, *, fn: str, name: str, min_rank: int | None = None, rank: int | None = None):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{fn}: `{name}` must be an array, got {type(x).__name__}")
    if rank is not None and x.ndim != rank:
        raise ValueError(f"{fn}: `{name}` must have rank {rank}, got rank {x.ndim} (shape {tuple(x.shape)})")
    if min_rank is not None and x.ndim < min_rank:
        raise ValueError(
            f"{fn}: `{name}` must have rank >= {min_rank}, got rank {x.ndim} (shape {tuple(x.shape)})"
        )


def _check_float(x, *, fn: str, name: str):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: `{name}` must be a floating-point array, got dtype {x.dtype}; "
            f"convert it first, e.g. `{name}.astype(jnp.float32) / 255`"
        )


def _spatial_rank(x, *, fn: str, allowed: Sequence[int] = (1, 2, 3)) -> int:
    _check_array(x, fn=fn, name="x", min_rank=3)
    n = x.ndim - 2
    if n not in allowed:
        raise ValueError(
            f"{fn}: `x` must be [N, *spatial, C] with {'/'.join(map(str, allowed))} spatial axes, "
            f"got rank {x.ndim} (shape {tuple(x.shape)})"
        )
    return n


# --------------------------------------------------------------------------- padding


def effective_kernel(kernel: int, dilation: int) -> int:
    """``M = K + (K - 1)(D - 1)``: the span of a dilated kernel."""
    return kernel + (kernel - 1) * (dilation - 1)


def resolve_padding(
    padding: Padding,
    *,
    fn: str,
    in_spatial: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int] | None = None,
) -> tuple[tuple[int, int], ...]:
    """Turn any accepted padding spec into one ``(lo, hi)`` pair per spatial axis.

    Accepted: ``"VALID"``; ``"SAME"`` (TensorFlow/JAX: ``out = ceil(W / S)``, the extra pixel of an
    odd total goes to the high side); ``"CAUSAL"`` (1-D only: ``(M - 1, 0)``); an int (symmetric, as
    in PyTorch); a per-axis sequence of ints; or per-axis ``(lo, hi)`` pairs. Negative padding
    (cropping) is refused.
    """
    n = len(in_spatial)
    dilation = tuple(dilation) if dilation is not None else (1,) * n
    spans = [effective_kernel(k, d) for k, d in zip(window, dilation)]
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0),) * n
        if mode == "SAME":
            pairs = []
            for w_in, m, s in zip(in_spatial, spans, stride):
                out = -(-w_in // s)
                total = max((out - 1) * s + m - w_in, 0)
                pairs.append((total // 2, total - total // 2))
            return tuple(pairs)
        if mode == "CAUSAL":
            if n != 1:
                raise ValueError(f"{fn}: `padding`='CAUSAL' is only defined for 1-D inputs, got {n} spatial axes")
            return ((spans[0] - 1, 0),)
        raise ValueError(
            f"{fn}: `padding` must be 'VALID', 'SAME', 'CAUSAL', an int, or per-axis ints/(lo, hi) pairs; "
            f"got unknown string {padding!r}"
        )
    if _is_int(padding):
        pairs = ((int(padding), int(padding)),) * n
    elif isinstance(padding, (tuple, list)):
        if len(padding) != n:
            raise ValueError(
                f"{fn}: `padding` must have one entry per spatial axis ({n}), got {len(padding)}: {padding!r}"
            )
        pairs = []
        for p in padding:
            if _is_int(p):
                pairs.append((int(p), int(p)))
            elif isinstance(p, (tuple, list)) and len(p) == 2 and all(_is_int(v) for v in p):
                pairs.append((int(p[0]), int(p[1])))
            else:
                raise TypeError(f"{fn}: each `padding` entry must be an int or an (lo, hi) pair of ints, got {p!r}")
        pairs = tuple(pairs)
    else:
        raise TypeError(f"{fn}: `padding` must be a string, an int or a sequence, got {type(padding).__name__}")
    if any(v < 0 for pair in pairs for v in pair):
        raise ValueError(f"{fn}: `padding` must be >= 0 (cropping is not supported), got {pairs}")
    return pairs


def _check_fits(fn: str, in_spatial, pads, window, dilation, what: str = "kernel"):
    for axis, (w_in, (lo, hi), k, d) in enumerate(zip(in_spatial, pads, window, dilation)):
        m = effective_kernel(k, d)
        if w_in + lo + hi < m:
            raise ValueError(
                f"{fn}: {what} span {m} (K={k}, dilation={d}) on spatial axis {axis} is larger than the "
                f"padded input {w_in + lo + hi} (size {w_in} + padding {lo}+{hi})"
            )


# --------------------------------------------------------------------------- convolution


def conv_dimension_numbers(n_spatial: int) -> tuple[str, str, str]:
    """``("NHWC", "HWIO", "NHWC")`` and its 1-D/3-D twins."""
    s = _SPATIAL_LETTERS[n_spatial]
    return f"N{s}C", f"{s}IO", f"N{s}C"


def _check_conv_arrays(x, w, groups, *, fn) -> int:
    """x ``[N, *spatial, C_in]`` and w of rank spatial + 2, both floating; ``groups`` divides C_in.
    Returns the number of spatial axes."""
    _check_array(x, fn=fn, name="x")
    _check_array(w, fn=fn, name="w")
    if w.ndim not in (3, 4, 5):
        raise ValueError(f"{fn}: `w` must be a kernel [*kernel, C_in, C_out] with 1, 2 or 3 spatial axes, got shape "
                         f"{tuple(w.shape)}")
    if x.ndim != w.ndim:
        raise ValueError(f"{fn}: `x` must be a batch [N, *spatial, C] of rank {w.ndim} or one example of rank "
                         f"{w.ndim - 1}, to match the kernel `w` {tuple(w.shape)}; got shape {tuple(x.shape)}")
    n = w.ndim - 2
    _check_float(x, fn=fn, name="x")
    _check_float(w, fn=fn, name="w")
    if not _is_int(groups) or groups < 1:
        raise ValueError(f"{fn}: `groups` must be a positive int, got {groups!r}")
    if x.shape[-1] % groups:
        raise ValueError(f"{fn}: `x.shape[-1]` (C_in={x.shape[-1]}) must be divisible by `groups` (={groups})")
    return n


def conv_geometry(x, w, *, fn, stride, padding, dilation, groups):
    """Validate a conv call; return ``(stride, pads, dilation)`` as per-axis tuples."""
    n = _check_conv_arrays(x, w, groups, fn=fn)
    c_in, c_out = x.shape[-1], w.shape[-1]
    if c_out % groups:
        raise ValueError(f"{fn}: `w.shape[-1]` (C_out={c_out}) must be divisible by `groups` (={groups})")
    if c_in != w.shape[-2] * groups:
        raise ValueError(
            f"{fn}: `x.shape[-1]` (={c_in}) must equal `w.shape[-2] * groups` (={w.shape[-2]} * {groups} "
            f"= {w.shape[-2] * groups})"
        )
    stride = int_tuple(stride, n, fn=fn, name="stride")
    dilation = int_tuple(dilation, n, fn=fn, name="dilation")
    kernel = tuple(w.shape[:n])
    pads = resolve_padding(padding, fn=fn, in_spatial=x.shape[1:-1], window=kernel, stride=stride, dilation=dilation)
    _check_fits(fn, x.shape[1:-1], pads, kernel, dilation)
    return stride, pads, dilation


def _check_bias(b, c_out: int, *, fn: str):
    if b is None:
        return
    _check_array(b, fn=fn, name="b", rank=1)
    if b.shape[0] != c_out:
        raise ValueError(f"{fn}: `b` must have shape ({c_out},) to match the outputs, got {tuple(b.shape)}")


@one_example(_weight_rank)
def conv(x, w, b=None, *, stride=1, padding: Padding = "VALID", dilation=1, groups: int = 1, precision=None):
    """N-d convolution (cross-correlation, as in every deep-learning library).

    Args:
      x: ``[N, *spatial, C_in]`` floating input (1, 2 or 3 spatial axes).
      w: ``[*kernel, C_in // groups, C_out]``.
      b: optional ``[C_out]`` bias.
      stride, dilation: int or one per spatial axis, >= 1.
      padding: see :func:`resolve_padding`.
      groups: ``C_in`` and ``C_out`` are split into this many independent groups.
      precision: passed to ``lax.conv_general_dilated`` (``lax.Precision.HIGHEST`` for exact fp32).
    Mixed dtypes of ``x`` and ``w`` are promoted to their common type.

    Returns:
      ``[N, *out_spatial, C_out]`` with ``out = floor((W + P_lo + P_hi - M) / S) + 1``.
    """
    fn = "conv"
    stride, pads, dilation = conv_geometry(x, w, fn=fn, stride=stride, padding=padding, dilation=dilation,
                                           groups=groups)
    _check_bias(b, w.shape[-1], fn=fn)
    dtype = jnp.result_type(x, w)  # promote mixed precisions, as Flax does
    x, w = x.astype(dtype), w.astype(dtype)
    if groups == 1 and _onednn_conv().runs(x, w, stride=stride, pads=pads, dilation=dilation):  # oneDNN's, a CPU
        y = _onednn_conv().conv(x, w, stride=stride, pads=pads, dilation=dilation, precision=precision)
    elif groups == 1 and any(cpu_kernels(x.shape, w.shape, stride, pads, dilation)):
        y = _cpu_conv(x, w, stride, pads, dilation, precision)
    elif _grouped().runs(x.shape[-1], groups):
        y = _grouped().conv(x, w, stride=stride, pads=pads, dilation=dilation, precision=precision)
    elif groups > 1:  # on a CPU one dense conv per group: forward and backward 8-46x faster than XLA:CPU's grouped
        dense = functools.partial(conv, stride=stride, padding=pads, dilation=dilation, precision=precision)
        y = lax.platform_dependent(x, w, cpu=lambda x, w: per_group(dense, groups, x, w),
                                   default=lambda x, w: _xla_conv(x, w, stride, pads, dilation, groups, precision))
    else:
        y = _xla_conv(x, w, stride, pads, dilation, groups, precision)
    return y if b is None else y + b.astype(y.dtype)


def per_group(fn, groups: int, *arrays):
    """``fn`` of each group's channels of ``arrays`` (every array's last axis split into ``groups`` equal blocks), its
    results' blocks concatenated in group order (a tuple of results concatenated result by result)."""
    results = [fn(*(a[..., i * (a.shape[-1] // groups):(i + 1) * (a.shape[-1] // groups)] for a in arrays))
               for i in range(groups)]
    if isinstance(results[0], tuple):
        return tuple(jnp.concatenate(parts, axis=-1) for parts in zip(*results))
    return jnp.concatenate(results, axis=-1)


def _grouped():
    from jaxconv import grouped  # which builds on this module's window helpers
    return grouped


def _onednn_conv():
    from jaxconv import onednn_conv  # which builds on this module's XLA convolutions
    return onednn_conv


def _xla_conv(x, w, stride, pads, dilation, groups, precision):
    return lax.conv_general_dilated(x, w, window_strides=stride, padding=pads, rhs_dilation=dilation,
                                    dimension_numbers=conv_dimension_numbers(x.ndim - 2), feature_group_count=groups,
                                    precision=precision)


# Where XLA:CPU's convolution is slow, a CPU runs something else (python benchmarks/few_channels.py and
# benchmarks/cpu_convs.py, batch 128 or 16, the 2-core CPU); cpu_kernels says which part of a one-group conv:
# - forward: a conv of at most TAP_SUM_MAX multiply-adds per output (kernel taps x input channels) is a sum of its
#   taps, one fused loop: LeNet-5's first conv (5x5, 1 -> 6 channels) 5.32 -> 0.54 ms, seed_cnn's (3x3, 1 -> 32)
#   3.21 -> 0.61 ms, ResNet-20's (3x3, 3 -> 16) 4.48 -> 1.55 ms; past it, at 5x5 x 6 -> 16 (150), the convolution
#   is the faster (1.04 against 2.02 ms);
# - input gradient: the transpose of patch_matmul (g @ w^T, each tap's piece spread back over the input) where the
#   input channels are at most SCATTER_MAX_CHANNELS (LeNet-5's second conv, 6 channels, 3.32 -> 2.44 ms; at 16
#   channels and stride 1 the convolution is 4x faster), or where XLA's transposed convolution would visit at
#   least SCATTER_MIN_RATIO input positions per output position, i.e. spend that many multiply-adds per useful one
#   (stride 2: 4; a VALID 3x3 on 12x12: 1.44): CIFAR ResNet-18's 3x3 stride-2 conv 97.7 -> 65.5 ms, ResNet-20's
#   6.76 -> 2.94 ms, mnist_cnn's third conv (5x5 -> 3x3) 2.75 -> 1.02 ms; mnist_cnn's second (1.44) would lose,
#   3.86 -> 4.44 ms, and at a ratio of 1 it loses everywhere;
# - weight gradient of a kernel of at most DOT_WEIGHT_GRAD_MAX_TAPS taps (1x1): the transpose of patch_matmul, one
#   matrix product x^T @ g: CIFAR ResNet-18's 1x1 stride-2 conv 28.7 -> 6.3 ms, ResNet-50's 1x1 256 -> 64 at 56x56
#   41.6 -> 19.6 ms (its 1x1 1024 -> 256 at 14x14 loses a little, 11.6 -> 12.8 ms); 3x3 kernels keep XLA's (the
#   patches' product is 1.8-3.2x slower there).
# Whole training steps gain 1-7 % (the stride-1 3x3 convs, at XLA's matmul speed, hold most of their time).
TAP_SUM_MAX = 27
SCATTER_MAX_CHANNELS = 8
SCATTER_MIN_RATIO = 2
DOT_WEIGHT_GRAD_MAX_TAPS = 1


def cpu_kernels(x_shape, w_shape, stride, pads, dilation) -> tuple[bool, bool, bool]:
    """For a one-group conv on a CPU (options resolved per axis): ``(tap sum forward, input gradient spread by
    patch_matmul's transpose, weight gradient by its transpose)``; where False, XLA's convolution. The module's
    thresholds decide (set them to measure the alternatives: ``benchmarks/cpu_convs.py``)."""
    kernel = tuple(w_shape[:-2])
    out = output_spatial(x_shape[1:-1], pads, kernel, stride, dilation)
    waste = math.prod(x_shape[1:-1]) / max(math.prod(out), 1)
    return (math.prod(w_shape[:-1]) <= TAP_SUM_MAX,
            w_shape[-2] <= SCATTER_MAX_CHANNELS or waste >= SCATTER_MIN_RATIO,
            math.prod(kernel) <= DOT_WEIGHT_GRAD_MAX_TAPS)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _cpu_conv(x, w, stride, pads, dilation, precision):
    """A one-group conv with what :func:`cpu_kernels` chooses on a CPU. Its forward is :func:`tap_sum` where the
    taps are few; its derivative (the JVP rule below) is linear in the tangents and written so that reverse mode,
    which transposes it, gets fast programs: the transpose of :func:`patch_matmul` for the input gradient and, for a
    1x1 kernel, the weight gradient where chosen, XLA's convolution elsewhere (autodiff of the tap sum's weight
    gradient is 6x slower). Chosen when the program is lowered for its platform; other platforms run the
    convolution throughout. Forward mode (``jax.jvp``) works as for any op."""
    xla = _one_group_xla(stride, pads, dilation, precision)
    if not cpu_kernels(x.shape, w.shape, stride, pads, dilation)[0]:
        return xla(x, w)
    return lax.platform_dependent(x, w, cpu=functools.partial(tap_sum, stride=stride, pads=pads, dilation=dilation),
                                  default=xla)


def _one_group_xla(stride, pads, dilation, precision):
    """XLA's convolution ``(x, w) -> y`` with these options and one group."""
    return functools.partial(_xla_conv, stride=stride, pads=pads, dilation=dilation, groups=1, precision=precision)


@_cpu_conv.defjvp
def _cpu_conv_jvp(stride, pads, dilation, precision, primals, tangents):
    x, w = primals
    dx, dw = tangents
    _, spread_x, dot_w = cpu_kernels(x.shape, w.shape, stride, pads, dilation)
    xla = _one_group_xla(stride, pads, dilation, precision)
    product = functools.partial(patch_matmul, stride=stride, pads=pads, dilation=dilation, precision=precision)

    def linear(chosen, a, b):  # the product on a CPU where chosen, else the convolution
        return lax.platform_dependent(a, b, cpu=product, default=xla) if chosen else xla(a, b)
    return _cpu_conv(x, w, stride, pads, dilation, precision), linear(spread_x, dx, w) + linear(dot_w, x, dw)


def patch_matmul(x, w, *, stride, pads, dilation, precision=None):
    """``conv(x, w)`` (one group; options resolved per axis) as one matrix product of the input's patches
    ``[N * O, taps * C_in]`` with the kernel ``[taps * C_in, C_out]``. Its transpose in x, which reverse mode
    derives, is the input gradient a few input channels need: ``g @ w^T``, each tap's piece spread out by the
    stride (a slice's transpose: ``lax.pad`` with interior S - 1) and summed; no convolution."""
    out_spatial, pieces = window_pieces(x, w.shape[:x.ndim - 2], stride=stride, pads=pads, dilation=dilation)
    patches = jnp.stack([piece for _, piece in pieces], axis=-2)
    y = jnp.matmul(patches.reshape(-1, math.prod(w.shape[:-1])), w.reshape(-1, w.shape[-1]),
                   precision=precision)
    return y.reshape(x.shape[0], *out_spatial, w.shape[-1])


def tap_sum(x, w, *, stride, pads, dilation):
    """``conv(x, w)`` (one group; options resolved per axis) as a sum over kernel taps and input channels of
    a strided slice of the padded input times a row of the kernel: ``y = sum_{k,c} x_pad[.., k*D + o*S, c] w[k, c]``,
    accumulated in float32 at least. No matrix product: what a few input channels need."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    _, pieces = window_pieces(x, w.shape[:x.ndim - 2], stride=stride, pads=pads, dilation=dilation)
    y = None
    for tap, piece in pieces:
        piece = piece.astype(acc)
        for c in range(w.shape[-2]):
            term = piece[..., c:c + 1] * w[(*tap, c)].astype(acc)
            y = term if y is None else y + term
    return y.astype(x.dtype)


def spread_back(shares, x_shape, window, *, stride, pads, dilation=None):
    """The transpose of :func:`window_pieces`: ``shares[i]``, the cotangent of the i-th piece (window offsets in
    row-major order), placed where that piece was read in the padded input (:func:`place_in_window`), summed, and
    the padding cut off (:func:`crop`): an input-shaped cotangent."""
    padded = (x_shape[0], *[size + lo + hi for size, (lo, hi) in zip(x_shape[1:-1], pads)], x_shape[-1])
    windows = window_slices(padded, window, stride, shares[0].shape[1:-1], dilation)
    total = None
    for share, (_, start, _, _) in zip(shares, windows, strict=True):
        placed = place_in_window(share, start[1:-1], stride, padded)
        total = placed if total is None else total + placed
    return crop(total, pads)


def place_in_window(values, first, stride, padded_shape):
    """``values[o]`` at padded position ``first + o*S`` (zeros elsewhere), per spatial axis: the transpose of the
    strided slice that read them (``lax.pad`` with interior S - 1)."""
    return lax.pad(values, np.array(0, values.dtype), [(0, 0, 0), *[
        (lo, size - lo - s * (o - 1) - 1, s - 1)
        for lo, s, o, size in zip(first, stride, values.shape[1:-1], padded_shape[1:-1])], (0, 0, 0)])


def crop(x_padded, pads):
    """``x_padded`` without ``pads`` (per spatial axis ``(lo, hi)``)."""
    return lax.slice(x_padded, (0, *[lo for lo, _ in pads], 0),
                     (x_padded.shape[0], *[size - hi for (_, hi), size in zip(pads, x_padded.shape[1:-1])],
                      x_padded.shape[-1]))


def patch_matmul_input_grad(g, w, x_shape, *, stride, pads, dilation, precision=None):
    """``dx`` of :func:`patch_matmul` written out: each tap's ``g @ w[k]^T`` spread back over the input
    (:func:`spread_back`); what a CPU's hand-written backward runs where :func:`cpu_kernels` chooses the spread."""
    kernel = w.shape[:len(x_shape) - 2]
    w = w.astype(g.dtype)
    shares = [jnp.matmul(g, w[tap].T, precision=precision) for tap in np.ndindex(*kernel)]
    return spread_back(shares, x_shape, kernel, stride=stride, pads=pads, dilation=dilation)


def patch_matmul_weight_grad(x, g, kernel, *, stride, pads, dilation, precision=None):
    """``dw`` of :func:`patch_matmul` written out: per tap, the piece of the input it read times g,
    ``piece^T @ g`` over every example and position; for a 1x1 kernel one matrix product."""
    _, pieces = window_pieces(x, kernel, stride=stride, pads=pads, dilation=dilation)
    rows = lambda a: a.reshape(-1, a.shape[-1])
    dw = [jnp.matmul(rows(piece).T, rows(g), precision=precision) for _, piece in pieces]
    return jnp.stack(dw).reshape(*kernel, x.shape[-1], g.shape[-1])


def conv_transpose_geometry(x, w, *, fn, stride, padding, output_padding, dilation, groups):
    """Validate a transposed-conv call; return ``(stride, pads, output_padding, dilation)`` per axis.

    ``pads`` are what is cropped from each side of the full output; for ``"SAME"`` the high side may
    be negative (the output grows), so that the output is always ``W * S``.
    """
    n = _check_conv_arrays(x, w, groups, fn=fn)
    c_in = x.shape[-1]
    if w.shape[-2] != c_in:
        raise ValueError(f"{fn}: `w.shape[-2]` (={w.shape[-2]}) must equal `x.shape[-1]` (C_in={c_in}); "
                         f"w is [*kernel, C_in, C_out // groups], PyTorch's weight with its spatial axes first")
    stride = int_tuple(stride, n, fn=fn, name="stride")
    dilation = int_tuple(dilation, n, fn=fn, name="dilation")
    output_padding = int_tuple(output_padding, n, fn=fn, name="output_padding", minimum=0)
    for op, s, d in zip(output_padding, stride, dilation):
        if op >= max(s, d):
            raise ValueError(f"{fn}: `output_padding` must be smaller than the stride or the dilation on every "
                             f"axis, got output_padding={output_padding}, stride={stride}, dilation={dilation}")
    kernel = tuple(w.shape[:n])
    spans = [effective_kernel(k, d) for k, d in zip(kernel, dilation)]
    if isinstance(padding, str) and padding.upper() == "SAME":
        pads = tuple((max(m - s, 0) // 2, m - s - max(m - s, 0) // 2) for m, s in zip(spans, stride))
    elif isinstance(padding, str) and padding.upper() == "CAUSAL":
        raise ValueError(f"{fn}: `padding`='CAUSAL' is not defined for transposed convolutions")
    else:
        pads = resolve_padding(padding, fn=fn, in_spatial=x.shape[1:-1], window=kernel, stride=stride,
                               dilation=dilation)
    out = transpose_output_spatial(x.shape[1:-1], pads, kernel, stride, dilation, output_padding)
    if any(o < 1 for o in out):
        raise ValueError(f"{fn}: `padding` {pads} crops the whole output away (output size {out})")
    return stride, pads, output_padding, dilation


def transpose_output_spatial(in_spatial, pads, kernel, stride, dilation, output_padding):
    """Per-axis output sizes of a transposed conv: ``(W - 1) S - P_lo - P_hi + D (K - 1) + output_padding + 1``."""
    return tuple((w - 1) * s - lo - hi + d * (k - 1) + op + 1
                 for w, (lo, hi), k, s, d, op in zip(in_spatial, pads, kernel, stride, dilation, output_padding))


def transpose_kernel(w, groups: int):
    """``[*K, A, B // G]`` -> ``[*K, A // G, B]``, spatially flipped: the kernel that runs a transposed conv
    as a stride-1 conv over the zero-spread input (group j's block transposed on its own)."""
    n = w.ndim - 2
    a, b_g = w.shape[-2], w.shape[-1]
    w = w.reshape(*w.shape[:n], groups, a // groups, b_g)
    w = jnp.moveaxis(w, -3, -2).reshape(*w.shape[:n], a // groups, groups * b_g)
    return jnp.flip(w, axis=tuple(range(n)))


@one_example(_weight_rank)
def conv_transpose(x, w, b=None, *, stride=1, padding: Padding = 0, output_padding=0, dilation=1, groups: int = 1,
                   precision=None):
    """N-d transposed convolution, exactly PyTorch's ``conv_transpose{1,2,3}d``.

    Args:
      x: ``[N, *spatial, C_in]``.
      w: ``[*kernel, C_in, C_out // groups]`` — PyTorch's weight ``(C_in, C_out // groups, *kernel)`` with
        its spatial axes moved first (``np.moveaxis(w_torch, (0, 1), (-2, -1))``).
      b: optional ``[C_out]``.
      padding: an int, per-axis ints or ``(lo, hi)`` pairs, cropped from the output as in PyTorch;
        ``"VALID"`` (none); or ``"SAME"``: output ``W * S``, the transpose of a ``"SAME"`` conv.
      output_padding: added to the high side of each output axis; smaller than stride or dilation.
    Returns:
      ``[N, *out, C_out]``, ``out = (W - 1) S - P_lo - P_hi + D (K - 1) + output_padding + 1``.

    Computed as the gradient of a convolution is: the input spread out by S (``lhs_dilation``) and
    correlated with the flipped kernel at padding ``M - 1 - P_lo`` and ``M - 1 - P_hi + output_padding``.
    """
    fn = "conv_transpose"
    stride, pads, output_padding, dilation = conv_transpose_geometry(
        x, w, fn=fn, stride=stride, padding=padding, output_padding=output_padding, dilation=dilation,
        groups=groups)
    _check_bias(b, w.shape[-1] * groups, fn=fn)
    dtype = jnp.result_type(x, w)
    y = _conv_transpose(x.astype(dtype), w.astype(dtype), stride, pads, output_padding, dilation, groups, precision)
    return y if b is None else y + b.astype(y.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _conv_transpose(x, w, stride, pads, output_padding, dilation, groups, precision):
    """The transposed conv, with a derivative (the JVP rule below) whose transpose is
    :func:`conv_transpose_backward`: autodiff's own weight gradient here is a conv with ``lhs_dilation = S``, which
    XLA:CPU ran 25x slower (30.5 against 1.22 ms for a 14x14x64 -> 28x28x32 stride-2 layer, batch 32;
    ``benchmarks/conv_transpose_vs_torch.py``). Forward mode (``jax.jvp``, ``jax.hessian``) works as for any op."""
    return spread_conv(x, transpose_kernel(w, groups), stride=stride, pads=pads, output_padding=output_padding,
                       dilation=dilation, groups=groups, precision=precision)


@_conv_transpose.defjvp
def _conv_transpose_jvp(stride, pads, output_padding, dilation, groups, precision, primals, tangents):
    # Linear in (dx, dw). The dx term is the conv itself, whose transpose is a strided conv. The dw term is written
    # as the transpose of the fast weight gradient, so reverse mode, transposing it again, runs exactly that one.
    x, w = primals
    dx, dw = tangents
    static = (stride, pads, output_padding, dilation, groups, precision)
    y = _conv_transpose(x, w, *static)
    weight_grad = functools.partial(conv_transpose_weight_grad, x=x, kernel=w.shape[:x.ndim - 2], stride=stride,
                                    pads=pads, dilation=dilation, groups=groups, precision=precision)
    (w_term,) = jax.linear_transpose(weight_grad, jax.ShapeDtypeStruct(y.shape, y.dtype))(dw)
    return y, _conv_transpose(dx, w, *static) + w_term


def conv_transpose_backward(g, x, w, *, stride, pads, dilation, groups, precision=None):
    """``(dx, dw)`` of a transposed conv (options already resolved per axis), each as a plain conv.

    A transposed conv ``y = T(x)`` is the input gradient of the conv ``C`` from y's space to x's with
    kernel ``w_c = swapaxes(w)`` ``[*K, C_out // G, C_in]`` and the same stride, padding and dilation.
    So its transpose is that conv: ``dx = C(g)`` (cropped to x's size where ``output_padding >= S``
    made C's output longer), and ``dw`` is C's weight gradient (:func:`conv_transpose_weight_grad`).
    """
    n = x.ndim - 2
    in_spatial = tuple(x.shape[1:-1])
    w_c = jnp.swapaxes(w, -1, -2)
    dx = lax.conv_general_dilated(g, w_c.astype(g.dtype), window_strides=stride, padding=pads, rhs_dilation=dilation,
                                  dimension_numbers=conv_dimension_numbers(n), feature_group_count=groups,
                                  precision=precision)
    dx = dx[(slice(None), *[slice(0, wi) for wi in in_spatial])]
    dw = conv_transpose_weight_grad(g, x=x, kernel=w.shape[:n], stride=stride, pads=pads, dilation=dilation,
                                    groups=groups, precision=precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


def conv_transpose_weight_grad(g, *, x, kernel, stride, pads, dilation, groups, precision=None):
    """``dw`` ``[*kernel, C_in, C_out // G]`` of a transposed conv of x, for its output's cotangent g (linear in
    g): the weight gradient of the conv ``C`` of :func:`conv_transpose_backward`, with g as C's input and x as its
    upstream gradient, ``dw_c[k, j, i] = sum_{n,o} g_pad[n, o*S + k*D, j] x[n, o, i]``; x padded with zeros
    where C's output runs past x's size."""
    dx_spatial = output_spatial(g.shape[1:-1], pads, kernel, stride, dilation)
    x_ext = jnp.pad(x, [(0, 0), *[(0, c - wi) for c, wi in zip(dx_spatial, x.shape[1:-1])], (0, 0)])
    dw_c = conv_weight_grad(g, x_ext.astype(g.dtype), kernel, stride=stride, pads=pads, dilation=dilation,
                            groups=groups, precision=precision)
    return jnp.swapaxes(dw_c, -1, -2)


def conv_input_grad(g, w, in_spatial, *, stride, pads, dilation, groups, precision=None):
    """``dx`` of a conv (options resolved per axis) for input spatial sizes ``in_spatial``: the transposed conv
    of g, whose output_padding is the input rows the forward's floor left unread (see
    :func:`jaxconv.grads.conv_vjp`)."""
    n = g.ndim - 2
    out_spatial = g.shape[1:-1]
    dropped = [wi + lo + hi - effective_kernel(k, d) - (o - 1) * s
               for wi, o, (lo, hi), k, s, d in zip(in_spatial, out_spatial, pads, w.shape[:n], stride, dilation)]
    return spread_conv(g, transpose_kernel(jnp.swapaxes(w, -1, -2).astype(g.dtype), groups), stride=stride,
                       pads=pads, output_padding=dropped, dilation=dilation, groups=groups, precision=precision)


def conv_weight_grad(x, g, kernel, *, stride, pads, dilation, groups, precision=None):
    """``dw[k, i, c] = sum_{n,o} x_pad[n, o*S + k*D, i] g[n, o, c]`` of a conv ``x -> g``-shaped output.

    A correlation of x with g over positions, contracting the batch axis: x is read with its channel
    axis as "batch" and its batch axis as "feature"; g is the kernel with ``rhs_dilation = S``; the
    window stride is D. The output length ``(W + P_lo + hi' - ((O-1)S + 1)) // D + 1`` must be K, so
    ``lo' = P_lo, hi' = (O-1)S + M - W - P_lo`` (rows no output used are cut; negative crops).
    With groups, ``batch_group_count = G`` pairs input-channel group j with output group j.
    """
    n = x.ndim - 2
    s = conv_dimension_numbers(n)[0][1:-1]
    spans = [effective_kernel(k, d) for k, d in zip(kernel, dilation)]
    dw_pads = [(lo, (o - 1) * st + m - wi - lo)
               for m, (lo, _), wi, o, st in zip(spans, pads, x.shape[1:-1], g.shape[1:-1], stride)]
    return lax.conv_general_dilated(
        x, g, window_strides=dilation, padding=dw_pads, rhs_dilation=stride,
        dimension_numbers=(f"C{s}N", f"I{s}O", f"{s}NC"), batch_group_count=groups, precision=precision)


def spread_conv(x, w_flipped, *, stride, pads, output_padding, dilation, groups, precision=None):
    """The transposed conv itself, no checks: ``x`` spread out by ``stride``, correlated with the flipped,
    regrouped kernel ``w_flipped`` (:func:`transpose_kernel`). Also the input gradient of :func:`conv`."""
    n = x.ndim - 2
    spans = [effective_kernel(k, d) for k, d in zip(w_flipped.shape[:n], dilation)]
    full = [(m - 1 - lo, m - 1 - hi + op) for m, (lo, hi), op in zip(spans, pads, output_padding)]
    return lax.conv_general_dilated(
        x, w_flipped, window_strides=(1,) * n, padding=full, lhs_dilation=stride, rhs_dilation=dilation,
        dimension_numbers=conv_dimension_numbers(n), feature_group_count=groups, precision=precision)


@one_example(_weight_rank)
def conv1d(x, w, b=None, **options):
    """:func:`conv` for ``x: [N, W, C_in]``, ``w: [K, C_in // groups, C_out]``."""
    _spatial_rank(x, fn="conv1d", allowed=(1,))
    return conv(x, w, b, **options)


@one_example(_weight_rank)
def conv2d(x, w, b=None, **options):
    """:func:`conv` for ``x: [N, H, W, C_in]``, ``w: [KH, KW, C_in // groups, C_out]``."""
    _spatial_rank(x, fn="conv2d", allowed=(2,))
    return conv(x, w, b, **options)


# --------------------------------------------------------------------------- pooling


def pool_geometry(x, window, *, fn, stride, padding):
    """Validate a pooling call; return ``(window, stride, pads)`` as per-axis tuples."""
    n = _spatial_rank(x, fn=fn)
    window = int_tuple(window, n, fn=fn, name="window")
    stride = window if stride is None else int_tuple(stride, n, fn=fn, name="stride")
    pads = resolve_padding(padding, fn=fn, in_spatial=x.shape[1:-1], window=window, stride=stride)
    _check_fits(fn, x.shape[1:-1], pads, window, (1,) * n, what="window")
    return window, stride, pads


def _full(spatial):
    """Per-spatial-axis values extended with 1 for the batch and channel axes."""
    return (1,) + tuple(spatial) + (1,)


def window_slices(padded_shape, window, stride, out_spatial, dilation=None):
    """For each window offset, in row-major order: ``(offset, start, limit, strides)`` of the strided
    slice of the padded input that this offset of every window reads (offset k at ``k * dilation``)."""
    n_batch, *_, c = padded_shape
    dilation = dilation or (1,) * len(window)
    for offset in np.ndindex(*window):
        first = [k * d for k, d in zip(offset, dilation)]
        limit = (n_batch, *[f + s * (m - 1) + 1 for f, s, m in zip(first, stride, out_spatial)], c)
        yield offset, (0, *first, 0), limit, (1, *stride, 1)


def window_pieces(x, window, *, stride, pads, dilation=None, fill=0):
    """``(out_spatial, [(offset, piece), ...])``: x padded by ``pads`` with ``fill``, and for each window offset
    k, in row-major order, the strided slice every window reads there: ``piece[n, o, c] = x_pad[n, o*S + k*D, c]``
    (what pools and the few-channel convs combine)."""
    x_pad = lax.pad(x, np.array(fill, x.dtype), [(0, 0, 0), *[(lo, hi, 0) for lo, hi in pads], (0, 0, 0)])
    out_spatial = output_spatial(x.shape[1:-1], pads, window, stride, dilation)
    return out_spatial, [(offset, lax.slice(x_pad, start, limit, strides)) for offset, start, limit, strides
                         in window_slices(x_pad.shape, window, stride, out_spatial, dilation)]


def output_spatial(in_spatial, pads, window, stride, dilation=None):
    """Per-axis output sizes: ``floor((W + P_lo + P_hi - M) / S) + 1``, ``M = K + (K-1)(D-1)``."""
    dilation = dilation or (1,) * len(window)
    return tuple((w + lo + hi - effective_kernel(k, d)) // s + 1
                 for w, (lo, hi), k, s, d in zip(in_spatial, pads, window, stride, dilation))


def valid_taps(in_size: int, kernel: int, stride: int, dilation: int, pad_lo: int, out_size: int) -> int:
    """How many (output position, kernel tap) pairs along one axis read a real input element rather
    than padding: the multiply-adds a convolution really performs there (what XLA's cost analysis
    counts). Without padding it is ``out_size * kernel``."""
    return sum(1 for o in range(out_size) for k in range(kernel)
               if 0 <= o * stride + k * dilation - pad_lo < in_size)


@one_example(_window_rank)
def max_pool(x, window, *, stride=None, padding: Padding = "VALID"):
    """Max over each window; padding counts as ``-inf``.

    Computed as a running maximum over the window's strided slices that keeps the *first* maximum
    (strict ``>``), so autodiff sends a tied window's gradient to its first maximum, the same rule
    as ``reduce_window``'s, but through cheap selects: on XLA:CPU its backward ran 28x faster
    than ``reduce_window``'s select-and-scatter (1.2 ms vs 34 ms, batch 128 x 28x28x32).
    NaNs propagate as with ``lax.max``.

    Args:
      x: ``[N, *spatial, C]``. window: int or one per spatial axis.
      stride: defaults to ``window`` (non-overlapping windows).
    Returns:
      ``[N, *out_spatial, C]``, sizes as for :func:`conv` with dilation 1.
    """
    window, stride, pads = pool_geometry(x, window, fn="max_pool", stride=stride, padding=padding)
    low = -np.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
    _, pieces = window_pieces(x, window, stride=stride, pads=pads, fill=low)
    return running_max([piece for _, piece in pieces])[0]


def running_max(slices):
    """Fold window slices into their maximum, keeping the *first* maximum (strict ``>``) and letting
    a NaN win, as ``lax.max`` does. Returns ``(maximum, takes)``: ``takes[k - 1]`` is where slice
    ``k`` took over from the slices before it (what :func:`jaxconv.grads.max_pool_vjp` walks back)."""
    best, takes = slices[0], []
    for s in slices[1:]:
        take = (s > best) | (s != s)
        takes.append(take)
        best = jnp.where(take, s, best)
    return best, takes


def window_counts(in_spatial, window, stride, pads):
    """How many real (non-padding) elements each pooling window covers: ``[*out_spatial]`` numpy."""
    ones = np.ones(in_spatial, np.float64)
    padded = np.pad(ones, pads)
    out = output_spatial(in_spatial, pads, window, stride)
    counts = np.zeros(out)
    for offset in np.ndindex(*window):
        idx = tuple(slice(o, o + s * (m - 1) + 1, s) for o, s, m in zip(offset, stride, out))
        counts += padded[idx]
    return counts


@one_example(_window_rank)
def avg_pool(x, window, *, stride=None, padding: Padding = "VALID", count_include_pad: bool = True):
    """Mean over each window, zero padding.

    ``count_include_pad=True`` divides every window by its full size (PyTorch's default);
    ``False`` divides by the number of real elements it covers.
    """
    fn = "avg_pool"
    window, stride, pads = pool_geometry(x, window, fn=fn, stride=stride, padding=padding)
    _check_float(x, fn=fn, name="x")
    summed = lax.reduce_window(x, np.array(0, x.dtype), lax.add, _full(window), _full(stride),
                               ((0, 0),) + pads + ((0, 0),))
    if count_include_pad:
        return summed / math.prod(window)
    counts = window_counts(x.shape[1:-1], window, stride, pads)
    return summed / jnp.asarray(counts, x.dtype)[None, ..., None]


@one_example(_spatial_rank_option)
def global_avg_pool(x, *, spatial_rank: int | None = None):
    """Mean over every spatial axis: ``[N, *spatial, C] -> [N, C]``.

    Any rank fits a batch, so one example ``[*spatial, C] -> [C]`` needs ``spatial_rank`` (as
    PyTorch's ``adaptive_avg_pool2d`` knows its rank); with it, a batch must have ``spatial_rank + 2`` axes.
    """
    fn = "global_avg_pool"
    if spatial_rank is not None:
        if spatial_rank not in (1, 2, 3):
            raise ValueError(f"{fn}: `spatial_rank` must be 1, 2 or 3, got {spatial_rank!r}")
        _check_array(x, fn=fn, name="x", rank=spatial_rank + 2)
    _check_array(x, fn=fn, name="x", min_rank=3)
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


# --------------------------------------------------------------------------- dense, activations, reshapes


def matmul(a, b, *, precision=None):
    """``a @ b`` for 2-D arrays. Low-precision floats (bfloat16, float16) accumulate in float32
    (``preferred_element_type``) and are rounded once to their own dtype at the end; on CPUs with bfloat16
    matrix units that kernel is several times faster than XLA's plain bfloat16 dot (benchmarks/bf16_dense.py)."""
    dtype = jnp.result_type(a, b)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return _low_precision_matmul(a.astype(dtype), b.astype(dtype), precision)
    return jnp.dot(a, b, precision=precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _low_precision_matmul(a, b, precision):
    return _accumulating_dot(a, b, precision)


def _accumulating_dot(u, v, precision):
    """``u @ v`` accumulated in float32, rounded once to ``u``'s dtype."""
    return jnp.dot(u, v, precision=precision, preferred_element_type=jnp.float32).astype(u.dtype)


@_low_precision_matmul.defjvp
def _low_precision_matmul_jvp(precision, primals, tangents):
    a, b = primals
    da, db = tangents
    return (_low_precision_matmul(a, b, precision),
            _low_precision_product(da, b, precision) + _low_precision_product(a, db, precision))


def _low_precision_product(u, v, precision):
    """``u @ v`` in the derivative of the low-precision matmul, linear in the tangent; reverse mode transposes it
    into the two backward products. Autodiff of the float32-accumulating dot would transpose into dots of the
    float32 cotangent and a low-precision operand, which GPUs and TPUs would run in float32; a dot whose output
    is low-precision transposes into low-precision dots (``g @ v^T``, ``u^T @ g``), which their matrix units
    accumulate in float32. XLA:CPU runs such a dot on a slow path and the float32-accumulating one's transposes as
    float32 dots of converted operands (the same program as for the custom rule it replaced), so a CPU keeps that
    form. Forward mode (``jax.jvp``, ``jax.hessian``) works as for any op."""
    low = lambda u, v: jnp.dot(u, v, precision=precision, preferred_element_type=u.dtype)
    return lax.platform_dependent(u, v, cpu=functools.partial(_accumulating_dot, precision=precision), default=low)


@one_example(_matrix_rank)
def dense(x, w, b=None, *, precision=None):
    """Affine map ``x @ w + b``. x: ``[N, D_in]``, w: ``[D_in, D_out]``, b: ``[D_out]``."""
    fn = "dense"
    _check_array(x, fn=fn, name="x", rank=2)
    _check_array(w, fn=fn, name="w", rank=2)
    _check_float(x, fn=fn, name="x")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"dense: `x.shape[1]` (={x.shape[1]}) must equal `w.shape[0]` (={w.shape[0]})")
    _check_bias(b, w.shape[1], fn=fn)
    y = matmul(x, w, precision=precision)
    return y if b is None else y + b.astype(y.dtype)


def add(a, b):
    """``a + b`` for two arrays of one shape (a residual connection); no broadcasting."""
    for name, v in (("a", a), ("b", b)):
        _check_array(v, fn="add", name=name)
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"add: `a` and `b` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a + b


def concat(xs, *, axis: int = -1):
    """Join arrays along ``axis`` (default: channels); every other axis must agree."""
    if not isinstance(xs, (list, tuple)) or not xs:
        raise TypeError(f"concat: `xs` must be a non-empty list of arrays, got {type(xs).__name__}")
    for i, v in enumerate(xs):
        _check_array(v, fn="concat", name=f"xs[{i}]")
    ndim = xs[0].ndim
    if not -ndim <= axis < ndim:
        raise ValueError(f"concat: `axis` must be in [{-ndim}, {ndim}), got {axis}")
    ax = axis % ndim
    rest = lambda shape: tuple(d for i, d in enumerate(shape) if i != ax)
    for i, v in enumerate(xs[1:], 1):
        if v.ndim != ndim or rest(v.shape) != rest(xs[0].shape):
            raise ValueError(f"concat: every axis but {axis} must agree: `xs[0]` has shape {tuple(xs[0].shape)}, "
                             f"`xs[{i}]` has {tuple(v.shape)}")
    return jnp.concatenate(list(xs), axis=ax)


def identity(x):
    """``x`` itself (the shortcut of a residual block, a branch that passes its input through)."""
    return x


@one_example(_window_rank)
def upsample(x, scale, *, method: str = "nearest"):
    """Upsample every spatial axis by an integer ``scale`` (int or one per axis).

    ``"nearest"`` repeats each pixel (PyTorch ``mode="nearest"``); ``"bilinear"`` (linear on 1-D,
    trilinear on 3-D) interpolates with ``align_corners=False``, as PyTorch's ``Upsample``, through one
    small interpolation matrix per axis.
    Returns ``[N, *(W * scale), C]``.
    """
    fn = "upsample"
    n = _spatial_rank(x, fn=fn)
    scale = int_tuple(scale, n, fn=fn, name="scale")
    if method not in ("nearest", "bilinear"):
        raise ValueError(f"{fn}: `method` must be 'nearest' or 'bilinear', got {method!r}")
    for axis, s in enumerate(scale, 1):
        if s == 1:
            continue
        if method == "nearest":
            x = jnp.repeat(x, s, axis=axis)
        else:
            _check_float(x, fn=fn, name="x")
            x = _along(x, jnp.asarray(interpolation_matrix(x.shape[axis], s), x.dtype), axis)
    return x


def interpolation_matrix(size: int, scale: int) -> np.ndarray:
    """``[size * scale, size]`` weights of linear interpolation with ``align_corners=False``: output ``i``
    samples input position ``(i + 0.5) / scale - 0.5``, clamped to ``[0, size - 1]``."""
    pos = np.clip((np.arange(size * scale) + 0.5) / scale - 0.5, 0, size - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, size - 1)
    frac = pos - lo
    m = np.zeros((size * scale, size))
    np.add.at(m, (np.arange(size * scale), lo), 1 - frac)
    np.add.at(m, (np.arange(size * scale), hi), frac)
    return m


def _along(x, matrix, axis: int):
    """Apply ``matrix [out, in]`` along ``axis`` of ``x``."""
    return jnp.moveaxis(jnp.tensordot(matrix, x, axes=((1,), (axis,))), 0, axis)


def relu(x):
    """``max(x, 0)`` with derivative 0 at 0 (``jnp.maximum`` would give 0.5 there); NaN stays NaN."""
    return jnp.where(x <= 0, jnp.zeros_like(x), x)


def flatten(x):
    """``[N, ...] -> [N, prod(...)]``."""
    _check_array(x, fn="flatten", name="x", min_rank=1)
    return jnp.reshape(x, (x.shape[0], -1))


def log_softmax(x, axis: int = -1):
    """Numerically stable ``x - logsumexp(x)``."""
    shifted = x - lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))


def softmax(x, axis: int = -1):
    """Numerically stable softmax."""
    return jnp.exp(log_softmax(x, axis=axis))


def smoothed_targets(labels, num_classes: int, label_smoothing: float, dtype):
    """``(1 - eps) * onehot(y) + eps / K``."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=dtype)
    return onehot * (1.0 - label_smoothing) + label_smoothing / num_classes


def _check_labels(logits, labels, label_smoothing, *, fn):
    _check_array(logits, fn=fn, name="logits", min_rank=1)
    _check_array(labels, fn=fn, name="labels")
    _check_float(logits, fn=fn, name="logits")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{fn}: `labels` must be integer class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{fn}: `labels` must have the shape of `logits` without its class axis, "
                         f"{tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{fn}: `label_smoothing` must be in [0, 1), got {label_smoothing}")
    if not isinstance(labels, jax.core.Tracer):
        values = np.asarray(labels)
        k = logits.shape[-1]
        if values.size and (values.min() < 0 or values.max() >= k):
            raise ValueError(
                f"{fn}: `labels` must lie in [0, {k - 1}] for {k} classes, got values in "
                f"[{values.min()}, {values.max()}]"
            )


def cross_entropy(logits, labels, *, label_smoothing: float = 0.0, reduction: str = "mean"):
    """Softmax cross-entropy with integer labels.

    Args:
      logits: ``[N, K]`` floats, or ``[N, *spatial, K]`` for one prediction per position (as PyTorch's
        ``[N, K, *spatial]``, channels last), or ``[K]`` for one example. labels: the shape of ``logits``
        without its class axis, ints in ``[0, K)`` (checked when concrete).
      label_smoothing: target ``(1 - eps) * onehot + eps / K``.
      reduction: ``"mean"`` over every example and position (default), ``"sum"`` or ``"none"``
        (the shape of ``labels``).
    """
    fn = "cross_entropy"
    _check_labels(logits, labels, label_smoothing, fn=fn)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{fn}: `reduction` must be 'mean', 'sum' or 'none', got {reduction!r}")
    targets = smoothed_targets(labels, logits.shape[-1], label_smoothing, logits.dtype)
    per_example = -jnp.sum(targets * log_softmax(logits), axis=-1)
    if reduction == "none":
        return per_example
    return jnp.sum(per_example) if reduction == "sum" else jnp.mean(per_example)


# --------------------------------------------------------------------------- normalisation, dropout


def batch_norm(x, scale, bias, mean, var, *, epsilon: float = 1e-5):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the channel axis (the last); elementwise, so one
    example ``[*spatial, C]`` (or ``[C]``) works as a batch does."""
    _check_array(x, fn="batch_norm", name="x", min_rank=1)
    c = x.shape[-1]
    for name, v in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var)):
        if tuple(v.shape) != (c,):
            raise ValueError(f"batch_norm: `{name}` must have shape ({c},) to match `x.shape[-1]`, got {tuple(v.shape)}")
    mean, var = statistics_for(x, mean, var)
    inv = lax.rsqrt(var + epsilon) * scale
    return (x - mean) * inv + bias


def statistics_for(x, mean, var):
    """Running statistics in the wider of their dtype and ``x``'s: float32 statistics (as Flax keeps them) with
    float64 data are normalised in float64, not through a float32 ``rsqrt``, whose last bit differs between
    compiled programs on some CPUs; float32 or bfloat16 data keep float32 statistics."""
    dtype = jnp.result_type(x.dtype, mean.dtype, var.dtype)
    return mean.astype(dtype), var.astype(dtype)


def batch_moments(x):
    """Per-channel mean and biased variance over every axis but the last."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return mean, var


def batch_norm_train(x, scale, bias, *, epsilon: float = 1e-5):
    """:func:`batch_norm` with the statistics of this batch (training mode)."""
    mean, var = batch_moments(x)
    return batch_norm(x, scale, bias, mean, var, epsilon=epsilon)


def standardise(x, mean, *, epsilon):
    """``(x - m) / sqrt(v + eps)`` and ``1 / sqrt(v + eps)``, with ``m = mean(x)`` and the biased variance
    ``v = mean((x - m)^2)``; ``mean`` maps an array to its means, broadcastable against it (:func:`over_axes`,
    :func:`over_groups`)."""
    centred = x - mean(x)
    inv = lax.rsqrt(mean(jnp.square(centred)) + epsilon)
    return centred * inv, inv


def over_axes(axes):
    """The mean over ``axes``, kept for broadcasting: a ``mean`` for :func:`standardise`."""
    return lambda v: jnp.mean(v, axis=axes, keepdims=True)


def over_groups(num_groups: int):
    """The mean over each example's group of channels and every position of ``[N, *spatial, C]``, as
    ``[N, 1, ..., 1, C]`` (each channel its group's): a ``mean`` for :func:`standardise`. Summed per channel over
    the positions first, then per group, which XLA:CPU runs faster than one reduction over the axes of
    ``[N, *spatial, G, C // G]``: a (128, 28, 28, 32) GroupNorm with 4 groups 3.70 -> 1.50 ms forward, 11.95 -> 7.37
    ms forward and backward; unet_small's training step 137.6 -> 125.9 ms (``benchmarks/group_norm.py``)."""
    def mean(v):
        n, c = v.shape[0], v.shape[-1]
        positions = math.prod(v.shape[1:-1])
        per_channel = jnp.sum(v.reshape(n, positions, c), axis=1, dtype=jnp.promote_types(v.dtype, jnp.float32))
        per_group = jnp.sum(per_channel.reshape(n, num_groups, c // num_groups), axis=-1)
        count = positions * (c // num_groups)
        return jnp.repeat(per_group / count, c // num_groups, axis=1).astype(v.dtype).reshape(
            n, *(1,) * (v.ndim - 2), c)
    return mean


def _check_affine(x, scale, bias, *, fn):
    c = x.shape[-1]
    for name, v in (("scale", scale), ("bias", bias)):
        if tuple(v.shape) != (c,):
            raise ValueError(f"{fn}: `{name}` must have shape ({c},) to match `x.shape[-1]`, got {tuple(v.shape)}")


def layer_norm(x, scale, bias, *, epsilon: float = 1e-5):
    """Normalise each position over its channels (the last axis), then ``* scale + bias`` per channel.

    Independent of the batch, as Flax's ``LayerNorm`` (and PyTorch's ``LayerNorm(C)`` on
    channels-last data). x: ``[..., C]``; scale, bias: ``[C]``; biased variance.
    """
    _check_array(x, fn="layer_norm", name="x", min_rank=1)
    _check_affine(x, scale, bias, fn="layer_norm")
    return standardise(x, over_axes((-1,)), epsilon=epsilon)[0] * scale + bias


def group_norm(x, scale, bias, *, num_groups: int, epsilon: float = 1e-5):
    """PyTorch's ``GroupNorm``: per example, the channels split into ``num_groups`` groups, each group
    normalised over its channels and every spatial position; then ``* scale + bias`` per channel.

    x: ``[N, *spatial, C]`` (or ``[N, C]``), ``C`` divisible by ``num_groups``; scale, bias: ``[C]``.
    ``num_groups=1`` normalises over everything but the batch; ``num_groups=C`` is instance norm.
    """
    fn = "group_norm"
    _check_array(x, fn=fn, name="x", min_rank=2)
    _check_affine(x, scale, bias, fn=fn)
    c = x.shape[-1]
    if not _is_int(num_groups) or num_groups < 1 or c % num_groups:
        raise ValueError(f"{fn}: `num_groups` must be a positive int dividing C={c}, got {num_groups!r}")
    return standardise(x, over_groups(num_groups), epsilon=epsilon)[0] * scale + bias


def dropout(x, key, *, drop_rate: float, deterministic: bool = False):
    """Inverted dropout: zero each element with probability ``drop_rate``, scale the rest by ``1/(1-p)``."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"dropout: `drop_rate` must be in [0, 1), got {drop_rate}")
    if deterministic or drop_rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - drop_rate, x.shape)
    return jnp.where(keep, x / (1.0 - drop_rate), jnp.zeros_like(x))


__all__ = [
    "conv", "conv1d", "conv2d", "conv_transpose", "upsample", "add", "concat", "identity", "layer_norm",
    "group_norm", "max_pool", "avg_pool", "global_avg_pool", "dense", "relu", "flatten",
    "log_softmax", "softmax", "cross_entropy", "batch_norm", "batch_norm_train", "batch_moments", "dropout", "resolve_padding",
    "effective_kernel",
]
