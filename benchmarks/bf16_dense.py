"""bfloat16 training steps with dense layers on XLA's plain bfloat16 dot against jaxconv's float32-accumulating
one (`functional.matmul`), side by side in one process (the float32 step alongside).

    python benchmarks/bf16_dense.py [--models mnist1d_mlp,seed_cnn,mnist_cnn] [--batch 128] [--steps 20]

First the product alone (a 128x3136 @ 3136x512 dense layer: float32, XLA's bfloat16 dot, the
float32-accumulating one), then whole training steps.

The "plain" contender is the same model traced with `functional.matmul` swapped for `jnp.dot` (what
jaxconv did before), so only the dense products differ; the script checks both give the same loss.
"""
import argparse
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxconv import functional as F
from jaxconv.models import create_model
from jaxconv.timing import jitted_train_step, medians, step_runner


@contextlib.contextmanager
def plain_bf16_dot():
    kept = F.matmul
    F.matmul = lambda a, b, *, precision=None: jnp.dot(a, b, precision=precision)
    try:
        yield
    finally:
        F.matmul = kept


def compiled_step(name, batch, dtype, plain=False):
    model = create_model(name, dtype=dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *model.input_shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch))
    step, state = jitted_train_step(model, x, y, optax.sgd(0.01))
    with plain_bf16_dot() if plain else contextlib.nullcontext():
        loss = step(*state)[-1]  # traced and compiled here
    return step_runner(step, state), float(loss)


def product_alone(steps):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x, w = jax.random.normal(k1, (128, 3136), jnp.bfloat16), jax.random.normal(k2, (3136, 512), jnp.bfloat16)
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    dot, acc = jax.jit(jnp.dot), jax.jit(F.matmul)  # XLA's own dot in float32 and in bfloat16; jaxconv's
    runs = {"f32": lambda: dot(x32, w32).block_until_ready(), "plain": lambda: dot(x, w).block_until_ready(),
            "acc": lambda: acc(x, w).block_until_ready()}
    for run in runs.values():
        run()
    a, b = np.asarray(dot(x, w), np.float32), np.asarray(acc(x, w), np.float32)
    print(f"product: plain and float32-accumulating bfloat16 differ by at most {np.abs(a - b).max():.3g} "
          f"(values up to {np.abs(a).max():.3g}; a bfloat16 step there is {2.0 ** (np.floor(np.log2(np.abs(a).max())) - 7):.3g})")
    t = medians(runs, steps=steps)
    print(f"{'product':14s} {t['f32'] * 1e3:11.3f} {t['plain'] * 1e3:14.3f} {t['acc'] * 1e3:16.3f} "
          f"{t['plain'] / t['acc']:8.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist1d_mlp,seed_cnn,mnist_cnn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, batch {args.batch}, median of {args.steps} alternating steps")
    print(f"{'model':14s} {'float32 ms':>11s} {'bf16 plain ms':>14s} {'bf16 f32-acc ms':>16s} {'speed-up':>9s}")
    product_alone(args.steps)
    for name in args.models.split(","):
        f32, _ = compiled_step(name, args.batch, None)
        plain, loss_plain = compiled_step(name, args.batch, jnp.bfloat16, plain=True)
        acc, loss_acc = compiled_step(name, args.batch, jnp.bfloat16)
        assert loss_plain == loss_acc, (loss_plain, loss_acc)
        t = medians({"f32": f32, "plain": plain, "acc": acc}, steps=args.steps)
        print(f"{name:14s} {t['f32'] * 1e3:11.2f} {t['plain'] * 1e3:14.2f} {t['acc'] * 1e3:16.2f} "
              f"{t['plain'] / t['acc']:8.2f}x")
