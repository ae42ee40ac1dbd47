"""PyTorch twins of jaxconv models, for parity tests, benchmarks and porting weights (needs ``torch``).

    net = torch_twin(model)                       # an nn.Module on NCHW input, jaxconv's weights copied
    load_torch_state_dict(model, net.state_dict())  # and back: a PyTorch checkpoint into jaxconv

The twin mirrors the module tree, so its ``state_dict`` keys follow jaxconv's parameter paths:
``layers.3.body.layers.0.weight`` is ``model.layers[3].body.layers[0].kernel``. Each layer type
has one converter (registered with :func:`converts`) that builds its PyTorch module and names how
each of its arrays maps across (PyTorch's weight layouts: conv ``(O, I, *K)``, transposed conv
``(I, O/G, *K)``, linear ``(O, I)``). A layer type without a converter is an error.
"""
from __future__ import annotations

import numpy as np

from jaxconv import layers as L
from jaxconv.converters import Converters

_convert = Converters("torch_twin", "PyTorch")
# @converts(LayerType) registers convert(layer, in_shape) -> (torch module, [(jax path, torch key, to, back)])
converts = _convert.register


def _nn():
    import torch
    return torch, torch.nn


def _same(x):
    return x


def _conv_kernel_to_torch(w):  # [*K, I, O] -> (O, I, *K)
    n = w.ndim - 2
    return np.transpose(w, (n + 1, n, *range(n)))


def _conv_kernel_from_torch(w):  # (O, I, *K) -> [*K, I, O]
    n = w.ndim - 2
    return np.transpose(w, (*range(2, n + 2), 1, 0))


def _module(forward, **children):
    """An ``nn.Module`` holding ``children`` whose forward is ``forward(self, x)``."""
    torch, nn = _nn()

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            for name, child in children.items():
                setattr(self, name, child)

        def forward(self, x):
            return forward(self, x)
    return Twin()


def _padded(module, pads, value=0.0):
    """``module`` with explicit ``(lo, hi)`` padding of every spatial axis before it (PyTorch's own
    is symmetric): a forward pre-hook, so the module keeps its type and its state_dict keys."""
    torch, _ = _nn()
    if any(lo or hi for lo, hi in pads):
        flat = [v for lo, hi in reversed(pads) for v in (lo, hi)]  # F.pad lists the last axis first
        module.register_forward_pre_hook(lambda m, args: (torch.nn.functional.pad(args[0], flat, value=value),))
    return module


def _affine(layer):
    return [("scale", "weight", _same, _same), ("bias", "bias", _same, _same)]


@converts(L.Conv)
def _conv(layer, in_shape):
    torch, nn = _nn()
    n = len(layer.kernel_size)
    c_in, c_out = layer.kernel.shape[-2] * layer.groups, layer.kernel.shape[-1]
    module = getattr(nn, f"Conv{n}d")(c_in, c_out, layer.kernel_size, stride=layer.stride, padding=0,
                                      dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None)
    names = [("kernel", "weight", _conv_kernel_to_torch, _conv_kernel_from_torch)]
    names += [("bias", "bias", _same, _same)] if layer.bias is not None else []
    return _padded(module, layer._pads(in_shape)), names


@converts(L.ConvTranspose)
def _conv_transpose(layer, in_shape):
    torch, nn = _nn()
    n = len(layer.kernel_size)
    c_in, c_out = layer.kernel.shape[-2], layer.kernel.shape[-1] * layer.groups
    pads = layer.resolved_padding(in_shape)
    if any(lo != hi for lo, hi in pads):
        raise ValueError(f"torch_twin: PyTorch's ConvTranspose crops both sides alike; got padding {pads}")
    module = getattr(nn, f"ConvTranspose{n}d")(c_in, c_out, layer.kernel_size, stride=layer.stride,
                                               padding=tuple(lo for lo, _ in pads), output_padding=layer.output_padding,
                                               groups=layer.groups, bias=layer.bias is not None,
                                               dilation=layer.dilation)
    to = lambda w: np.moveaxis(w, (-2, -1), (0, 1))
    back = lambda w: np.moveaxis(w, (0, 1), (-2, -1))
    names = [("kernel", "weight", to, back)] + ([("bias", "bias", _same, _same)] if layer.bias is not None else [])
    return module, names


@converts(L.Dense)
def _dense(layer, in_shape):
    torch, nn = _nn()
    module = nn.Linear(*layer.kernel.shape, bias=layer.bias is not None)
    names = [("kernel", "weight", np.transpose, np.transpose)]
    return module, names + ([("bias", "bias", _same, _same)] if layer.bias is not None else [])


@converts(L.MaxPool)
def _max_pool(layer, in_shape):
    torch, nn = _nn()
    window, stride, pads = layer._resolved(in_shape)
    module = getattr(nn, f"MaxPool{len(window)}d")(window, stride)
    return _padded(module, pads, value=-float("inf")), []


@converts(L.AvgPool)
def _avg_pool(layer, in_shape):
    torch, nn = _nn()
    window, stride, pads = layer._resolved(in_shape)
    pool = getattr(nn, f"AvgPool{len(window)}d")
    if layer.count_include_pad:  # padding then pooling counts the padded zeros, as PyTorch does
        return _padded(pool(window, stride), pads), []
    if any(lo != hi or 2 * lo > k for (lo, hi), k in zip(pads, window)):
        raise ValueError(f"torch_twin: AvgPool(count_include_pad=False) needs symmetric padding <= window/2, got {pads}")
    return pool(window, stride, tuple(lo for lo, _ in pads), count_include_pad=False), []


