"""Independent references: direct NumPy loops over output positions (no JAX, no im2col)."""
import itertools

import numpy as np


def pad_pairs(x, pads, value=0.0):
    return np.pad(x, [(0, 0), *pads, (0, 0)], constant_values=value)


def out_size(w, lo, hi, k, s, d=1):
    return (w + lo + hi - (k + (k - 1) * (d - 1))) // s + 1


def conv(x, w, b, stride, pads, dilation, groups):
    """x [N, *S, C_in], w [*K, C_in/g, C_out], per-axis tuples; loops over every output position."""
    n_sp = x.ndim - 2
    xp = pad_pairs(x, pads)
    kernel = w.shape[:n_sp]
    outs = [out_size(x.shape[1 + i], *pads[i], kernel[i], stride[i], dilation[i]) for i in range(n_sp)]
    c_in_g, c_out = w.shape[-2], w.shape[-1]
    c_out_g = c_out // groups
    y = np.zeros((x.shape[0], *outs, c_out))
    for o in itertools.product(*[range(v) for v in outs]):
        for k in itertools.product(*[range(v) for v in kernel]):
            pos = tuple(o[i] * stride[i] + k[i] * dilation[i] for i in range(n_sp))
            patch = xp[(slice(None), *pos)]  # [N, C_in]
            for g in range(groups):
                xin = patch[:, g * c_in_g:(g + 1) * c_in_g]
                y[(slice(None), *o, slice(g * c_out_g, (g + 1) * c_out_g))] += \
                    xin @ w[(*k, slice(None), slice(g * c_out_g, (g + 1) * c_out_g))]
    if b is not None:
        y += b
    return y


def pool(x, window, stride, pads, kind, count_include_pad=True):
    n_sp = x.ndim - 2
    fill = -np.inf if kind == "max" else 0.0
    xp = pad_pairs(x, pads, fill)
    real = pad_pairs(np.ones_like(x), pads, 0.0)
    outs = [out_size(x.shape[1 + i], *pads[i], window[i], stride[i]) for i in range(n_sp)]
    y = np.zeros((x.shape[0], *outs, x.shape[-1]))
    for o in itertools.product(*[range(v) for v in outs]):
        idx = (slice(None), *[slice(o[i] * stride[i], o[i] * stride[i] + window[i]) for i in range(n_sp)])
        patch = xp[idx].reshape(x.shape[0], -1, x.shape[-1])
        if kind == "max":
            y[(slice(None), *o)] = patch.max(axis=1)
        else:
            count = np.prod(window) if count_include_pad else real[idx].reshape(x.shape[0], -1, x.shape[-1]).sum(1)
            y[(slice(None), *o)] = patch.sum(axis=1) / count
    return y


def cross_entropy(logits, labels, eps=0.0):
    total = 0.0
    for z, y in zip(logits.astype(np.float64), labels):
        m = z.max()
        logp = z - m - np.log(np.exp(z - m).sum())
        q = np.full(z.shape, eps / z.size)
        q[y] += 1 - eps
        total += -(q * logp).sum()
    return total / len(labels)
