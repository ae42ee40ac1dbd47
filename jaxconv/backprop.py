"""Backpropagation through any model by hand: the layer protocol's ``forward_and_backward``.

The forward pass returns, from every layer, leaf or composite, a closure built from the
hand-written vjps of :mod:`jaxconv.grads`; the backward pass starts from the fused cross-entropy
gradient and runs those closures from the loss back to the input. ``jax.grad`` appears nowhere on
this path.
"""
from __future__ import annotations

from flax import nnx

from jaxconv import functional as F
from jaxconv import grads as G


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, prefix + (key,))
    else:
        yield prefix, tree


def manual_value_and_grad(model, params, x, labels, *, label_smoothing: float = 0.0):
    """Loss and parameter gradients of ``cross_entropy(model(x), labels)``, by hand.

    Args:
      model: any protocol layer (a registered model, a ``Sequential`` of ``Residual``/``Concat``
        blocks, ...); its non-parameter state (batch statistics) is used as is.
      params: ``nnx.state(model, nnx.Param)`` or a state of the same structure.
      x: ``[N, *input_shape]`` batch. labels: ``[N]`` integer classes, or ``[N, *spatial]`` for a model
        with one prediction per position.
    Returns:
      ``(loss, grads)`` with ``grads`` shaped like ``params`` (the same as ``jax.grad`` would give).
    """
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits, back = model.forward_and_backward(x)
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    _, grads = back(G.cross_entropy_vjp(1.0, logits, labels, label_smoothing=label_smoothing))
    grads = dict(_flatten(grads))
    flat = []
    for path, variable in nnx.to_flat_state(params):
        if path not in grads:
            raise ValueError(f"manual_value_and_grad: no gradient came back for parameter {'/'.join(map(str, path))}; "
                             f"its layer's backward must return one for every parameter")
        flat.append((path, variable.replace(grads.pop(path).astype(variable.dtype))))
    if grads:
        raise ValueError(f"manual_value_and_grad: gradients for unknown parameters {sorted(grads)}")
    return loss, nnx.from_flat_state(flat)
