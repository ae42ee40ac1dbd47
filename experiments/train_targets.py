"""Train each dataset's recipe and report accuracy, wall time and time-to-target (issue 3's table).

    python experiments/train_targets.py [--only mnist1d_cnn mnist ...] [--mnist-dir DIR] [--cifar-dir DIR]

Each run is exactly `jaxconv train --dataset D [--model M]` with the recipe defaults. Results are
appended to runs/experiments/train_targets.md (one row per run, with the machine). Cost on 2 CPU
cores: MNIST-1D runs well under a minute each, MNIST under a minute, Fashion-MNIST about 4
minutes, CIFAR-10 (convnetjs_cifar, 70 epochs) about 18 minutes.
"""
import argparse
import os
import platform
import time

import jax

from jaxconv.train import TrainConfig, fit

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "data")
RUNS = {  # name: (dataset, model or None for the recipe's, target accuracy)
    "mnist1d_cnn": ("mnist1d", None, 0.90),
    "mnist1d_deep": ("mnist1d", "mnist1d_deep", 0.98),
    "mnist": ("mnist", None, 0.99),
    "fashion_mnist": ("fashion_mnist", None, 0.925),
    "cifar10": ("cifar10", None, 0.75),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--mnist-dir", default=os.path.join(SHARED, "mnist"))
    parser.add_argument("--cifar-dir", help="folder holding cifar-10-batches-py (see shared/tools/cifar10_from_jpeg.py)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = os.path.join("runs", "experiments")
    os.makedirs(out, exist_ok=True)
    machine = f"{platform.machine()} {jax.devices()[0].platform}, {os.cpu_count()} cores, jax {jax.__version__}"
    data_dirs = {"mnist": args.mnist_dir, "cifar10": args.cifar_dir}
    for name in args.only:
        dataset, model, target = RUNS[name]
        start = time.perf_counter()
        history = fit(TrainConfig(dataset=dataset, model=model, seed=args.seed, data_dir=data_dirs.get(dataset),
                                  out=os.path.join(out, f"target_{name}")), overwrite=True)  # a re-run replaces its own
        total = time.perf_counter() - start
        reached = next((h for h in history if h["test_accuracy"] >= target), None)
        row = (f"| {name} | {history[-1]['test_accuracy']:.4f} | {max(h['test_accuracy'] for h in history):.4f} | "
               f"{target:.3f} | " + (f"{reached['wall_s']:.1f} s (epoch {reached['epoch']})" if reached else "not reached")
               + f" | {history[-1]['wall_s']:.1f} s | {total:.1f} s | "
               f"{sum(h['images_per_s'] for h in history) / len(history):,.0f} | {machine} |")
        print(row, flush=True)
        path = os.path.join(out, "train_targets.md")
        new = not os.path.exists(path)
        with open(path, "a") as f:
            if new:
                f.write("| run | final test acc | best | target | time to target | training wall | process wall "
                        "(with data loading and compiling) | mean images/s | machine |\n"
                        "|---|---:|---:|---:|---:|---:|---:|---:|---|\n")
            f.write(row + "\n")


if __name__ == "__main__":
    main()
