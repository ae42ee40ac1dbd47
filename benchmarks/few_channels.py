"""Convolutions with few input channels: XLA's convolution against what ``functional.conv`` runs on a CPU
instead, side by side in one run, alternating, medians. Forward: the sum of taps (``functional.tap_sum``, at most
``TAP_SUM_MAX`` multiply-adds per output), on the registered models' first layers and two past the threshold.
Input gradient: the product spread back over the input (reverse mode's transpose of ``functional.patch_matmul``,
at most ``SCATTER_MAX_CHANNELS`` input channels), on LeNet-5's second conv, a first layer's (a saliency map) and
two past.

    python benchmarks/few_channels.py [--batch 128] [--rounds 15]
"""
import argparse
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxconv import compiler
from jaxconv import functional as F
from jaxconv.timing import medians

# (what, spatial size, kernel, C_in, C_out, padding)
SHAPES = [
    ("lenet5 conv1", (28, 28), (5, 5), 1, 6, 2),
    ("seed_cnn conv1", (28, 28), (3, 3), 1, 32, 1),
    ("mnist_cnn conv1", (28, 28), (5, 5), 1, 32, 0),
    ("unet_small conv1", (28, 28), (3, 3), 1, 16, 1),
    ("resnet20 conv1", (32, 32), (3, 3), 3, 16, 1),
    ("cifar_vgg conv1", (32, 32), (3, 3), 3, 32, 1),
    ("cifar_resnet18 conv1", (32, 32), (3, 3), 3, 64, 1),
    ("mnist1d_deep conv1", (40,), (5,), 1, 32, 2),
    ("convnetjs conv1 (75)", (32, 32), (5, 5), 3, 16, 2),
    ("lenet5 conv2 (150)", (14, 14), (5, 5), 6, 16, 0),
]
# (what, spatial size, kernel, C_in, C_out, padding): the input gradient
GRAD_SHAPES = [
    ("lenet5 conv2", (14, 14), (5, 5), 6, 16, 0),
    ("lenet5 conv1", (28, 28), (5, 5), 1, 6, 2),
    ("mnist_cnn conv2 (32)", (12, 12), (3, 3), 32, 64, 0),
    ("convnetjs conv2 (16)", (16, 16), (5, 5), 16, 20, 2),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    runs, rows = {}, []
    for what, size, kernel, c_in, c_out, pad in SHAPES:
        n = len(size)
        x = jax.random.normal(jax.random.key(0), (args.batch, *size, c_in))
        w = jax.random.normal(jax.random.key(1), (*kernel, c_in, c_out))
        options = dict(stride=(1,) * n, pads=((pad, pad),) * n, dilation=(1,) * n)
        xla = compiler.jit(lambda x, w, o=options: F._xla_conv(x, w, o["stride"], o["pads"], o["dilation"], 1, None))
        taps = compiler.jit(lambda x, w, o=options: F.tap_sum(x, w, **o))
        a, b = np.asarray(xla(x, w)), np.asarray(taps(x, w))
        rows.append((what, math.prod(kernel) * c_in, float(np.abs(a - b).max() / np.abs(a).max())))
        runs[(what, "xla")] = lambda f=xla, x=x, w=w: jax.block_until_ready(f(x, w))
        runs[(what, "taps")] = lambda f=taps, x=x, w=w: jax.block_until_ready(f(x, w))
    grad_rows = []
    for what, size, kernel, c_in, c_out, pad in GRAD_SHAPES:
        n = len(size)
        w = jax.random.normal(jax.random.key(1), (*kernel, c_in, c_out))
        options = dict(stride=(1,) * n, pads=((pad, pad),) * n, dilation=(1,) * n)
        out = F.output_spatial(size, options["pads"], kernel, options["stride"])
        g = jax.random.normal(jax.random.key(2), (args.batch, *out, c_out))
        xla = compiler.jit(lambda g, w, o=options, s=size: F.conv_input_grad(g, w, s, groups=1, **o))
        x = jnp.zeros((args.batch, *size, c_in))
        scatter = compiler.jit(lambda g, w, o=options, x=x: jax.vjp(lambda x: F.patch_matmul(x, w, **o), x)[1](g)[0])
        a, b = np.asarray(xla(g, w)), np.asarray(scatter(g, w))
        grad_rows.append((what, c_in, float(np.abs(a - b).max() / np.abs(a).max())))
        runs[(what, "dx xla")] = lambda f=xla, g=g, w=w: jax.block_until_ready(f(g, w))
        runs[(what, "dx scatter")] = lambda f=scatter, g=g, w=w: jax.block_until_ready(f(g, w))
    med = medians(runs, steps=2 * args.rounds)
    print(f"forward, batch {args.batch}, float32, {os.cpu_count()} cores, {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}; TAP_SUM_MAX = {F.TAP_SUM_MAX}; {args.rounds} rounds, medians")
    print(f"{'layer':22s} {'taps x C_in':>11s} {'XLA conv ms':>12s} {'tap sum ms':>11s} {'speed-up':>9s} {'rel diff':>9s}")
    for what, work, diff in rows:
        t_xla, t_taps = med[(what, "xla")], med[(what, "taps")]
        print(f"{what:22s} {work:11d} {t_xla * 1e3:12.3f} {t_taps * 1e3:11.3f} {t_xla / t_taps:8.2f}x {diff:9.1e}")
    print(f"\ninput gradient; SCATTER_MAX_CHANNELS = {F.SCATTER_MAX_CHANNELS}")
    print(f"{'layer':22s} {'C_in':>11s} {'XLA conv ms':>12s} {'scatter ms':>11s} {'speed-up':>9s} {'rel diff':>9s}")
    for what, c_in, diff in grad_rows:
        t_xla, t_scatter = med[(what, "dx xla")], med[(what, "dx scatter")]
        print(f"{what:22s} {c_in:11d} {t_xla * 1e3:12.3f} {t_scatter * 1e3:11.3f} {t_xla / t_scatter:8.2f}x {diff:9.1e}")


if __name__ == "__main__":
    main()
