"""Pictures of what a network sees: first-layer filters, every conv layer's feature maps for one input with
the predicted class probabilities, and a model's receptive fields layer by layer.

``jaxconv visualize --out RUN`` and ``jaxconv summary --model M --plot FILE`` draw them; the functions here
take arrays, so a research script can draw its own model's.
"""
from __future__ import annotations

import math

import numpy as np
from flax import nnx

from jaxconv import layers as L

MAX_CHANNELS = 16  # feature maps drawn per layer


def conv_outputs(module, x):
    """``(output, [(path, layer, feature_maps)])``: one forward pass of ``module`` on the batch ``x`` (already
    normalised as the model was trained), with every conv and transposed-conv layer's output for the first
    example, in call order. ``path`` names the layer as the module tree does (``layers/3/body/layers/0``)."""
    paths = {id(layer): "/".join(map(str, path)) for path, layer in nnx.iter_modules(module)}
    with L.recording() as seen:
        y = module(x)
    maps = [(paths.get(id(layer), type(layer).__name__), layer, np.asarray(out[0], np.float32))
            for layer, out in seen if isinstance(layer, L.Conv)]
    return np.asarray(y), maps


def first_conv_kernel(module):
    """``(path, kernel)`` of the first conv layer in the module tree, or ``None`` for a model without one."""
    for path, layer in nnx.iter_modules(module):
        if isinstance(layer, L.Conv):
            return "/".join(map(str, path)), np.asarray(layer.kernel[...], np.float32)
    return None


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def _scaled(a):
    """Into [0, 1] over the whole array (so filters and maps compare with each other)."""
    lo, hi = float(np.min(a)), float(np.max(a))
    return np.zeros_like(a) if hi == lo else (a - lo) / (hi - lo)


