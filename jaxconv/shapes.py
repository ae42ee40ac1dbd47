"""Output-size arithmetic, receptive fields, parameter and FLOP counts, and the summary table.

FLOPs: forward pass, per example, a multiply-add counted as 2 (as most papers and fvcore's
"mult-adds x 2"), but only the multiply-adds a layer performs: a conv's kernel taps that land on
padding are not counted, which is also how XLA's cost analysis counts. Each layer answers for
itself (``Layer.flops``). A training step's count (:func:`training_flops`) follows from the forward
counts and where gradients flow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

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


def _start(input_shape):
    return tuple((1, 1) for _ in input_shape[:-1])


def _sizes(field):
    """Per-axis receptive-field sizes in input pixels (``None`` once global); fractional steps of
    transposed convs and upsampling round up."""
    return None if field == L.GLOBAL else tuple(math.ceil(r) for r, _ in field)


def _input_shape(model, input_shape):
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("receptive_field/summary: pass `input_shape` (per example, e.g. (28, 28, 1)) for a model "
                         "built without one")
    return tuple(shape)


def receptive_field(model, input_shape=None):
    """Per-axis receptive field (input pixels) of the last top-level layer that still has spatial axes.

    Each layer maps the field of its input to its output's (``size += (span - 1) * jump``,
    ``jump *= stride``); a residual block or concat takes its widest branch.
    """
    rows = [r for r in summary(model, input_shape, depth=0).rows if r.receptive_field is not None]
    return rows[-1].receptive_field if rows else (1,) * (len(_input_shape(model, input_shape)) - 1)


class Row(NamedTuple):
    layer: str               # the layer's class name
    output_shape: tuple      # per example
    params: int
    flops: int               # forward, per example, multiply-add = 2
    receptive_field: tuple | None  # per axis, in input pixels; None once global
    depth: int = 0           # nesting level: 0 for the model's own layers
    label: str = ""          # index in a Sequential, "body"/"shortcut" in a Residual, branch in a Concat


@dataclass
class Summary:
    """The rows of :func:`summary`, children indented under their composite; ``str()`` gives the table."""

    name: str
    input_shape: tuple
    rows: list = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows if r.depth == 0)

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.rows if r.depth == 0)

    def __str__(self) -> str:
        head = ("layer", "output shape", "params", "FLOPs", "receptive field")
        body = [("  " * r.depth + f"{r.label}: {r.layer}", str(r.output_shape), f"{r.params:,}", f"{r.flops:,}",
                 "global" if r.receptive_field is None else "x".join(map(str, r.receptive_field)))
                for r in self.rows]
        widths = [max(len(h), *(len(b[c]) for b in body)) for c, h in enumerate(head)]
        line = lambda cells: "  ".join(c.ljust(w) if i in (0, 1, 4) else c.rjust(w)
                                       for i, (c, w) in enumerate(zip(cells, widths)))
        rule = "-" * len(line(head))
        totals = [f"{self.name}: input {self.input_shape}",
                  f"total params: {self.total_params:,}", f"total FLOPs per example (forward): {self.total_flops:,}"]
        return "\n".join([rule, line(head), rule, *map(line, body), rule, *totals])

    __repr__ = __str__


def summary(model, input_shape=None, *, depth: int | None = None) -> Summary:
    """A torchinfo-style table of the module tree: layer, output shape, params, FLOPs, receptive field.

    Every number comes from the layer itself (``output_shape``, ``flops``, ``receptive_field``), so a
    layer that cannot answer raises rather than counting as 0. ``depth`` limits the nesting shown
    (``0``: the model's own layers); totals are always the whole model's.
    """
    shape = _input_shape(model, input_shape)
    result = Summary(getattr(model, "name", type(model).__name__), shape)

    def walk(layer, label, in_shape, field, level):
        out = layer.output_shape(in_shape)
        out_field = layer.receptive_field(in_shape, field)
        if level >= 0:
            result.rows.append(Row(type(layer).__name__, out, count_params(layer), layer.flops(in_shape),
                                   _sizes(out_field), level, label))
        if depth is None or level < depth:
            for child_label, child, child_shape, child_field in layer.children(in_shape, field):
                walk(child, child_label, child_shape, child_field, level + 1)
        return out_field

    walk(model, "", shape, _start(shape), -1)
    return result


def training_flops(model, input_shape=None) -> int:
    """FLOPs per example of a training step's forward and backward passes (multiply-add = 2).

    The usual convention, made exact about the data: a layer that gradients pass through costs 3x its
    forward (the input gradient and the weight gradient, or for a parameter-free layer its backward, each
    about one forward; Kaplan et al. 2020). But no program computes the gradient of the data: a layer whose
    input depends on no parameter (the first conv, reading the images) costs 2x with parameters (forward
    and weight gradient) and 1x without (the forward alone). Branches of a :class:`~jaxconv.layers.Composite`
    with ``parallel = True`` all read its input; a composite's own work (a residual add) counts 3x when
    parameters lie upstream of its output.
    """
    shape = _input_shape(model, input_shape)
    return _training_flops(model, shape, after_params=False)[0]


def _training_flops(layer, in_shape, after_params: bool) -> tuple[int, bool]:
    """``(FLOPs, whether parameters lie upstream of the output)`` of ``layer`` on ``in_shape``, given whether
    they lie upstream of its input."""
    children = layer.children(in_shape)
    if not children:
        has_params = count_params(layer) > 0
        factor = 2 + after_params if has_params else (3 if after_params else 1)
        return factor * layer.flops(in_shape), after_params or has_params
    total, upstream, own = 0, after_params, layer.flops(in_shape)
    for _, child, child_shape, _ in children:
        flops, out = _training_flops(child, child_shape, after_params if layer.parallel else upstream)
        total, own = total + flops, own - child.flops(child_shape)
        upstream = upstream or out
    return total + own * (3 if upstream else 1), upstream
