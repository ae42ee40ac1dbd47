"""An ordinary Flax NNX training step (nnx.Optimizer, in-place updates) under `nnx.jit` and under `jaxconv.jit`.

    python benchmarks/nnx_jit_vs_jaxconv_jit.py [--model seed_cnn] [--batch 128] [--steps 30]

The same step function, two decorators; each has its own model and optimizer (Adam); calls alternate
(`jaxconv.timing.time_calls`). Prints both medians and the ratio.
"""
import argparse

import jax
import optax
from flax import nnx

import jaxconv
from jaxconv import functional as F
from jaxconv.timing import time_calls


def runner(jit, model_name, batch):
    model = jaxconv.create_model(model_name)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(0), (batch, *model.input_shape))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)

    @jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda m: F.cross_entropy(m(x), y))(model)
        opt.update(model, grads)
        return loss

    return lambda: jax.block_until_ready(step(model, opt, x, y))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seed_cnn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    timed = time_calls({"nnx.jit": runner(nnx.jit, args.model, args.batch),
                        "jaxconv.jit": runner(jaxconv.jit, args.model, args.batch)}, steps=args.steps)
    for name, t in timed.items():
        print(f"{name:12s} first call {t['first_s']:.2f} s, step {t['median_s'] * 1e3:.2f} ms (median of {t['samples']})")
    print(f"{args.model}, batch {args.batch}, {jax.devices()[0].device_kind}: nnx.jit / jaxconv.jit step time = "
          f"{timed['nnx.jit']['median_s'] / timed['jaxconv.jit']['median_s']:.2f}")


if __name__ == "__main__":
    main()
