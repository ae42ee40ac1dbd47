"""``conv_transpose``: agreement with PyTorch on random configurations, then one layer's forward and
forward+backward time against ``torch.nn.functional.conv_transpose2d``, side by side in one run.

    python benchmarks/conv_transpose_vs_torch.py [--cases 200] [--batch 32] [--size 14] [--cin 64]
                                                 [--cout 32] [--kernel 2] [--stride 2] [--rounds 20]

The default layer is a U-Net decoder step (14x14x64 -> 28x28x32, 2x2 kernel, stride 2). JAX runs
jaxconv's ``conv_transpose`` (the zero-spread ``lhs_dilation`` form), its hand-written backward
(``grads.conv_transpose_vjp``, one conv and one weight-gradient conv), ``jax.vjp`` of it (which
runs the same programs: its ``custom_jvp`` transposes into them), and the weight gradient that autodiff would take without
that rule; PyTorch runs NCHW and channels_last. Rounds alternate between contenders (``jaxconv.timing.medians``).
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxconv import compiler
from jaxconv import functional as F
from jaxconv import grads as G
from jaxconv.gradcheck import rel_error, torch_conv_transpose_case
from jaxconv.timing import medians


def agreement(cases: int, seed: int = 0):
    """Worst relative error of forward and of (dx, dw, db) against torch, float64, 1-D/2-D alternating."""
    import torch
    rng = np.random.default_rng(seed)
    worst_fwd = worst_bwd = 0.0
    for trial in range(cases):
        n = 1 + trial % 2
        x, w, b, opts = torch_conv_transpose_case(rng, n, max_size=7)
        s, pad, op, d, groups = (opts[k] for k in ("stride", "padding", "output_padding", "dilation", "groups"))
        y = F.conv_transpose(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), **opts)
        xt = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
        wt = torch.tensor(np.ascontiguousarray(np.moveaxis(w, (-2, -1), (0, 1))), requires_grad=True)
        bt = torch.tensor(b, requires_grad=True)
        fn = torch.nn.functional.conv_transpose1d if n == 1 else torch.nn.functional.conv_transpose2d
        yt = fn(xt, wt, bt, stride=s, padding=pad, output_padding=op, groups=groups, dilation=d)
        worst_fwd = max(worst_fwd, rel_error(y, np.moveaxis(yt.detach().numpy(), 1, -1)))
        g = rng.normal(size=y.shape)
        yt.backward(torch.tensor(np.moveaxis(g, -1, 1)))
        dx, dw, db = G.conv_transpose_vjp(jnp.asarray(g), jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), **opts)
        worst_bwd = max(worst_bwd, rel_error(dx, np.moveaxis(xt.grad.numpy(), 1, -1)),
                        rel_error(dw, np.moveaxis(wt.grad.numpy(), (0, 1), (-2, -1))), rel_error(db, bt.grad.numpy()))
    return worst_fwd, worst_bwd


def jax_pieces(args):
    key = jax.random.key(0)
    x = jax.random.normal(key, (args.batch, args.size, args.size, args.cin), jnp.float32)
    w = jax.random.normal(key, (args.kernel, args.kernel, args.cin, args.cout), jnp.float32) * 0.1
    opts = dict(stride=args.stride, padding=args.padding, output_padding=args.output_padding)
    fwd = compiler.jit(lambda x, w: F.conv_transpose(x, w, **opts))
    g = jax.random.normal(key, fwd(x, w).shape, jnp.float32)

    @compiler.jit
    def manual(x, w, g):
        return F.conv_transpose(x, w, **opts), G.conv_transpose_vjp(g, x, w, **opts)[:2]

    @compiler.jit
    def auto(x, w, g):
        y, vjp = jax.vjp(lambda x, w: F.conv_transpose(x, w, **opts), x, w)
        return y, vjp(g)

    # The weight gradient two ways: conv_transpose's own custom_jvp, and JAX autodiff of the same
    # lhs_dilation convolution without it (a conv with lhs_dilation = S, which XLA:CPU runs slowly).
    plain = lambda x, w: F.spread_conv(x, F.transpose_kernel(w, 1), stride=(args.stride,) * 2,
                                       pads=((args.padding, args.padding),) * 2,
                                       output_padding=(args.output_padding,) * 2, dilation=(1, 1), groups=1)
    dw_rule = compiler.jit(lambda x, w, g: jax.vjp(lambda w: F.conv_transpose(x, w, **opts), w)[1](g)[0])
    dw_plain = compiler.jit(lambda x, w, g: jax.vjp(lambda w: plain(x, w), w)[1](g)[0])

    block = lambda f: (lambda: jax.block_until_ready(f()))
    return {"jaxconv forward": block(lambda: fwd(x, w)),
            "jaxconv fwd+bwd (hand-written)": block(lambda: manual(x, w, g)),
            "jaxconv fwd+bwd (autodiff)": block(lambda: auto(x, w, g)),
            "jaxconv weight grad": block(lambda: dw_rule(x, w, g)),
            "weight grad, autodiff w/o the rule": block(lambda: dw_plain(x, w, g))}


def torch_pieces(args, channels_last):
    import torch
    layer = torch.nn.ConvTranspose2d(args.cin, args.cout, args.kernel, stride=args.stride, padding=args.padding,
                                     output_padding=args.output_padding, bias=False)
    x = torch.randn(args.batch, args.cin, args.size, args.size, requires_grad=True)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn_like(layer(x))
    tag = "channels_last" if channels_last else "NCHW"

    def fwd():
        with torch.no_grad():
            layer(x)

    def both():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(g)
    return {f"torch {tag} forward": fwd, f"torch {tag} fwd+bwd": both}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=14)
    parser.add_argument("--cin", type=int, default=64)
    parser.add_argument("--cout", type=int, default=32)
    parser.add_argument("--kernel", type=int, default=2)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--padding", type=int, default=0)
    parser.add_argument("--output-padding", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    import torch
    if args.cases:
        jax.config.update("jax_enable_x64", True)
        fwd_err, bwd_err = agreement(args.cases)
        jax.config.update("jax_enable_x64", False)
        print(f"{args.cases} random configurations (1-D and 2-D; stride, padding, output_padding, dilation 1-3, "
              f"groups 1-3), float64, vs torch: worst relative error forward {fwd_err:.2e}, "
              f"backward (dx, dw, db) {bwd_err:.2e}")
    runs = {**jax_pieces(args), **torch_pieces(args, False), **torch_pieces(args, True)}
    for run in runs.values():
        for _ in range(3):
            run()
    med = medians(runs, steps=2 * args.rounds)
    print(f"layer: batch {args.batch}, {args.size}x{args.size}x{args.cin} -> {args.cout}, kernel {args.kernel}, "
          f"stride {args.stride}, padding {args.padding}, output_padding {args.output_padding}; float32, "
          f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); medians of {args.rounds} alternating rounds")
    for name, t in med.items():
        print(f"{name:34s} {t * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
