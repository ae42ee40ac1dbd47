"""GroupNorm's statistics: one reduction over the axes of ``[N, *spatial, G, C // G]`` (jaxconv until 2026-12-05,
what a direct transcription of the definition gives) against per-channel sums over the positions, then sums per
group (``functional.over_groups``, now); the layer alone beside PyTorch's ``GroupNorm``, then unet_small's whole
training and inference steps both ways, side by side in one process.

    python benchmarks/group_norm.py [--shape 128,28,28,32] [--groups 4] [--steps 30]
"""
import argparse

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv import bench, compiler, parallel, timing
from jaxconv import functional as F
from jaxconv.models import create_model


def grouped_axes_group_norm(x, scale, bias, *, num_groups, epsilon=1e-5):
    """The former ``functional.group_norm``: statistics over the axes of the grouped array."""
    c = x.shape[-1]
    xg = x.reshape(*x.shape[:-1], num_groups, c // num_groups)
    axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    inv = lax.rsqrt(jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True) + epsilon)
    return ((xg - mean) * inv).reshape(x.shape) * scale + bias


def layer_calls(shape, groups):
    key = jax.random.key(0)
    x, g = jax.random.normal(key, shape), jax.random.normal(jax.random.key(1), shape)
    scale, bias = jnp.full(shape[-1], 1.1), jnp.full(shape[-1], 0.1)
    calls = {}
    for name, norm in (("grouped axes", grouped_axes_group_norm), ("per channel, then group", F.group_norm)):
        f = lambda x, s, b, norm=norm: norm(x, s, b, num_groups=groups)
        fwd = compiler.jit(f)
        bwd = compiler.jit(lambda x, s, b, g, f=f: jax.vjp(f, x, s, b)[1](g))
        calls[f"forward, {name}"] = lambda fwd=fwd: jax.block_until_ready(fwd(x, scale, bias))
        calls[f"backward, {name}"] = lambda bwd=bwd: jax.block_until_ready(bwd(x, scale, bias, g))
    try:
        import torch
    except ImportError:
        return calls
    layer = torch.nn.GroupNorm(groups, shape[-1])
    xt = torch.randn(shape[0], shape[-1], *shape[1:-1]).contiguous(memory_format=torch.channels_last)
    xt.requires_grad_()
    gt = torch.randn_like(xt)

    def torch_forward():
        with torch.no_grad():
            layer(xt)
    calls["forward, torch channels_last"] = torch_forward
    calls["backward, torch channels_last"] = lambda: layer(xt).backward(gt)
    return calls


def step_calls():
    mesh, calls, kept = parallel.make_mesh(1), {}, F.group_norm
    for mode in ("train", "inference"):
        for name, norm in (("grouped axes", grouped_axes_group_norm), ("per channel, then group", kept)):
            F.group_norm = norm  # read when the model's layers are traced, inside jax_step
            try:
                run, _ = bench.jax_step(create_model("unet_small"), 128, mode=mode, dtype="float32", mesh=mesh)
            finally:
                F.group_norm = kept
            calls[f"unet_small {mode}, {name}"] = run
    return calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="128,28,28,32")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    for title, calls in ((f"GroupNorm {shape}, {args.groups} groups (backward: forward and vjp)",
                          layer_calls(shape, args.groups)), ("whole steps, batch 128", step_calls())):
        for call in calls.values():
            call()
        print(f"{title}; medians of {args.steps} alternating calls, ms:")
        for name, seconds in timing.medians(calls, steps=args.steps).items():
            print(f"  {name:<45} {seconds * 1e3:9.2f}")


if __name__ == "__main__":
    main()
