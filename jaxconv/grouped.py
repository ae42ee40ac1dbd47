"""Depthwise and grouped convolutions (few input channels per group) as two JAX primitives, lowered per platform.

XLA:CPU runs a grouped convolution by looping over its groups: a depthwise conv's forward and backward 24-177x slower
than PyTorch (``python benchmarks/depthwise_vs_torch.py``), a ResNeXt-style one (32 groups of 4 channels) 300x
(``python benchmarks/grouped_vs_torch.py``). On a CPU jaxconv computes such a conv as a sum over its taps and each
group's input channels (one fused loop), and its weight gradient as one pass over the input that sums the products of
nine taps at once (``lax.reduce`` over several operands). Reverse mode cannot derive that pass from the tap sum: it
transposes a sum of taps into one reduction per tap, and XLA:CPU materialises each tap's slice of the input for it
(920 ms of mobilenet_v2's 3,001 ms training step). So the conv is a primitive of its own, bilinear like
``lax.conv_general_dilated``, with its transposes written here:

- ``conv(x, w)`` (``grouped_conv_p``); in x its transpose is :func:`input_grad` (plain JAX: each tap's ``g * w[k]``
  spread back over the input, or at stride 1 with several channels per group a grouped conv of g with the kernel
  flipped), in w :func:`weight_grad`;
- ``weight_grad(x, g)`` (``grouped_weight_grad_p``); in g its transpose is ``conv(x, ct)``, in x ``input_grad(g, ct)``.

Forward mode, reverse mode, ``jax.vmap``, ``jax.hessian`` and the hand-written backward (``grads.conv_vjp``) therefore
run the same kernels. Other platforms lower both primitives to XLA's convolutions.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxconv import functional as F

# The weight gradient sums this many taps' products per pass over the input: ms for 1 / 3 / 9 (a 3x3 kernel's all)
# at batch 16: 3x3 144 @ 56: 96.9 / 29.5 / 21.6; 3x3 576 @ 14: 23.1 / 5.7 / 3.9; 3x3 32 @ 112: 90.2 / 42.5 / 20.0;
# and for 3 / 9 / 16 / 25 / 49: 7x7 96 @ 56 (batch 16): 155 / 100 / 102 / 87 / 94; 3x3 144 @ 32 (batch 128):
# 124 / 81 / 81 / 84 / 84; 3x3 384 @ 8 (batch 128): 14.9 / 8.6 / 8.8 / 11.5 / 9.7.
TAPS_PER_PASS = 9
# Grouped convs go by taps up to this many input channels per group (Cg). ms at batch 8, 56x56, 128 channels, 3x3
# (python benchmarks/grouped_vs_torch.py): forward by taps / XLA's grouped convolution: Cg 4: 11.7 / 82.8, Cg 8: 17.8 /
# 42.8, Cg 16: 217.2 / 34.4 (9 x Cg products per output no longer fuse well). Beyond it functional.conv runs one dense
# conv per group on a CPU (functional.per_group), which at Cg 8 was the slower: 130.1 against 83.7 ms forward and
# backward.
MAX_GROUP_CHANNELS = 8


def runs(c_in: int, groups: int) -> bool:
    """Whether :func:`conv` computes a conv of ``groups`` groups over ``c_in`` input channels: depthwise and grouped
    convs of at most MAX_GROUP_CHANNELS input channels per group (``functional.conv`` runs the others)."""
    return groups > 1 and c_in // groups <= MAX_GROUP_CHANNELS


def conv(x, w, *, stride, pads, dilation, precision=None):
    """The grouped ``conv(x, w)``: ``x [N, *spatial, G * Cg]``, ``w [*kernel, Cg, G * Og]`` of x's dtype, options
    resolved per axis; ``y[.., i*Og + j] = sum_{k, c < Cg} x_pad[.., k*D + o*S, i*Cg + c] w[k, c, i*Og + j]`` (a
    depthwise conv with channel multiplier m: Cg = 1, Og = m)."""
    return grouped_conv_p.bind(x, w, stride=tuple(stride), pads=tuple(map(tuple, pads)), dilation=tuple(dilation),
                               precision=precision)


def weight_grad(x, g, kernel, *, stride, pads, dilation, group_channels=1, precision=None):
    """``dw [*kernel, Cg, C_out]`` of :func:`conv` for the output cotangent g (of x's dtype), ``Cg = group_channels``:
    ``dw[k, c, i*Og + j] = sum_{n,o} x_pad[n, k*D + o*S, i*Cg + c] g[n, o, i*Og + j]``."""
    return grouped_weight_grad_p.bind(x, g, kernel=tuple(kernel), group_channels=group_channels,
                                      stride=tuple(stride), pads=tuple(map(tuple, pads)), dilation=tuple(dilation),
                                      precision=precision)


def input_grad(g, w, x_shape, *, stride, pads, dilation, precision=None):
    """``dx`` of :func:`conv` for the output cotangent g: on a CPU each tap's ``g * w[k]`` (each group's output channels
    summed) spread back over the padded input, or at stride 1 with several channels per group the grouped conv of g
    with the flipped kernel (9-10x faster there); elsewhere XLA's transposed convolution."""
    geometry = dict(stride=stride, pads=pads, dilation=dilation)
    xla = lambda g, w: F.conv_input_grad(g, w, tuple(x_shape[1:-1]), groups=x_shape[-1] // w.shape[-2],
                                         precision=precision, **geometry)
    return lax.platform_dependent(g, w, cpu=functools.partial(_input_grad_by_taps, x_shape=tuple(x_shape), **geometry),
                                  default=xla)


