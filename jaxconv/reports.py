"""What a finished run shows: the confusion matrix as text, and its curves as pictures."""
from __future__ import annotations

import os

import numpy as np


def format_matrix(matrix, class_names=None) -> str:
    width = max(len(str(int(matrix.max()))), 3)
    names = [str(n)[:12] for n in (class_names or range(matrix.shape[0]))]
    label = max(len(n) for n in names)
    head = " " * (label + 6) + " ".join(f"{j:>{width}d}" for j in range(matrix.shape[1]))
    rows = [f"{i:>3d} {names[i]:<{label}s}: " + " ".join(f"{v:>{width}d}" for v in row) for i, row in enumerate(matrix)]
    return "\n".join([head] + rows)


def _splits(history: list[dict]) -> list[str]:
    return ["train"] + [s for s in ("val", "test") if f"{s}_loss" in history[0]]


def _draw(path: str, title: str, draw_metric) -> None:
    """Loss and accuracy side by side, ``draw_metric(ax, metric)`` filling each; written atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        draw_metric(ax, metric)
        ax.set(xlabel="epoch", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(f"{path}.tmp", dpi=100, format="png")
    plt.close(fig)
    os.replace(f"{path}.tmp", path)


def plot_curves(history, path: str, *, title: str = ""):
    """Loss and accuracy per epoch of every split a run's metrics hold."""
    epochs = [h["epoch"] for h in history]

    def draw(ax, metric):
        for split in _splits(history):
            ax.plot(epochs, [h[f"{split}_{metric}"] for h in history], label={"val": "validation"}.get(split, split))
        ax.set_title(metric)

    _draw(path, title, draw)


def plot_seed_band(histories, path: str, *, title: str = ""):
    """Every seed's curves (thin) and their mean with a band of one standard deviation, for every split."""
    epochs = [h["epoch"] for h in histories[0]]

    def draw(ax, metric):
        for split in _splits(histories[0]):
            values = np.array([[h[f"{split}_{metric}"] for h in history] for history in histories])
            mean, std = values.mean(0), values.std(0)
            line, = ax.plot(epochs, mean, label={"val": "validation"}.get(split, split))
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.25)
            for row in values:
                ax.plot(epochs, row, color=line.get_color(), linewidth=0.5, alpha=0.5)
        ax.set_title(f"{metric}: {len(histories)} seeds, mean ± std")

    _draw(path, title, draw)
