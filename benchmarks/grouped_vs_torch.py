"""Grouped convolutions (ResNeXt-style: 3x3, 128 channels in G groups) on this CPU: jaxconv's ``functional.conv``
(by taps up to ``grouped.MAX_GROUP_CHANNELS`` channels per group, :mod:`jaxconv.grouped`; one dense conv per group
beyond), XLA's grouped convolution
and PyTorch's ``conv2d(groups=G)`` in channels_last, forward and forward+backward, side by side in one run.

    python benchmarks/grouped_vs_torch.py [--groups 32,16,8,4,2] [--rounds 3]

XLA's grouped forward and backward takes seconds per call at few channels per group; rounds alternate between
contenders (``jaxconv.timing.time_calls``); read ratios within one run.
"""
import argparse

import jax
import numpy as np

from jaxconv import compiler
from jaxconv import functional as F
from jaxconv import grouped
from jaxconv.timing import time_calls

from depthwise_vs_torch import torch_pieces  # this folder is on the path when run as a script

BATCH, SIZE, CHANNELS = 8, 56, 128


def forward_and_backward(f):
    return compiler.jit(lambda x, w, g: (lambda y, back: (y, back(g)))(*jax.vjp(f, x, w)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="32,16,8,4,2")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"float32, batch {BATCH}, {SIZE}x{SIZE}, {CHANNELS} channels, 3x3, padding 1; medians of {args.rounds} "
          f"alternating rounds, ms; jaxconv by taps up to {grouped.MAX_GROUP_CHANNELS} channels per group, "
          f"one dense conv per group beyond")
    for groups in (int(v) for v in args.groups.split(",")):
        kx, kw, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (BATCH, SIZE, SIZE, CHANNELS))
        w = jax.random.normal(kw, (3, 3, CHANNELS // groups, CHANNELS)) * 0.1
        g = jax.random.normal(kg, (BATCH, SIZE, SIZE, CHANNELS))
        mine = lambda x, w: F.conv(x, w, padding=1, groups=groups)
        xla = lambda x, w: F._xla_conv(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1), groups, None)
        programs = {"jaxconv forward": (compiler.jit(mine), (x, w)), "XLA forward": (compiler.jit(xla), (x, w)),
                    "jaxconv fwd+bwd": (forward_and_backward(mine), (x, w, g)),
                    "XLA fwd+bwd": (forward_and_backward(xla), (x, w, g))}
        runs = {name: (lambda f=f, a=a: jax.block_until_ready(f(*a))) for name, (f, a) in programs.items()}
        (y, grads), (y_ref, grads_ref) = (programs[k][0](x, w, g) for k in ("jaxconv fwd+bwd", "XLA fwd+bwd"))
        error = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in zip((y, *grads), (y_ref, *grads_ref)))
        runs.update(torch_pieces(x, w, g, 1, channels_last=True))
        med = {k: v["median_s"] * 1e3 for k, v in time_calls(runs, steps=args.rounds, warmup=0, block=1).items()}
        print(f"\ngroups {groups} ({CHANNELS // groups} channels per group); jaxconv vs XLA, relative: {error:.1e}")
        for key, v in med.items():
            print(f"  {key:30s} {v:10.2f}")
        print(f"  jaxconv fwd+bwd: {med['XLA fwd+bwd'] / med['jaxconv fwd+bwd']:.1f}x XLA's, "
              f"{med['torch channels_last fwd+bwd'] / med['jaxconv fwd+bwd']:.2f}x PyTorch's", flush=True)


if __name__ == "__main__":
    main()
