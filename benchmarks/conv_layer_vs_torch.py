"""One conv layer's forward, input gradient and weight gradient: XLA (jaxconv's options and XLA's
defaults) against PyTorch CPU, side by side in one run. Where a train step's time goes.

    python benchmarks/conv_layer_vs_torch.py [--batch 128] [--size 14] [--cin 32] [--cout 64] [--kernel 3]

The default shape is seed_cnn's second conv (SAME padding, stride 1). Each JAX piece is its own
jitted function (``jax.vjp`` of ``functional.conv``); PyTorch runs ``Conv2d`` forward, and forward +
backward, in NCHW and channels_last. Rounds alternate between contenders; medians are reported.
"""
import argparse
import os

import jax

from jaxconv import compiler
from jaxconv import functional as F
from jaxconv.timing import medians


def jax_pieces(x, w, jit):
    def conv(x, w):
        return F.conv(x, w, padding="SAME")

    def fwd_bwd(x, w, g):  # one forward and its backward, like torch's conv(x).backward(g)
        y, vjp = jax.vjp(conv, x, w)
        return y, vjp(g)

    g = jax.random.normal(jax.random.key(2), conv(x, w).shape)
    fwd, both = jit(conv), jit(fwd_bwd)
    dx = jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return {"forward": lambda: fwd(x, w), "input grad": lambda: dx(x, w, g), "weight grad": lambda: dw(x, w, g),
            "fwd+bwd": lambda: both(x, w, g)}


def torch_pieces(args, channels_last):
    import torch
    conv = torch.nn.Conv2d(args.cin, args.cout, args.kernel, padding="same")
    x = torch.randn(args.batch, args.cin, args.size, args.size, requires_grad=True)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn_like(conv(x))

    def forward():
        with torch.no_grad():
            conv(x)

    def fwd_bwd():
        conv(x).backward(g)
    return {"forward": forward, "fwd+bwd": fwd_bwd}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=14)
    parser.add_argument("--cin", type=int, default=32)
    parser.add_argument("--cout", type=int, default=64)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    import torch
    x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, args.cin))
    w = jax.random.normal(jax.random.key(1), (args.kernel, args.kernel, args.cin, args.cout)) * 0.1
    contenders = {
        "jaxconv options": jax_pieces(x, w, compiler.jit),
        "XLA defaults": jax_pieces(x, w, jax.jit),
        "torch NCHW": torch_pieces(args, False),
        "torch channels_last": torch_pieces(args, True),
    }
    runs = {(c, p): fn for c, pieces in contenders.items() for p, fn in pieces.items()}
    runs = {k: (lambda fn=fn: jax.block_until_ready(fn())) for k, fn in runs.items()}
    for fn in runs.values():
        fn()
    med = medians(runs, steps=2 * args.rounds)
    flops = 2 * args.batch * args.size ** 2 * args.kernel ** 2 * args.cin * args.cout
    print(f"conv {args.kernel}x{args.kernel} SAME, batch {args.batch}, {args.size}x{args.size}, {args.cin}->{args.cout}, "
          f"float32, {os.cpu_count()} cores, jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {args.rounds} rounds of 3 calls (first untimed), medians; "
          f"forward = {flops / 1e6:.0f} MFLOP")
    pieces = ["forward", "input grad", "weight grad", "fwd+bwd"]
    print(f"{'contender':22s}" + "".join(f"{p:>14s}" for p in pieces) + "   (ms)")
    for c, have in contenders.items():
        cells = [f"{med[c, p] * 1e3:14.2f}" if p in have else f"{'':14s}" for p in pieces]
        print(f"{c:22s}" + "".join(cells))


if __name__ == "__main__":
    main()
