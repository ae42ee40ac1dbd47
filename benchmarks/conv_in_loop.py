"""Why `--steps-per-dispatch N > 1` is slow on XLA:CPU: a convolution alone vs inside a loop body, side by side.

    python benchmarks/conv_in_loop.py [--batch 16] [--jit jaxconv|plain]

Times 8 separate calls of a jitted 3x3 convolution (28x28, 32 -> 64 channels, NHWC) and of its weight gradient
against one jitted ``fori_loop`` of 8 iterations of the same. On the 2-core CPU (batch 16) the forward
convolution ran 0.70-0.81x the time of separate calls in the loop, while its weight gradient ran 67x (``jax.jit``)
and 163x (jaxconv's options) slower there. Why is not profiled here; jax-ml/jax#12868 reports XLA:CPU
convolutions much slower inside a loop body for some layouts. A training step's backward pass is made of such
weight gradients, so ``--steps-per-dispatch`` stays 1 on CPU.
"""
import argparse
import time

import jax
import jax.numpy as jnp

from jaxconv import compiler

DIMS = ("NHWC", "HWIO", "NHWC")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--jit", choices=["jaxconv", "plain"], default="jaxconv")
    args = parser.parse_args()
    jit = compiler.jit if args.jit == "jaxconv" else jax.jit
    x, w = jnp.ones((args.batch, 28, 28, 32)), jnp.full((3, 3, 32, 64), 0.01)
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DIMS)
    ops = {"forward": lambda x: conv(x, w),
           "weight gradient": lambda x: jax.grad(lambda v: jnp.sum(conv(x, v)))(w)}
    print(f"batch {args.batch}, {args.jit} jit, {jax.devices()[0].device_kind}, jax {jax.__version__}")
    for name, op in ops.items():
        alone = jit(op)
        looped = jit(lambda x: jax.lax.fori_loop(0, 8, lambda i, acc: acc + op(x + i).sum(), 0.0))
        jax.block_until_ready((alone(x), looped(x)))
        start = time.perf_counter()
        for _ in range(8):
            jax.block_until_ready(alone(x))
        separate = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(looped(x))
        in_loop = time.perf_counter() - start
        print(f"{name:16s} 8 calls {separate * 1e3:9.1f} ms   a loop of 8 {in_loop * 1e3:9.1f} ms   "
              f"({in_loop / separate:.2f}x)")


if __name__ == "__main__":
    main()
