"""Hand-written backward passes against autodiff, for every op and every registered model.

    python experiments/autodiff_vs_manual.py [--per-op 100] [--epochs 60]

Writes runs/experiments/autodiff_vs_manual.md with
  1. per op: random configurations checked and the worst relative error of the hand-written vjp
     against jax.vjp, in float64 and float32;
  2. per model: the worst relative error of manual backprop against jax.grad (float64 and float32)
     and against a central finite difference (float64);
  3. the step-time ratio manual/auto of a jitted training step (batch 128, float32),
and runs/experiments/autodiff_vs_manual.png: MNIST-1D training curves with grad="auto" and
grad="manual" from the same seed, overlaid. Cost: about 10 minutes on 2 CPU cores.
"""
import argparse
import os

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

from jaxconv.data import load_dataset  # noqa: E402
from jaxconv.gradcheck import model_report, op_error, random_op_cases, step_time_ratio  # noqa: E402
from jaxconv.models import MODELS  # noqa: E402
from jaxconv.train import TrainConfig, fit  # noqa: E402

OUT = os.path.join("runs", "experiments")


def op_table(per_op: int):
    lines = ["| op | configurations | worst rel. error float64 | worst rel. error float32 |", "|---|---:|---:|---:|"]
    worst = {}
    for dtype in (np.float64, np.float32):
        rng = np.random.default_rng(0)
        for name, forward, args, options in random_op_cases(rng, per_op, dtype):
            entry = worst.setdefault(name, {"n": 0})
            entry[dtype] = max(entry.get(dtype, 0.0), op_error(forward, args, options, rng))
            entry["n"] += dtype is np.float64
    for name, entry in worst.items():
        lines.append(f"| {name} | {entry['n']} | {entry[np.float64]:.2e} | {entry[np.float32]:.2e} |")
    return lines


def model_table(models, timing_models):
    lines = ["| model | worst rel. error vs jax.grad, float64 | float32 (HIGHEST) | worst rel. error vs finite "
             "difference, float64 | manual ms/step | auto ms/step | manual/auto |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in models:
        rows = model_report(name)
        f64 = max(r[3] for r in rows if r[0] == "float64")
        f32 = max(r[3] for r in rows if r[0] == "float32")
        fd = max(r[4] for r in rows if r[0] == "float64")
        timing = "| - | - | - |"
        if name in timing_models:
            jax.config.update("jax_enable_x64", False)
            manual, auto = step_time_ratio(name)
            jax.config.update("jax_enable_x64", True)
            timing = f"| {manual * 1e3:.2f} | {auto * 1e3:.2f} | {manual / auto:.3f} |"
        lines.append(f"| {name} | {f64:.2e} | {f32:.2e} | {fd:.2e} {timing}")
        print(lines[-1], flush=True)
    return lines


def curves(epochs: int):
    jax.config.update("jax_enable_x64", False)
    data = load_dataset("mnist1d")
    histories = {g: fit(TrainConfig(grad=g, epochs=epochs, out=os.path.join(OUT, f"mnist1d_{g}")), dataset=data,
                        overwrite=True, log=lambda *a: None) for g in ("auto", "manual")}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for grad, style in (("auto", "-"), ("manual", "--")):
        h = histories[grad]
        ax_loss.plot([r["epoch"] for r in h], [r["train_loss"] for r in h], style, label=f"grad={grad} train")
        ax_acc.plot([r["epoch"] for r in h], [r["test_accuracy"] for r in h], style, label=f"grad={grad} test")
    ax_loss.set(xlabel="epoch", ylabel="train loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("mnist1d_cnn on MNIST-1D, seed 0: autodiff vs hand-written backward (float32)")
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "autodiff_vs_manual.png"), dpi=100)
    gap = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(histories["auto"], histories["manual"]))
    return [f"MNIST-1D, {epochs} epochs: final test accuracy auto {histories['auto'][-1]['test_accuracy']:.4f}, "
            f"manual {histories['manual'][-1]['test_accuracy']:.4f}; largest per-epoch train-loss gap {gap:.2e}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-op", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--timing", nargs="*", default=["seed_cnn", "lenet5", "resnet20"])
    parser.add_argument("--models", nargs="*", default=[m for m in MODELS if MODELS[m].input_shape != (224, 224, 3)],
                        help="models for the whole-model table (default: every model with inputs up to 32 pixels; "
                             "the ImageNet ResNets take minutes each in float64)")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    device = f"{jax.devices()[0].platform}, {os.cpu_count()} cores, jax {jax.__version__}"
    sections = [f"# Autodiff vs hand-written backward ({device})", "", "## Per op, random configurations", ""]
    sections += op_table(args.per_op)
    print("\n".join(sections), flush=True)
    sections += ["", "## Whole models (batch 8; timing: batch 128, SGD step, median of 30 alternating rounds)", ""]
    sections += model_table(args.models, args.timing)
    sections += ["", "## Training", ""] + curves(args.epochs)
    text = "\n".join(sections) + "\n"
    with open(os.path.join(OUT, "autodiff_vs_manual.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