def _accumulator(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _conv_by_taps(x, w, *, stride, pads, dilation, precision):
    del precision  # exact products, accumulated in float32 at least
    acc = _accumulator(x.dtype)
    group_channels, per_group = w.shape[-2], _outputs_per_group(x.shape[-1], w.shape[-2], w.shape[-1])
    _, pieces = F.window_pieces(x, w.shape[:x.ndim - 2], stride=stride, pads=pads, dilation=dilation)
    y = None
    for tap, piece in pieces:
        for c, part in enumerate(_each_groups_channel(piece.astype(acc), group_channels, per_group)):
            term = part * w[(*tap, c)].astype(acc)
            y = term if y is None else y + term
    return y.astype(x.dtype)


def _outputs_per_group(c_in, group_channels, c_out):
    """Og, the output channels of each of the ``c_in // group_channels`` groups."""
    return c_out // (c_in // group_channels)


def _each_groups_channel(piece, group_channels, per_group):
    """For c < Cg: channel c of every group of ``piece [.., G * Cg]``, each repeated for its group's Og outputs:
    ``[.., G * Og]``, aligned with the output channels."""
    for c in range(group_channels):
        part = piece[..., c::group_channels] if group_channels > 1 else piece
        yield jnp.repeat(part, per_group, axis=-1) if per_group > 1 else part


def _conv_by_xla(x, w, *, stride, pads, dilation, precision):
    return F._xla_conv(x, w, stride, pads, dilation, x.shape[-1] // w.shape[-2], precision)


def _input_grad_by_taps(g, w, *, x_shape, stride, pads, dilation):
    acc = _accumulator(g.dtype)
    kernel, group_channels = w.shape[:len(x_shape) - 2], w.shape[-2]
    groups = x_shape[-1] // group_channels
    if group_channels > 1 and all(s == 1 for s in stride):
        # at stride 1, a grouped conv of g with the kernel flipped and each group's in and out channels swapped
        w_t = F.transpose_kernel(jnp.swapaxes(w, -1, -2), groups)
        spans = [(k - 1) * d for k, d in zip(kernel, dilation)]
        return _conv_by_taps(g, w_t.astype(g.dtype), stride=stride, dilation=dilation, precision=None,
                             pads=[(span - lo, span - hi) for span, (lo, hi) in zip(spans, pads)])
    wide = g.astype(acc)
    shares = []
    for tap in np.ndindex(*kernel):  # input channel i*Cg + c gets sum_j g[.., i*Og + j] w[k, c, i*Og + j]
        per_channel = [(wide * w[(*tap, c)].astype(acc)).reshape(*g.shape[:-1], groups, -1).sum(-1)
                       for c in range(group_channels)]
        shares.append(jnp.stack(per_channel, -1).reshape(*g.shape[:-1], x_shape[-1]))
    return F.spread_back(shares, x_shape, kernel, stride=stride, pads=pads, dilation=dilation).astype(g.dtype)


def _weight_grad_by_taps(x, g, *, kernel, group_channels, stride, pads, dilation, precision):
    """Reads the padded input once per TAPS_PER_PASS taps, summing their products over each example's positions in
    one loop (``lax.reduce`` over several operands), then over the batch."""
    del precision
    acc = _accumulator(x.dtype)
    per_group = _outputs_per_group(x.shape[-1], group_channels, g.shape[-1])
    g = g.astype(acc)
    _, pieces = F.window_pieces(x.astype(acc), kernel, stride=stride, pads=pads, dilation=dilation)
    products = [part * g for _, piece in pieces for part in _each_groups_channel(piece, group_channels, per_group)]
    spatial = tuple(range(1, x.ndim - 1))
    sums = []
    for first in range(0, len(products), TAPS_PER_PASS):
        part = products[first:first + TAPS_PER_PASS]
        over_space = lax.reduce(part, [np.array(0, acc)] * len(part),
                                lambda a, b: tuple(u + v for u, v in zip(a, b)), spatial)
        sums += [s.sum(0) for s in over_space]
    return jnp.stack(sums).reshape(*kernel, group_channels, g.shape[-1]).astype(x.dtype)


def _weight_grad_by_xla(x, g, *, kernel, group_channels, stride, pads, dilation, precision):
    return F.conv_weight_grad(x, g, kernel, stride=stride, pads=pads, dilation=dilation,
                              groups=x.shape[-1] // group_channels, precision=precision)


def platform_primitive(name, abstract_eval, by_taps, by_xla):
    """A primitive lowered to ``by_taps`` on a CPU and ``by_xla`` elsewhere; called outside ``jit``, it compiles."""
    p = Primitive(name)
    p.def_abstract_eval(abstract_eval)
    p.def_impl(lambda *args, **params: _compiled(p, tuple(sorted(params.items())))(*args))
    mlir.register_lowering(p, mlir.lower_fun(by_xla, multiple_results=False))
    mlir.register_lowering(p, mlir.lower_fun(by_taps, multiple_results=False), platform="cpu")
    return p


@functools.cache
def _compiled(p, params):
    return jax.jit(functools.partial(p.bind, **dict(params)))


def _conv_shape(x, w, *, stride, pads, dilation, precision):
    out = F.output_spatial(x.shape[1:-1], pads, w.shape[:x.ndim - 2], stride, dilation)
    return typed((x.shape[0], *out, w.shape[-1]), x, w, batch_axis=0)


def _weight_grad_shape(x, g, *, kernel, group_channels, stride, pads, dilation, precision):
    return typed((*kernel, group_channels, g.shape[-1]), x, g, batch_axis=None)


def typed(shape, x, other, *, batch_axis):
    """The result's type: x's dtype, and under explicit sharding (``jax.sharding.AxisType.Explicit``) x's batch
    sharding on ``batch_axis`` (None: replicated, the batch summed). Only the batch axis may be sharded."""
    sharding = getattr(x, "sharding", None)
    if sharding is None or sharding.mesh.empty:
        return jax.core.ShapedArray(shape, x.dtype)
    other_spec = getattr(getattr(other, "sharding", None), "spec", ())
    if any(s is not None for s in (*sharding.spec[1:], *other_spec[1 if batch_axis is None else 0:])):
        raise ValueError(f"jaxconv's conv primitives shard only the batch axis of their input (and of its output's "
                         f"gradient); got {x.str_short(True)} and {other.str_short(True)}")
    spec = [None] * len(shape)
    if batch_axis is not None and len(sharding.spec):
        spec[batch_axis] = sharding.spec[0]
    return jax.core.ShapedArray(shape, x.dtype, sharding=sharding.update(spec=jax.sharding.PartitionSpec(*spec)))


grouped_conv_p = platform_primitive("jaxconv_grouped_conv", _conv_shape, _conv_by_taps, _conv_by_xla)
grouped_weight_grad_p = platform_primitive("jaxconv_grouped_weight_grad", _weight_grad_shape, _weight_grad_by_taps,
                                     _weight_grad_by_xla)


def _conv_transpose_x(ct, x, w, *, stride, pads, dilation, precision):
    return input_grad(ct, w, x.aval.shape, stride=stride, pads=pads, dilation=dilation, precision=precision)


def _conv_transpose_w(ct, x, w, *, stride, pads, dilation, precision):
    return weight_grad(x, ct, w.aval.shape[:x.ndim - 2], stride=stride, pads=pads, dilation=dilation,
                       group_channels=w.aval.shape[-2], precision=precision)


def _weight_grad_transpose_x(ct, x, g, *, kernel, group_channels, stride, pads, dilation, precision):
    return input_grad(g, ct, x.aval.shape, stride=stride, pads=pads, dilation=dilation, precision=precision)


def _weight_grad_transpose_g(ct, x, g, *, kernel, group_channels, stride, pads, dilation, precision):
    return conv(x, ct, stride=stride, pads=pads, dilation=dilation, precision=precision)


ad.defbilinear(grouped_conv_p, _conv_transpose_x, _conv_transpose_w)
ad.defbilinear(grouped_weight_grad_p, _weight_grad_transpose_x, _weight_grad_transpose_g)


# vmap: a mapped axis of x alone joins the batch; otherwise the mapped copies become channels of one depthwise conv
# (copy b's channel c is channel b*C + c, its outputs b*C*m + c*m + j: the layout [B, C*m] flattened).
def _moved(v, axis, size):
    return jnp.moveaxis(v, axis, 0) if axis is not None else jnp.broadcast_to(v, (size, *v.shape))


def _as_channels(v, size):
    """``[B, ..., C] -> [..., B*C]``."""
    return jnp.moveaxis(v, 0, -2).reshape(*v.shape[1:-1], size * v.shape[-1])


def _from_channels(v, size):
    """``[..., B*C] -> [..., B, C]``, the mapped axis second to last."""
    return v.reshape(*v.shape[:-1], size, v.shape[-1] // size)


def _conv_batch(args, dims, **params):
    (x, w), (bx, bw) = args, dims
    if bw is None:
        x = jnp.moveaxis(x, bx, 0)
        y = grouped_conv_p.bind(x.reshape(-1, *x.shape[2:]), w, **params)
        return y.reshape(*x.shape[:2], *y.shape[1:]), 0
    size = (x.shape[bx] if bx is not None else w.shape[bw])
    y = grouped_conv_p.bind(_as_channels(_moved(x, bx, size), size), _as_channels(_moved(w, bw, size), size),
                              **params)
    return _from_channels(y, size), y.ndim - 1


def _weight_grad_batch(args, dims, **params):
    (x, g), (bx, bg) = args, dims
    size = x.shape[bx] if bx is not None else g.shape[bg]
    dw = grouped_weight_grad_p.bind(_as_channels(_moved(x, bx, size), size), _as_channels(_moved(g, bg, size), size),
                                      **params)
    return _from_channels(dw, size), dw.ndim - 1


batching.primitive_batchers[grouped_conv_p] = _conv_batch
batching.primitive_batchers[grouped_weight_grad_p] = _weight_grad_batch
