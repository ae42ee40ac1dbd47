"""Backpropagation through a whole :class:`~jaxconv.models.Sequential` model by hand.

The forward pass records, per layer, a closure built from the hand-written vjps of
:mod:`jaxconv.grads`; the backward pass starts from the fused cross-entropy gradient and calls
those closures from the loss back to the input. ``jax.grad`` appears nowhere on this path.
"""
from __future__ import annotations

from flax import nnx

from jaxconv import functional as F
from jaxconv import grads as G


def manual_value_and_grad(model, params, x, labels, *, label_smoothing: float = 0.0):
    """Loss and parameter gradients of ``cross_entropy(model(x), labels)``, by hand.

    Args:
      model: a ``Sequential`` model (its non-parameter state, e.g. batch statistics, is used as is).
      params: ``nnx.state(model, nnx.Param)`` or a state of the same structure.
      x: ``[N, *input_shape]`` batch. labels: ``[N]`` integer classes.
    Returns:
      ``(loss, grads)`` with ``grads`` shaped like ``params`` (the same as ``jax.grad`` would give).
    """
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    model = nnx.merge(graphdef, params, rest, copy=True)
    backs = []
    h = x
    for layer in model.layers:
        h, back = layer.forward_and_backward(h)
        backs.append(back)
    loss = F.cross_entropy(h, labels, label_smoothing=label_smoothing)
    g = G.cross_entropy_vjp(1.0, h, labels, label_smoothing=label_smoothing)
    layer_grads = {}
    for i in reversed(range(len(backs))):
        g, layer_grads[i] = backs[i](g)
    flat = []
    for path, variable in nnx.to_flat_state(params):
        if path[0] != "layers" or len(path) != 3:
            raise ValueError(f"manual_value_and_grad: unexpected parameter path {path} (expects a Sequential)")
        grad = layer_grads[path[1]][path[2]]
        flat.append((path, variable.replace(grad.astype(variable.dtype))))
    return loss, nnx.from_flat_state(flat)
