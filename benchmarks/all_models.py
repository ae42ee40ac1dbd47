"""Every registered model, training and inference, float32, against its PyTorch twin and its plain Flax NNX
program: the README's table.

    python benchmarks/all_models.py [--steps 10] [--out runs/bench] [--models M,M...]
    python benchmarks/all_models.py --table      # the README's markdown table from OUT's records

Batch 128, except the ImageNet-sized ResNets (224x224 inputs), which take batch 16 on this 24 GiB, 2-core
machine. One `jaxconv bench --compare torch,flax` per batch size; writes OUT/all_models.{jsonl,csv,png}.
"""
import argparse
import glob
import json
import os
import sys

from jaxconv.bench import rounds_text
from jaxconv.cli import main
from jaxconv.models import MODELS

IMAGENET = ("resnet18", "resnet50")


def ms(seconds):
    return f"{seconds * 1e3:,.2f}" if seconds is not None else "-"


def ratio(row, key):
    """A speed-up, bold where >= 1, with the quartiles of its call-by-call ratios over the rounds where recorded."""
    r = row.get(key)
    if r is None:
        return "-"
    text = f"**{r:.2f}x**" if r >= 1 else f"{r:.2f}x"
    return text + (f" ({rounds_text(row, key)})" if key + "_q25" in row else "")


def table(out: str) -> str:
    """One markdown row per model from OUT/all_models_b*.jsonl: train and inference, jaxconv / torch / flax."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(out, "all_models_b*.jsonl"))):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                rows.setdefault((r["model"], r["batch"]), {})[r["mode"]] = r
    lines = ["| model | batch | train ms: jaxconv / torch / flax | train vs torch / flax | "
             "inference ms: jaxconv / torch / flax | inference vs torch / flax | FLOPs XLA / model (train) | "
             "MFU train / inference |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = {name: i for i, name in enumerate(MODELS)}
    for (model, batch), modes in sorted(rows.items(), key=lambda kv: order.get(kv[0][0], 99)):
        cells = [model, str(batch)]
        for mode in ("train", "inference"):
            r = modes.get(mode, {})
            layout = f" ({r['torch_layout']})" if mode == "train" and r.get("torch_layout") else ""
            cells.append(f"{ms(r.get('step_s'))} / {ms(r.get('torch_step_s'))}{layout} / {ms(r.get('flax_step_s'))}")
            cells.append(f"{ratio(r, 'speed_vs_torch')} / {ratio(r, 'speed_vs_flax')}")
        train, infer = modes.get("train", {}), modes.get("inference", {})
        cells.append(f"{train['flops_ratio']:.3f}" if train.get("flops_ratio") else "-")
        cells.append(" / ".join(f"{m['mfu']:.1%}" if m.get("mfu") else "-" for m in (train, infer)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="10")
    parser.add_argument("--out", default=os.path.join("runs", "bench"))
    parser.add_argument("--models", help="a subset (default: every registered model)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of OUT's records and stop")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        sys.exit(0)
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