def plot_filters(kernel, path: str, *, title: str = "") -> None:
    """The filters of a first conv layer, ``kernel [*K, C_in, C_out]``: 2-D kernels as images (in colour when
    ``C_in`` is 3, else the first input channel in grey), 1-D kernels as curves, one panel per filter."""
    plt = _plt()
    spatial, c_out = kernel.ndim - 2, kernel.shape[-1]
    rows, cols = _grid(c_out)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.6), squeeze=False)
    scaled = _scaled(kernel)
    for j, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        if j >= c_out:
            ax.axis("off")
            continue
        if spatial == 2:
            ax.imshow(scaled[..., :, j] if kernel.shape[-2] == 3 else scaled[..., 0, j], cmap="gray",
                      vmin=0, vmax=1, interpolation="nearest")
        elif spatial == 1:  # one scale for every filter, so their sizes compare
            for c in range(kernel.shape[-2]):
                ax.plot(kernel[:, c, j], marker=".")
            ax.axhline(0, color="0.7", lw=0.5)
            ax.set_ylim(float(kernel.min()) * 1.1, float(kernel.max()) * 1.1)
        else:  # 3-D: the middle depth slice
            ax.imshow(scaled[kernel.shape[0] // 2, ..., 0, j], cmap="gray", vmin=0, vmax=1)
        ax.set_title(str(j), fontsize=7)
    fig.suptitle(title or f"first-layer filters {tuple(kernel.shape)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_feature_maps(image, maps, probabilities, class_names, path: str, *, title: str = "",
                      max_channels: int = MAX_CHANNELS) -> None:
    """One row per conv layer (its first ``max_channels`` output channels, each scaled on its own), under a top
    row with the input and the predicted class probabilities (a per-pixel model: its predicted class map)."""
    import textwrap
    plt = _plt()
    cols = max(4, min(max_channels, max((m.shape[-1] for _, _, m in maps), default=1)))
    rows = 1 + len(maps)
    height = 1.1 * rows + 0.8
    fig = plt.figure(figsize=(1.1 * cols + 2.0, height))
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1.8] + [1] * cols, left=0.01, right=0.99, bottom=0.01,
                            top=1 - 0.55 / height, wspace=0.12, hspace=0.3)
    image = np.asarray(image, np.float32)
    ax = fig.add_subplot(grid[0, 0])
    if image.ndim == 3:  # [H, W, C]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else _scaled(image), cmap="gray")
        ax.set_xticks([]), ax.set_yticks([])
    else:  # [W, C]: a 1-D signal
        ax.plot(image[:, 0])
        ax.set_yticks([])
    ax.set_title("input", fontsize=8)
    ax = fig.add_subplot(grid[0, 1:])
    p = np.asarray(probabilities)
    if p.ndim == 1:
        order = np.argsort(-p, kind="stable")
        ax.bar(range(len(p)), p, color=["C1" if k == order[0] else "C0" for k in range(len(p))])
        ax.set_xticks(range(len(p)), [str(n) for n in class_names], fontsize=6, rotation=45 if len(p) > 10 else 0)
        ax.set_ylim(0, 1)
        ax.set_title(f"predicted: {class_names[order[0]]} ({p[order[0]]:.3f})", fontsize=8)
    else:  # per pixel: the predicted class of every position, named in the legend
        ax.remove()
        ax = fig.add_subplot(grid[0, 1])
        predicted = p.argmax(-1)
        colours = plt.cm.tab20(np.arange(len(class_names)) % 20)
        ax.imshow(colours[predicted], interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title("predicted per pixel", fontsize=8)
        present = [k for k in range(len(class_names)) if (predicted == k).any()]
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in present],
                  labels=[f"{class_names[k]} ({(predicted == k).mean():.0%})" for k in present], fontsize=6,
                  loc="upper left", bbox_to_anchor=(1.05, 1.0), frameon=False)
    for r, (name, layer, m) in enumerate(maps, start=1):
        label = fig.add_subplot(grid[r, 0])
        label.axis("off")
        label.text(0, 0.5, "\n".join(textwrap.wrap(name, 30, break_on_hyphens=False) or [name])
                   + f"\n{type(layer).__name__} {tuple(m.shape)}", fontsize=6, va="center")
        for c in range(min(cols, m.shape[-1])):
            ax = fig.add_subplot(grid[r, 1 + c])
            ax.set_xticks([]), ax.set_yticks([])
            if m.ndim == 3:
                ax.imshow(m[..., c], cmap="viridis", interpolation="nearest")
            elif m.ndim == 2:
                ax.plot(m[:, c], lw=0.8)
            else:
                ax.imshow(m[m.shape[0] // 2, ..., c], cmap="viridis")
    fig.suptitle(title, fontsize=9, y=1 - 0.15 / height)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_receptive_fields(table, path: str) -> None:
    """A :func:`jaxconv.shapes.summary` (depth 0) as pictures: on 2-D inputs, each layer's receptive field as a
    square centred on the input; and the receptive field's size after every layer against the input's."""
    plt = _plt()
    shape = table.input_shape
    rows = [(i, r) for i, r in enumerate(table.rows) if r.depth == 0]
    sized = [(i, r) for i, r in rows if r.receptive_field is not None]
    two_d = len(shape) == 3
    fig, axes = plt.subplots(1, 2 if two_d else 1, figsize=(11 if two_d else 6, 4.6), squeeze=False)
    ax = axes[0, -1]
    ax.step([i for i, _ in sized], [r.receptive_field[0] for _, r in sized], where="post", marker="o")
    ax.axhline(shape[0], color="C3", ls="--", lw=1, label=f"input size {shape[0]}")
    ax.set_xticks([i for i, _ in rows], [f"{i}: {r.layer}" for i, r in rows], rotation=60, fontsize=6, ha="right")
    ax.set_ylabel("receptive field (input pixels, axis 0)")
    ax.set_title("receptive field after each layer", fontsize=9)
    ax.legend(fontsize=7)
    if two_d:
        ax = axes[0, 0]
        h, w = shape[0], shape[1]
        biggest = max([r.receptive_field[0] for _, r in sized] + [h])
        ax.add_patch(plt.Rectangle((-w / 2, -h / 2), w, h, color="0.85", label=f"input {h}x{w}"))
        steps = sorted({r.receptive_field for _, r in sized})
        colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(steps), 1)))
        for colour, field in zip(colours, steps):
            first, layer = next((i, r.layer) for i, r in sized if r.receptive_field == field)
            ax.add_patch(plt.Rectangle((-field[1] / 2, -field[0] / 2), field[1], field[0], fill=False, lw=1.2,
                                       color=colour, label=f"from layer {first} ({layer}): {field[0]}x{field[1]}"))
        ax.set_xlim(-biggest / 2 - 1, biggest / 2 + 1), ax.set_ylim(-biggest / 2 - 1, biggest / 2 + 1)
        ax.set_aspect("equal")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title("what one output position sees, centred on the input", fontsize=9)
    fig.suptitle(f"{table.name}: input {tuple(shape)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
