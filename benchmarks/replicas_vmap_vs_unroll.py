"""One training step of K replicas (``--seeds K``) in one program: ``jax.vmap`` against K unrolled copies.

    python benchmarks/replicas_vmap_vs_unroll.py [--seeds 8] [--model mnist1d_cnn] [--rounds 7]

Builds the step as ``jaxconv train`` does (``steps.make_replica_steps``) with ``JAXCONV_REPLICAS`` set to each
strategy, and times an epoch of MNIST-1D steps, the strategies alternating round by round so that the
machine's drift hits both alike. Prints compile time (first call) and the median step time of each, and one
replica's step for scale.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from jaxconv import parallel
from jaxconv.config import TrainConfig, resolve
from jaxconv.data import DATASETS, load_dataset
from jaxconv.steps import init_replicas, make_replica_steps


def build(model: str, replicas: int, strategy: str, data, mesh):
    os.environ["JAXCONV_REPLICAS"] = strategy
    config = resolve(TrainConfig(out="unused", model=model, seeds=replicas))
    info = DATASETS["mnist1d"]
    steps = len(data.train) // config.batch_size
    state, g_train, g_eval, tx = init_replicas(config, range(replicas), info.input_shape, info.num_classes, steps, mesh)
    train_step, _ = make_replica_steps(g_train, g_eval, tx, config, info, mesh, replicas)
    rng = np.random.default_rng(0)
    order = np.stack([rng.permutation(len(data.train))[: steps * config.batch_size].reshape(steps, -1)
                      for _ in range(replicas)]).astype(np.int32)
    arrays = parallel.put(mesh, data.train.images), parallel.put(mesh, data.train.labels), parallel.put(mesh, order)
    start = time.perf_counter()
    state, loss = train_step(state, *arrays, 0, 1)
    jax.block_until_ready(loss)
    return dict(step=train_step, state=state, arrays=arrays, steps=steps, compile_s=time.perf_counter() - start,
                times=[])


def epoch(run):
    start = time.perf_counter()
    state = run["state"]
    for i in range(run["steps"]):
        state, loss = run["step"](state, *run["arrays"], i, 1)
    jax.block_until_ready(loss)
    run["state"] = state
    run["times"].append((time.perf_counter() - start) / run["steps"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--model", default="mnist1d_cnn")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    data, mesh = load_dataset("mnist1d"), parallel.make_mesh("all")
    runs = {f"vmap x{args.seeds}": build(args.model, args.seeds, "vmap", data, mesh),
            f"unroll x{args.seeds}": build(args.model, args.seeds, "unroll", data, mesh),
            "one replica": build(args.model, 1, "unroll", data, mesh)}
    for _ in range(args.rounds):
        for run in runs.values():
            epoch(run)
    print(f"{args.model}, batch 100 per replica, {jax.devices()[0].platform} ({jax.device_count()} device(s)), "
          f"median of {args.rounds} epochs:")
    for name, run in runs.items():
        print(f"  {name:12s} compile {run['compile_s']:5.2f} s   step {np.median(run['times']) * 1e3:6.2f} ms")
    vmap, unroll = (np.median(runs[f"{s} x{args.seeds}"]["times"]) for s in ("vmap", "unroll"))
    print(f"  vmap / unroll step time = {vmap / unroll:.2f}")


if __name__ == "__main__":
    main()
