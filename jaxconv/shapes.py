"""Output-size arithmetic, receptive fields, parameter and FLOP counts, and the summary table.

FLOPs count a multiply-add as 2 (the convention of most papers and of fvcore/torchinfo's
"mult-adds x 2"), forward pass only, per example.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from jaxconv import functional as F
from jaxconv import layers as L
from jaxconv.models import count_params


def conv_output_size(size: int, kernel: int, *, stride: int = 1, padding=0, dilation: int = 1,
                     strict: bool = False) -> int:
    """``floor((W + P_lo + P_hi - M) / S) + 1`` with ``M = K + (K - 1)(D - 1)``.

    ``padding`` is an int (both sides) or ``(lo, hi)``. With ``strict=True`` a filter that does not
    tile the padded input exactly raises ``ValueError`` showing the fraction, e.g. 7 wide, K=3,
    S=3: ``(7 - 3)/3 + 1 = 2.33``.
    """
    fn = "conv_output_size"
    for name, value, minimum in (("size", size, 1), ("kernel", kernel, 1), ("stride", stride, 1),
                                 ("dilation", dilation, 1)):
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"{fn}: `{name}` must be an int >= {minimum}, got {value!r}")
    lo, hi = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if lo < 0 or hi < 0:
        raise ValueError(f"{fn}: `padding` must be >= 0, got {padding!r}")
    m = F.effective_kernel(kernel, dilation)
    span = size + lo + hi - m
    if span < 0:
        raise ValueError(f"{fn}: effective kernel {m} is larger than the padded input {size + lo + hi}")
    if strict and span % stride:
        exact = Fraction(span, stride) + 1
        raise ValueError(
            f"{fn}: the filter does not tile the input: ({size} + {lo + hi} - {m})/{stride} + 1 = "
            f"{float(exact):.2f}, not an integer"
        )
    return span // stride + 1


def layer_flops(layer, in_shape, out_shape) -> int:
    """Forward FLOPs of one layer for one example (multiply-add = 2)."""
    out_size = math.prod(out_shape)
    if isinstance(layer, L.Conv):
        kernel = layer.kernel.shape
        return 2 * out_size * math.prod(kernel[:-1])
    if isinstance(layer, L.Dense):
        return 2 * math.prod(layer.kernel.shape)
    if isinstance(layer, L._Pool):
        window, _, _ = layer._resolved(in_shape)
        return out_size * math.prod(window)
    if isinstance(layer, L.GlobalAvgPool):
        return math.prod(in_shape)
    if isinstance(layer, (L.ReLU, L.Dropout)):
        return out_size
    if isinstance(layer, L.BatchNorm):
        return 2 * out_size
    return 0


def _layers_and_shape(model, input_shape):
    layers = list(getattr(model, "layers", model))
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("receptive_field/summary: pass `input_shape` (per example, e.g. (28, 28, 1)) for a layer list")
    return layers, tuple(shape)


def receptive_fields(model, input_shape=None):
    """Per layer: per-axis receptive field size (in input pixels) of one output unit, or ``None``
    once a layer mixes all positions (flatten, dense, global pooling)."""
    layers, shape = _layers_and_shape(model, input_shape)
    n = len(shape) - 1
    rf, jump, out = [1] * n, [1] * n, []
    for layer in layers:
        geometry = layer.geometry_for(shape) if rf is not None else "global"
        if geometry == "global":
            rf = None
        elif geometry is not None:
            rf = [r + (m - 1) * j for r, j, (m, _, _) in zip(rf, jump, geometry)]
            jump = [j * s for j, (_, s, _) in zip(jump, geometry)]
        out.append(None if rf is None else tuple(rf))
        shape = layer.output_shape(shape)
    return out


def receptive_field(model, input_shape=None):
    """Receptive field of the last layer that still has spatial axes, per axis: ``r += (M-1) * jump``."""
    spatial = [r for r in receptive_fields(model, input_shape) if r is not None]
    return spatial[-1] if spatial else (1,) * (len(_layers_and_shape(model, input_shape)[1]) - 1)


@dataclass
class Summary:
    """The rows of :func:`summary`; ``str()`` gives the table."""

    name: str
    input_shape: tuple
    rows: list = field(default_factory=list)  # (layer, output shape, params, flops, receptive field)

    @property
    def total_params(self) -> int:
        return sum(r[2] for r in self.rows)

    @property
    def total_flops(self) -> int:
        return sum(r[3] for r in self.rows)

    def __str__(self) -> str:
        head = ("layer", "output shape", "params", "FLOPs", "receptive field")
        body = [(f"{i}: {r[0]}", str(r[1]), f"{r[2]:,}", f"{r[3]:,}", "global" if r[4] is None else "x".join(map(str, r[4])))
                for i, r in enumerate(self.rows)]
        widths = [max(len(h), *(len(b[c]) for b in body)) for c, h in enumerate(head)]
        line = lambda cells: "  ".join(c.ljust(w) if i in (0, 1, 4) else c.rjust(w)
                                       for i, (c, w) in enumerate(zip(cells, widths)))
        rule = "-" * len(line(head))
        totals = [f"{self.name}: input {self.input_shape}",
                  f"total params: {self.total_params:,}", f"total FLOPs per example (forward): {self.total_flops:,}"]
        return "\n".join([rule, line(head), rule, *map(line, body), rule, *totals])

    __repr__ = __str__


def summary(model, input_shape=None) -> Summary:
    """A Keras/torchinfo-style table: layer, output shape, params, FLOPs, receptive field."""
    layers, shape = _layers_and_shape(model, input_shape)
    result = Summary(getattr(model, "name", "model"), shape)
    for layer, rf in zip(layers, receptive_fields(layers, shape)):
        out = layer.output_shape(shape)
        result.rows.append((type(layer).__name__, out, count_params(layer), layer_flops(layer, shape, out), rf))
        shape = out
    return result
