"""The input gradients of convs that waste XLA's transposed convolution (stride 2, a VALID conv on a small input)
and the weight gradients of 1x1 convs: XLA's convolution against what ``functional.conv`` runs on a CPU
(``functional.cpu_kernels``: the transpose of ``functional.patch_matmul``), per layer on the registered models'
shapes, then whole training steps of models with and without the choice, side by side in one run, alternating,
medians; last, the GFLOP/s of a stride-1 3x3 conv that no choice touches (CIFAR ResNet-18's 128 -> 128 at 16x16)
against XLA's float32 matmul, and PyTorch's of both when it is installed.

    python benchmarks/cpu_convs.py [--rounds 8] [--models mnist_cnn,mnist1d_deep,resnet20,cifar_resnet18,resnet50]
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxconv import bench, compiler, parallel
from jaxconv import functional as F
from jaxconv.models import create_model
from jaxconv.timing import medians, time_calls

# (what, batch, spatial size, kernel, C_in, C_out, stride, padding)
LAYERS = [
    ("mnist_cnn conv3", 128, (5, 5), (3, 3), 64, 128, 1, 0),
    ("mnist_cnn conv2 (1.44)", 128, (12, 12), (3, 3), 32, 64, 1, 0),
    ("mnist1d_deep conv3", 128, (40,), (3,), 32, 64, 2, 1),
    ("resnet20 3x3 s2", 128, (32, 32), (3, 3), 16, 32, 2, 1),
    ("cifar_resnet18 3x3 s2", 128, (32, 32), (3, 3), 64, 128, 2, 1),
    ("cifar_resnet18 1x1 s2", 128, (32, 32), (1, 1), 64, 128, 2, 0),
    ("resnet50 3x3 s2", 16, (56, 56), (3, 3), 128, 128, 2, 1),
    ("resnet50 1x1 64->256", 16, (56, 56), (1, 1), 64, 256, 1, 0),
    ("resnet50 1x1 256->64", 16, (56, 56), (1, 1), 256, 64, 1, 0),
    ("resnet50 1x1 1024->256", 16, (14, 14), (1, 1), 1024, 256, 1, 0),
]
BEFORE = {"SCATTER_MIN_RATIO": float("inf"), "DOT_WEIGHT_GRAD_MAX_TAPS": 0}  # few-channel choices only


def layer_arrays(batch, size, kernel, c_in, c_out, stride, pad):
    """A layer row's resolved options and random ``x``, ``w`` and output cotangent ``g``."""
    n = len(size)
    options = dict(stride=(stride,) * n, pads=((pad, pad),) * n, dilation=(1,) * n)
    x = jax.random.normal(jax.random.key(0), (batch, *size, c_in))
    w = jax.random.normal(jax.random.key(1), (*kernel, c_in, c_out)) * 0.1
    out = F.output_spatial(size, options["pads"], kernel, options["stride"])
    g = jax.random.normal(jax.random.key(2), (batch, *out, c_out))
    return options, x, w, g


def layer_runs(rounds):
    runs, rows = {}, []
    for what, batch, size, kernel, c_in, c_out, stride, pad in LAYERS:
        options, x, w, g = layer_arrays(batch, size, kernel, c_in, c_out, stride, pad)
        _, spread_x, dot_w = F.cpu_kernels(x.shape, w.shape, options["stride"], options["pads"], options["dilation"])

        def xla(x, w, o=options):
            return F._xla_conv(x, w, o["stride"], o["pads"], o["dilation"], 1, None)

        def product(x, w, o=options):
            return F.patch_matmul(x, w, **o)
        for part, chosen in (("dx", spread_x), ("dw", dot_w)):
            pair = {}
            for name, f in (("xla", xla), ("product", product)):
                if part == "dx":
                    fn = compiler.jit(lambda x, w, g, f=f: jax.vjp(lambda x: f(x, w), x)[1](g)[0])
                else:
                    fn = compiler.jit(lambda x, w, g, f=f: jax.vjp(lambda w: f(x, w), w)[1](g)[0])
                pair[name] = np.asarray(fn(x, w, g))
                runs[(what, part, name)] = lambda fn=fn, x=x, w=w, g=g: jax.block_until_ready(fn(x, w, g))
            diff = float(np.abs(pair["xla"] - pair["product"]).max() / np.abs(pair["xla"]).max())
            rows.append((what, part, chosen, diff))
    return medians(runs, steps=2 * rounds), rows


