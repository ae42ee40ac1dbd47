"""Depthwise convolutions (``groups = C_in``) on this CPU: XLA's grouped convolution, jaxconv's ``functional.conv``
(:mod:`jaxconv.grouped`: sums of taps) and PyTorch's ``conv2d(groups=C)``, forward, input gradient, weight
gradient and forward+backward, side by side in one run; with agreement checks.

    python benchmarks/depthwise_vs_torch.py [--rounds 8] [--layers mbv2,convnext]

The layers are MobileNetV2's 3x3 depthwise convs (batch 16) and a ConvNeXt 7x7 one; jaxconv by autodiff and by
the hand-written backward (``grads.conv_vjp``). Rounds alternate between contenders (``jaxconv.timing.medians``);
read ratios within one run.
"""
import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxconv import compiler
from jaxconv import functional as F
from jaxconv import grads as G
from jaxconv.timing import medians

LAYERS = [  # name, batch, size, channels, kernel, stride
    ("mbv2 3x3 32 @ 112", 16, 112, 32, 3, 1), ("mbv2 3x3 144 @ 56", 16, 56, 144, 3, 1),
    ("mbv2 3x3 144 @ 56 stride 2", 16, 56, 144, 3, 2), ("mbv2 3x3 192 @ 28", 16, 28, 192, 3, 1),
    ("mbv2 3x3 576 @ 14", 16, 14, 576, 3, 1), ("mbv2 3x3 960 @ 7", 16, 7, 960, 3, 1),
    ("convnext 7x7 96 @ 56", 16, 56, 96, 7, 1)]


def jax_pieces(x, w, g, stride):
    c = x.shape[-1]
    opts = dict(stride=stride, padding=w.shape[0] // 2, groups=c)  # PyTorch's symmetric padding
    stride_, pads, dilation = F.conv_geometry(x, w, fn="bench", dilation=1, **opts)
    xla = lambda x, w: F._xla_conv(x, w, stride_, pads, dilation, c, None)
    mine = lambda x, w: F.conv(x, w, **opts)

    def grads(f):
        return (compiler.jit(lambda x, w, g: jax.vjp(lambda x: f(x, w), x)[1](g)[0]),
                compiler.jit(lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g)[0]),
                compiler.jit(lambda x, w, g: (lambda y, back: (y, back(g)))(*jax.vjp(f, x, w))))
    xla_dx, xla_dw, xla_both = grads(xla)
    dx, dw, both = grads(mine)
    hand = compiler.jit(lambda x, w, g: G.conv_vjp(g, x, w, **opts)[:2])
    hand_both = compiler.jit(lambda x, w, g: (mine(x, w), G.conv_vjp(g, x, w, **opts)[:2]))
    programs = {"XLA forward": (compiler.jit(xla), (x, w)), "XLA input grad": (xla_dx, (x, w, g)),
                "XLA weight grad": (xla_dw, (x, w, g)), "XLA fwd+bwd": (xla_both, (x, w, g)),
                "jaxconv forward": (compiler.jit(mine), (x, w)), "jaxconv input grad": (dx, (x, w, g)),
                "jaxconv weight grad": (dw, (x, w, g)),
                "jaxconv fwd+bwd": (both, (x, w, g)),
                "jaxconv hand-written backward": (hand, (x, w, g)),
                "jaxconv hand-written fwd+bwd": (hand_both, (x, w, g))}
    return {name: functools.partial(lambda f, a: jax.block_until_ready(f(*a)), f, a)
            for name, (f, a) in programs.items()}, (xla_both, both)


def torch_pieces(x, w, g, stride, channels_last):
    """PyTorch's ``conv2d`` of the same arrays (its groups from the kernel's shape, symmetric padding K // 2):
    forward and forward+backward runs, named by layout."""
    import torch
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    groups, k = x.shape[-1] // w.shape[-2], w.shape[0]
    xt = torch.tensor(np.moveaxis(np.asarray(x), -1, 1)).contiguous(memory_format=fmt).requires_grad_(True)
    wt = torch.tensor(np.asarray(w).transpose(3, 2, 0, 1).copy()).contiguous(memory_format=fmt).requires_grad_(True)
    gt = torch.tensor(np.moveaxis(np.asarray(g), -1, 1)).contiguous(memory_format=fmt)
    conv = lambda: torch.nn.functional.conv2d(xt, wt, stride=stride, padding=k // 2, groups=groups)
    tag = "channels_last" if channels_last else "NCHW"

    def forward():
        with torch.no_grad():
            conv()

    def both():
        xt.grad = wt.grad = None
        conv().backward(gt)
    return {f"torch {tag} forward": forward, f"torch {tag} fwd+bwd": both}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--layers", default="", help="comma-separated substrings of the layer names (default: all)")
    args = parser.parse_args()
    import torch
    print(f"float32, {jax.devices()[0].device_kind}, {os.cpu_count()} cores, jax {jax.__version__}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); medians of {args.rounds} alternating rounds, ms")
    wanted = [s for s in args.layers.split(",") if s]
    for name, batch, size, c, k, stride in LAYERS:
        if wanted and not any(s in name for s in wanted):
            continue
        kx, kw, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (batch, size, size, c), jnp.float32)
        w = jax.random.normal(kw, (k, k, 1, c), jnp.float32) / k
        out = (size + 2 * (k // 2) - k) // stride + 1
        y_shape = (batch, out, out, c)
        g = jax.random.normal(kg, y_shape, jnp.float32)
        runs, (xla_both, both) = jax_pieces(x, w, g, stride)
        (y_ref, grads_ref), (y, grads) = xla_both(x, w, g), both(x, w, g)
        errors = [rel(y, y_ref), *(rel(a, b) for a, b in zip(grads, grads_ref))]
        runs.update({**torch_pieces(x, w, g, stride, False), **torch_pieces(x, w, g, stride, True)})
        for run in runs.values():
            run()
        med = {key: t * 1e3 for key, t in medians(runs, steps=args.rounds, block=2).items()}
        torch_best = min((v for key, v in med.items() if key.startswith("torch") and "fwd+bwd" in key), default=None)
        print(f"\n{name} (batch {batch}); jaxconv vs XLA, relative: y {errors[0]:.1e}, dx {errors[1]:.1e}, "
              f"dw {errors[2]:.1e}")
        for key, v in med.items():
            print(f"  {key:30s} {v:9.2f}")
        for way in ("fwd+bwd", "hand-written fwd+bwd"):
            ours = med[f"jaxconv {way}"]
            line = f"  jaxconv {way}: {med['XLA fwd+bwd'] / ours:.1f}x XLA's"
            if torch_best:
                line += f", {torch_best / ours:.2f}x PyTorch's best"
            print(line, flush=True)


if __name__ == "__main__":
    main()
