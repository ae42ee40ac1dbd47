"""Every registered model, training and inference, float32, against its PyTorch twin and its plain Flax NNX
program: the README's table.

    python benchmarks/all_models.py [--steps 10] [--out runs/bench] [--models M,M...]

Batch 128, except the ImageNet-sized ResNets (224x224 inputs), which take batch 16 on this 24 GiB, 2-core
machine. One `jaxconv bench --compare torch,flax` per batch size; writes OUT/all_models.{jsonl,csv,png}.
"""
import argparse
import os
import sys

from jaxconv.cli import main
from jaxconv.models import MODELS

IMAGENET = ("resnet18", "resnet50")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="10")
    parser.add_argument("--out", default=os.path.join("runs", "bench"))
    parser.add_argument("--models", help="a subset (default: every registered model)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    chosen = args.models.split(",") if args.models else list(MODELS)
    groups = {"128": [m for m in chosen if m not in IMAGENET], "16": [m for m in chosen if m in IMAGENET]}
    for batch, models in ((b, m) for b, m in groups.items() if m):
        stem = os.path.join(args.out, f"all_models_b{batch}")
        status = main(["bench", "--model", ",".join(models), "--mode", "train,inference", "--batch-size", batch,
                       "--compare", "torch,flax", "--steps", args.steps, "--json", f"{stem}.jsonl", "--csv", f"{stem}.csv",
                       "--plot", f"{stem}.png"])
        if status:
            sys.exit(status)