@converts(L.GlobalAvgPool)
def _global_avg_pool(layer, in_shape):
    return _module(lambda self, x: x.mean(dim=tuple(range(2, x.ndim)))), []


@converts(L.Flatten)
def _flatten(layer, in_shape):
    # jaxconv flattens channels-last: move channels last first, so the next Dense sees the same order
    return _module(lambda self, x: x.permute(0, *range(2, x.ndim), 1).flatten(1)), []


@converts(L.ReLU)
def _relu(layer, in_shape):
    return _nn()[1].ReLU(), []


@converts(L.Identity)
def _identity(layer, in_shape):
    return _nn()[1].Identity(), []


@converts(L.Dropout)
def _dropout(layer, in_shape):
    return _nn()[1].Dropout(layer.drop_rate), []


@converts(L.Upsample)
def _upsample(layer, in_shape):
    scale = layer._scale(in_shape)
    mode = "nearest" if layer.method == "nearest" else {1: "linear", 2: "bilinear", 3: "trilinear"}[len(scale)]
    options = {} if mode == "nearest" else {"align_corners": False}
    return _nn()[1].Upsample(scale_factor=tuple(float(s) for s in scale), mode=mode, **options), []


@converts(L.BatchNorm)
def _batch_norm(layer, in_shape):
    torch, nn = _nn()
    n = max(len(in_shape) - 1, 1)
    module = getattr(nn, f"BatchNorm{n}d")(layer.scale.shape[0], eps=layer.epsilon, momentum=1 - layer.momentum)
    return module, _affine(layer) + [("mean", "running_mean", _same, _same), ("var", "running_var", _same, _same)]


@converts(L.GroupNorm)
def _group_norm(layer, in_shape):
    return _nn()[1].GroupNorm(layer.num_groups, layer.scale.shape[0], eps=layer.epsilon), _affine(layer)


@converts(L.LayerNorm)
def _layer_norm(layer, in_shape):
    norm = _nn()[1].LayerNorm(layer.scale.shape[0], eps=layer.epsilon)
    forward = lambda self, x: self.norm(x.movedim(1, -1)).movedim(-1, 1)  # over channels, as jaxconv's
    return _module(forward, norm=norm), [(j, "norm." + t, a, b) for j, t, a, b in _affine(layer)]


def _prefixed(jax_prefix, torch_prefix, names):
    return [((*jax_prefix, *(j if isinstance(j, tuple) else (j,))), f"{torch_prefix}.{t}", a, b)
            for j, t, a, b in names]


def _convert_list(layer, in_shape, attr: str):
    """The children of a composite held in the list ``attr``, converted: ``(nn.ModuleList, names)``."""
    torch, nn = _nn()
    mods, names = [], []
    for label, child, shape, _ in layer.children(in_shape):
        module, child_names = _convert(child, shape)
        mods.append(module)
        names += _prefixed((attr, int(label)), f"{attr}.{label}", child_names)
    return nn.ModuleList(mods), names


@converts(L.Sequential)
def _sequential(layer, in_shape):
    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return x
    layers, names = _convert_list(layer, in_shape, "layers")
    return _module(forward, layers=layers), names


@converts(L.Residual)
def _residual(layer, in_shape):
    body, body_names = _convert(layer.body, in_shape)
    short, short_names = _convert(layer.shortcut, in_shape)
    names = _prefixed(("body",), "body", body_names) + _prefixed(("shortcut",), "shortcut", short_names)
    return _module(lambda self, x: self.body(x) + self.shortcut(x), body=body, shortcut=short), names


@converts(L.Concat)
def _concat(layer, in_shape):
    torch, _ = _nn()
    branches, names = _convert_list(layer, in_shape, "branches")
    return _module(lambda self, x: torch.cat([b(x) for b in self.branches], dim=1), branches=branches), names


def _variable(model, path):
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _mapping(model, input_shape):
    shape = input_shape if input_shape is not None else model.input_shape
    return _convert(model, shape)


def torch_twin(model, input_shape=None):
    """A PyTorch ``nn.Module`` computing what ``model`` computes, on NCHW input, with its weights and
    batch statistics copied. Put both in eval mode (``model.eval()``, ``net.eval()``) to compare."""
    torch, _ = _nn()
    net, names = _mapping(model, input_shape)
    state = {key: torch.from_numpy(np.array(to(np.asarray(_variable(model, path)[...]))))
             for path, key, to, _ in names}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"torch_twin: state mismatch, missing {missing}, unexpected {unexpected}")
    return net


def load_torch_state_dict(model, state_dict, input_shape=None):
    """Copy a twin's PyTorch ``state_dict`` (weights and batch statistics) into ``model`` in place.

    Every array the model holds must be present with the matching shape; ``ValueError`` names the key.
    """
    _, names = _mapping(model, input_shape)
    for path, key, _, back in names:
        if key not in state_dict:
            raise ValueError(f"load_torch_state_dict: the state_dict has no {key!r} (for {'/'.join(map(str, path))})")
        variable = _variable(model, path)
        value = back(state_dict[key].detach().cpu().numpy())
        if value.shape != variable.shape:
            raise ValueError(f"load_torch_state_dict: {key!r} has shape {value.shape} in jaxconv's layout, the "
                             f"model's {'/'.join(map(str, path))} has {variable.shape}")
        variable[...] = np.asarray(value, variable.dtype)
    return model
