"""oneDNN's convolution kernels (jaxconv.onednn_conv) against XLA:CPU's, per layer: forward, input gradient and
weight gradient, on the registered models' shapes; with --models, whole steps of those models with and without.

    python benchmarks/onednn_vs_xla.py [--rounds 8] [--models resnet20,cifar_resnet18,lenet5]

Layers: each part is its own jitted function, calls alternate (`jaxconv.timing.time_calls`), medians, float32. The
XLA side is `lax.conv_general_dilated` and its autodiff compiled with jaxconv's XLA options
(`jaxconv.compiler.jit`). Whole steps: `jaxconv.bench.jax_step`, built once inside
`jaxconv.onednn_conv.xla_convolutions()` (XLA's convolutions and jaxconv's other CPU choices, as before oneDNN) and
once without, alternating in one process.
"""
import argparse

import jax

from jaxconv import bench, compiler, onednn, onednn_conv, parallel
from jaxconv import functional as F
from jaxconv.models import create_model
from jaxconv.timing import time_calls

from cpu_convs import layer_arrays  # this folder is on the path when run as a script

# (what, batch, spatial size, kernel, C_in, C_out, stride, padding)
LAYERS = [
    ("resnet20 3x3 16 -> 16", 128, (32, 32), (3, 3), 16, 16, 1, 1),
    ("cifar_resnet18 3x3 64 -> 64", 128, (32, 32), (3, 3), 64, 64, 1, 1),
    ("cifar_resnet18 3x3 128 -> 128", 128, (16, 16), (3, 3), 128, 128, 1, 1),
    ("cifar_resnet18 3x3 64 -> 128, stride 2", 128, (32, 32), (3, 3), 64, 128, 2, 1),
    ("resnet18 3x3 64 -> 64 at 56x56", 16, (56, 56), (3, 3), 64, 64, 1, 1),
    ("resnet50 1x1 256 -> 64 at 56x56", 16, (56, 56), (1, 1), 256, 64, 1, 0),
    ("seed_cnn conv2 (14x14, 32 -> 64)", 128, (14, 14), (3, 3), 32, 64, 1, 1),
    ("lenet5 conv1 (5x5, 1 -> 6)", 128, (28, 28), (5, 5), 1, 6, 1, 2),
    ("mnist1d_deep conv2 (1-D, 5, 32 -> 32)", 128, (40,), (5,), 32, 32, 1, 2),
]


def layer_rows(rounds):
    for what, batch, size, kernel, c_in, c_out, stride, pad in LAYERS:
        geometry, x, w, g = layer_arrays(batch, size, kernel, c_in, c_out, stride, pad)
        xla = lambda x, w: F._xla_conv(x, w, geometry["stride"], geometry["pads"], geometry["dilation"], 1, None)
        parts = {
            "forward": (compiler.jit(xla), jax.jit(lambda x, w: onednn_conv.conv(x, w, **geometry)), (x, w)),
            "input grad": (compiler.jit(lambda w, g: jax.vjp(lambda x: xla(x, w), x)[1](g)[0]),
                           jax.jit(lambda w, g: onednn_conv.input_grad(g, w, size, **geometry)), (w, g)),
            "weight grad": (compiler.jit(lambda x, g: jax.vjp(lambda w: xla(x, w), w)[1](g)[0]),
                            jax.jit(lambda x, g: onednn_conv.weight_grad(x, g, kernel, **geometry)), (x, g)),
        }
        for part, (ours, theirs, args) in parts.items():
            runs = {"xla": lambda f=ours, a=args: jax.block_until_ready(f(*a)),
                    "onednn": lambda f=theirs, a=args: jax.block_until_ready(f(*a))}
            timed = time_calls(runs, steps=rounds)
            a, b = timed["xla"]["median_s"] * 1e3, timed["onednn"]["median_s"] * 1e3
            print(f"| {what} ({batch}) | {part} | {a:.2f} | {b:.2f} | {a / b:.2f}x |", flush=True)


def model_rows(models, rounds):
    mesh = parallel.make_mesh(1)
    for name in models:
        batch = 16 if name in ("resnet18", "resnet50") else 128
        for mode in ("train", "inference"):
            with onednn_conv.xla_convolutions():
                before, _ = bench.jax_step(create_model(name), batch, mode=mode, dtype="float32", mesh=mesh)
            after, _ = bench.jax_step(create_model(name), batch, mode=mode, dtype="float32", mesh=mesh)
            timed = time_calls({"xla": before, "onednn": after}, steps=rounds)
            a, b = timed["xla"]["median_s"] * 1e3, timed["onednn"]["median_s"] * 1e3
            print(f"| {name} ({batch}) | {mode} | {a:.2f} | {b:.2f} | {a / b:.2f}x |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--models", default="", help="also whole steps of these models (comma-separated)")
    parser.add_argument("--no-layers", action="store_true")
    args = parser.parse_args()
    ok, where = onednn.status()
    if not ok:
        raise SystemExit(f"onednn_vs_xla.py: oneDNN is not available: {where}")
    print(f"oneDNN: {where}; jax {jax.__version__}, {jax.devices()[0].device_kind}")
    if not args.no_layers:
        print("| layer (batch) | part | XLA ms | oneDNN ms | speed-up |\n|---|---|---:|---:|---:|")
        layer_rows(args.rounds)
    if args.models:
        print("| model (batch) | step | XLA's convs ms | oneDNN ms | speed-up |\n|---|---|---:|---:|---:|")
        model_rows(args.models.split(","), args.rounds)


if __name__ == "__main__":
    main()
