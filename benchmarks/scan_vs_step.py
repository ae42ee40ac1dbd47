"""One training epoch as separate jitted steps vs one jitted lax.scan over the steps, side by side.

    python benchmarks/scan_vs_step.py [--dataset mnist1d] [--model mnist1d_cnn] [--batch 100]

Both run the same jaxconv train_step on the same data; each variant is compiled, then the epoch
is timed in alternation (median of --rounds). The per-step loop is what `jaxconv train` uses.
"""
import argparse
import os
import time

import jax
import numpy as np

from jaxconv import compiler
from jaxconv.data import DATASETS, load_dataset
from jaxconv.train import TrainConfig, init_state, make_steps, resolve


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    config = resolve(TrainConfig(dataset=args.dataset, model=args.model, batch_size=args.batch, out="unused"))
    data = load_dataset(args.dataset, data_dir=args.data_dir)
    steps = len(data.train) // args.batch
    state, g_train, g_eval, tx = init_state(config, data.train.images.shape[1:], DATASETS[args.dataset].num_classes,
                                            steps)
    step_jit, _ = make_steps(g_train, g_eval, tx, config, DATASETS[args.dataset])
    step_raw = step_jit.__wrapped__
    images, labels = jax.device_put(data.train.images), jax.device_put(data.train.labels)
    order = jax.random.permutation(jax.random.key(0), len(data.train))[: steps * args.batch].reshape(steps, -1)

    def loop(state):
        for i in range(steps):
            state, m = step_jit(state, images, labels, order, i)
        return state, m["loss"]

    @compiler.jit
    def scanned(state):
        def body(s, i):
            s, m = step_raw(s, images, labels, order, i)
            return s, m["loss"]
        return jax.lax.scan(body, state, np.arange(steps))

    copy = lambda s: jax.tree.map(lambda a: a.copy(), s)
    variants = {"jit per step": loop, "lax.scan epoch": scanned}
    for run in variants.values():
        jax.block_until_ready(run(copy(state)))
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            s = copy(state)
            t = time.perf_counter()
            jax.block_until_ready(run(s))
            times[name].append(time.perf_counter() - t)
    print(f"{config.model} on {args.dataset}: {steps} steps of {args.batch}, {jax.devices()[0].platform} "
          f"({os.cpu_count()} cores), jax {jax.__version__}, median of {args.rounds}")
    base = np.median(times["jit per step"])
    for name, t in times.items():
        print(f"{name:16s} {np.median(t) * 1e3:9.1f} ms/epoch  {np.median(t) / base:6.2f}x")


if __name__ == "__main__":
    main()
