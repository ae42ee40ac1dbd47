"""jaxconv's FLOP count of every registered model's training and inference step beside XLA's cost analysis of
the same step as traced (multiply-add = 2 in both; training = 3x the forward pass less the data's gradient in
jaxconv's count, ``jaxconv.shapes.training_flops``; the whole step, loss and optimizer included, in XLA's). Lowering only, no compilation: runs in seconds on any device.

    python benchmarks/flops_agreement.py [--batch 128] [--dtype float32]
"""
import argparse

import jax

from jaxconv.bench import traced_flops
from jaxconv.models import MODELS


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    print(f"batch {args.batch}, {args.dtype}, {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{'model':16s} {'mode':9s} {'GFLOP jaxconv':>14s} {'GFLOP XLA':>12s} {'XLA / jaxconv':>14s}")
    for name in MODELS:
        for mode in ("train", "inference"):
            r = traced_flops(name, args.batch, mode, args.dtype)
            print(f"{name:16s} {mode:9s} {r['flops_model'] / 1e9:14.3f} {r['flops_xla'] / 1e9:12.3f} "
                  f"{r['flops_ratio']:14.3f}", flush=True)


if __name__ == "__main__":
    main()