def model_runs(names, rounds):
    out = []
    for name in names:
        batch = 16 if name in ("resnet18", "resnet50") else 128
        runs = {}
        saved = {k: getattr(F, k) for k in BEFORE}
        try:
            for k, v in BEFORE.items():
                setattr(F, k, v)
            runs["before"], _ = bench.jax_step(create_model(name), batch, mode="train", dtype="float32",
                                               mesh=parallel.make_mesh(1))
        finally:
            for k, v in saved.items():
                setattr(F, k, v)
        runs["now"], _ = bench.jax_step(create_model(name), batch, mode="train", dtype="float32",
                                        mesh=parallel.make_mesh(1))
        t = time_calls(runs, steps=rounds)
        out.append((name, batch, t["before"]["median_s"], t["now"]["median_s"]))
    return out


def kernel_speeds(rounds):
    """GFLOP/s of a 2048^2 float32 matmul and of a 3x3 conv (batch 128, 16x16, 128 -> 128), XLA's and PyTorch's."""
    n, conv_flops = 2048, 2 * 128 * 16 * 16 * 9 * 128 * 128
    a = jnp.ones((n, n))
    x, w = jnp.ones((128, 16, 16, 128)), jnp.ones((3, 3, 128, 128))
    matmul, conv = compiler.jit(jnp.matmul), compiler.jit(lambda x, w: F.conv(x, w, padding=1))
    matmul(a, a), conv(x, w)
    runs = {"XLA matmul": lambda: jax.block_until_ready(matmul(a, a)),
            "XLA conv": lambda: jax.block_until_ready(conv(x, w))}
    try:
        import torch
        ta = torch.ones(n, n)
        tx = torch.ones(128, 128, 16, 16).contiguous(memory_format=torch.channels_last)
        tconv = torch.nn.Conv2d(128, 128, 3, padding=1, bias=False).to(memory_format=torch.channels_last)

        def torch_conv():
            with torch.no_grad():
                tconv(tx)
        runs.update({"torch matmul": lambda: torch.mm(ta, ta), "torch conv (channels_last)": torch_conv})
    except ImportError:
        pass
    med = medians(runs, steps=2 * rounds)
    return {name: (2 * n ** 3 if "matmul" in name else conv_flops) / t / 1e9 for name, t in med.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--models", default="mnist_cnn,mnist1d_deep,resnet20,cifar_resnet18,resnet50")
    args = parser.parse_args()
    med, rows = layer_runs(args.rounds)
    print(f"float32, {os.cpu_count()} cores, {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          f"SCATTER_MIN_RATIO = {F.SCATTER_MIN_RATIO}, DOT_WEIGHT_GRAD_MAX_TAPS = {F.DOT_WEIGHT_GRAD_MAX_TAPS}; "
          f"{args.rounds} rounds, medians")
    print(f"{'layer':24s} {'part':4s} {'conv runs':>9s} {'XLA conv ms':>12s} {'product ms':>11s} {'speed-up':>9s} "
          f"{'rel diff':>9s}")
    for what, part, chosen, diff in rows:
        t_xla, t_product = med[(what, part, "xla")], med[(what, part, "product")]
        print(f"{what:24s} {part:4s} {'product' if chosen else 'XLA':>9s} {t_xla * 1e3:12.2f} {t_product * 1e3:11.2f} "
              f"{t_xla / t_product:8.2f}x {diff:9.1e}")
    if args.models:
        print("\ntraining step, float32: before (few-channel choices only) and now")
        for name, batch, before, now in model_runs(args.models.split(","), args.rounds):
            print(f"{name:16s} batch {batch:4d}  {before * 1e3:10.2f} -> {now * 1e3:10.2f} ms  ({before / now:.3f}x)")
    print("\nGFLOP/s: 2048x2048 float32 matmul; 3x3 conv, batch 128, 16x16, 128 -> 128 channels")
    for name, rate in kernel_speeds(args.rounds).items():
        print(f"{name:28s} {rate:7.0f}")


if __name__ == "__main__":
    main()
