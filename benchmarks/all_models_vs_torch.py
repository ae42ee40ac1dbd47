"""Every registered model, training and inference, float32, against its PyTorch twin: the README's table.

    python benchmarks/all_models_vs_torch.py [--steps 10] [--out runs/bench]

Batch 128, except the ImageNet-sized ResNets (224x224 inputs), which take batch 16 on this 24 GiB, 2-core
machine. One `jaxconv bench --compare torch` per batch size; writes OUT/all_models.{jsonl,csv,png}.
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
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    groups = {"128": [m for m in MODELS if m not in IMAGENET], "16": list(IMAGENET)}
    for batch, models in groups.items():
        stem = os.path.join(args.out, f"all_models_b{batch}")
        status = main(["bench", "--model", ",".join(models), "--mode", "train,inference", "--batch-size", batch,
                       "--compare", "torch", "--steps", args.steps, "--json", f"{stem}.jsonl", "--csv", f"{stem}.csv",
                       "--plot", f"{stem}.png"])
        if status:
            sys.exit(status)
