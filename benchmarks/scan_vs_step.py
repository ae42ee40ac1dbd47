"""Training steps per dispatch: one jitted step at a time vs N steps in one ``lax.scan`` program, side by side.

    python benchmarks/scan_vs_step.py [--dataset mnist1d] [--model M] [--batch 100] [--per-dispatch 1,8,all]

Each variant is ``jaxconv train --steps-per-dispatch N``'s own program (``steps.make_replica_steps``), on the same
data and start state; each is compiled first, then whole epochs are timed in alternation (median of
``--rounds``). Runs unchanged on CPU, GPU and TPU: ``fit``'s default (1) is what was measured faster on XLA:CPU.
"""
import argparse
import os
import time

import jax
import numpy as np

from jaxconv import parallel
from jaxconv.data import DATASETS, load_dataset
from jaxconv.steps import init_replicas, make_replica_steps
from jaxconv.train import TrainConfig, _steps_to_dispatch, resolve


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--per-dispatch", default="1,8,all", help="steps per dispatch to compare; all: an epoch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    config = resolve(TrainConfig(dataset=args.dataset, model=args.model, batch_size=args.batch, out="unused"))
    data, info = load_dataset(args.dataset, data_dir=args.data_dir), DATASETS[args.dataset]
    steps, mesh = len(data.train) // args.batch, parallel.make_mesh(config.devices, batch=args.batch)
    state, g_train, g_eval, tx = init_replicas(config, [0], data.train.images.shape[1:], info.num_classes, steps,
                                               mesh)
    train_steps, _ = make_replica_steps(g_train, g_eval, tx, config, info, mesh, 1)
    put = lambda a: parallel.put(mesh, a)
    images, labels = put(data.train.images), put(data.train.labels)
    order = put(np.random.default_rng(0).permutation(len(data.train))[: steps * args.batch].reshape(1, steps, -1)
                .astype(np.int32))
    copy = lambda s: jax.tree.map(lambda a: a.copy(), s)

    def epoch(per_dispatch):
        def run(s):
            i = 0
            while i < steps:
                n = _steps_to_dispatch(0, i, steps, per_dispatch, 0)
                s, loss = train_steps(s, images, labels, order, i, n)
                i += n
            return s, loss
        return run

    variants = {(steps if n == "all" else int(n)): None for n in args.per_dispatch.split(",")}
    for n in variants:
        t = time.perf_counter()
        jax.block_until_ready(epoch(n)(copy(state)))
        variants[n] = dict(run=epoch(n), first_s=time.perf_counter() - t, times=[])
    for _ in range(args.rounds):
        for v in variants.values():
            s = copy(state)
            t = time.perf_counter()
            jax.block_until_ready(v["run"](s))
            v["times"].append(time.perf_counter() - t)
    print(f"{config.model} on {args.dataset}: {steps} steps of {args.batch}, {parallel.describe(mesh)} "
          f"({os.cpu_count()} cores), jax {jax.__version__}, median of {args.rounds} epochs")
    base = np.median(next(iter(variants.values()))["times"])
    for n, v in variants.items():
        t = np.median(v["times"])
        print(f"{n:5d} steps/dispatch  {t * 1e3:9.1f} ms/epoch  {t / base:6.2f}x  (first epoch, compile included: "
              f"{v['first_s']:.2f} s)")


if __name__ == "__main__":
    main()
