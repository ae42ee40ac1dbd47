"""Training: a pure ``train_step``/``eval_step`` compiled once, the whole dataset on the device.

The state is a pytree (params, model state such as batch statistics, optimizer state, step, key).
Each step gathers its batch from the on-device arrays by index, augments it inside ``jit`` and
applies an Optax update; nothing crosses the host boundary but the indices. Every epoch appends a
JSON line to ``OUT/metrics.jsonl`` and an Orbax checkpoint to ``OUT/checkpoints``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxconv import compiler
from jaxconv import functional as F
from jaxconv.data import DATASETS, Dataset, load_dataset
from jaxconv.models import MODELS, create_model


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainConfig:
    dataset: str = "mnist1d"
    model: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None          # sgd | nesterov | adam | adamw
    lr: float | None = None
    schedule: str | None = None           # constant | cosine | onecycle
    warmup_epochs: float | None = None
    weight_decay: float | None = None
    label_smoothing: float | None = None
    crop: int | None = None               # random-crop padding in pixels (0: off)
    flip: bool | None = None              # random horizontal flip (2-D only)
    grad: str = "auto"                    # auto | manual (hand-written backward)
    dtype: str = "float32"                # compute dtype: float32 | bfloat16
    seed: int = 0
    data_dir: str | None = None
    source: str = "auto"
    out: str | None = None
    eval_batch_size: int = 1000


# Defaults per dataset: `jaxconv train --dataset D` uses these unless a flag says otherwise.
RECIPES: dict[str, dict[str, Any]] = {
    "mnist1d": dict(model="mnist1d_cnn", epochs=120, batch_size=100, optimizer="adam", lr=1e-2, schedule="cosine",
                    warmup_epochs=0, weight_decay=0.0, label_smoothing=0.0, crop=4, flip=False),
    "mnist": dict(model="mnist_cnn", epochs=12, batch_size=64, optimizer="adam", lr=2e-3, schedule="onecycle",
                  warmup_epochs=0, weight_decay=0.0, label_smoothing=0.1, crop=2, flip=False),
    "fashion_mnist": dict(model="seed_cnn", epochs=15, batch_size=128, optimizer="adam", lr=2e-3, schedule="onecycle",
                          warmup_epochs=0, weight_decay=0.0, label_smoothing=0.1, crop=0, flip=True),
    "mnist_seg": dict(model="unet_small", epochs=4, batch_size=64, optimizer="adam", lr=3e-3, schedule="onecycle",
                      warmup_epochs=0, weight_decay=0.0, label_smoothing=0.0, crop=0, flip=False),
    "cifar10": dict(model="convnetjs_cifar", epochs=70, batch_size=128, optimizer="adam", lr=4e-3, schedule="onecycle",
                    warmup_epochs=0, weight_decay=0.0, label_smoothing=0.0, crop=2, flip=True),
}
# Where a model wants a different recipe on a dataset than the dataset's default model.
MODEL_RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("mnist1d", "mnist1d_deep"): dict(epochs=30),
    # He et al. 2016's optimiser (SGD momentum 0.9, weight decay 5e-4 here, batch 128, 4-pixel crops and
    # flips) on a 30-epoch one-cycle schedule instead of 164 epochs of step decay.
    ("cifar10", "resnet20"): dict(epochs=30, optimizer="nesterov", lr=0.1, weight_decay=5e-4, crop=4),
}
OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "onecycle")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}  # float64 needs jax_enable_x64


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill unset fields from the dataset's recipe and check every value; ``ValueError`` names the flag."""
    if config.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {config.dataset!r}; choose from {', '.join(DATASETS)}")
    recipe = dict(RECIPES[config.dataset])
    recipe.update(MODEL_RECIPES.get((config.dataset, config.model or recipe["model"]), {}))
    filled = dataclasses.replace(config, **{k: v for k, v in recipe.items() if getattr(config, k) is None})
    checks = [
        (filled.model in MODELS, f"unknown model {filled.model!r}; choose from {', '.join(MODELS)}"),
        (filled.epochs >= 0, f"--epochs must be >= 0, got {filled.epochs}"),
        (filled.batch_size >= 1, f"--batch-size must be >= 1, got {filled.batch_size}"),
        (filled.optimizer in OPTIMIZERS, f"unknown optimizer {filled.optimizer!r}; choose from {', '.join(OPTIMIZERS)}"),
        (filled.lr > 0, f"--lr must be > 0, got {filled.lr}"),
        (filled.schedule in SCHEDULES, f"unknown schedule {filled.schedule!r}; choose from {', '.join(SCHEDULES)}"),
        (filled.weight_decay >= 0, f"--weight-decay must be >= 0, got {filled.weight_decay}"),
        (0 <= filled.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {filled.label_smoothing}"),
        (filled.crop >= 0, f"--crop must be >= 0, got {filled.crop}"),
        (filled.grad in ("auto", "manual"), f"--grad must be auto or manual, got {filled.grad!r}"),
        (filled.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {filled.dtype!r}"),
        (filled.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {filled.eval_batch_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    per_pixel, dense = DATASETS[filled.dataset].per_pixel, MODELS[filled.model].dense
    if dense != per_pixel:
        fitting = [d for d in DATASETS if DATASETS[d].per_pixel == dense]
        raise ValueError(f"{filled.model} predicts {'a class per position' if dense else 'one class per example'} "
                         f"and {filled.dataset} labels {'every pixel' if per_pixel else 'whole examples'}; "
                         f"datasets for it: {', '.join(fitting)}")
    if per_pixel and (filled.crop or filled.flip):
        raise ValueError(f"--crop and --flip move pixels away from their per-pixel labels; {filled.dataset} takes "
                         f"--crop 0 --no-flip")
    if filled.out is None:
        filled.out = os.path.join("runs", f"{filled.dataset}_{filled.model}_s{filled.seed}")
    return filled


# --------------------------------------------------------------------------- state and optimizer


@flax.struct.dataclass
class TrainState:
    params: Any
    model_state: Any      # everything of the model that is not a Param: batch statistics, dropout RNG
    opt_state: Any
    step: jax.Array
    key: jax.Array        # the run's base key (raw uint32[2]); per-step keys are folded from it


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    total = max(config.epochs * steps_per_epoch, 1)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "constant":
        lr = config.lr
    elif config.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0 if warmup else config.lr, config.lr, warmup, total)
    else:  # one-cycle: up for 25 % of training (or the warm-up given), then cosine down
        lr = optax.cosine_onecycle_schedule(total, config.lr, pct_start=(warmup / total) if warmup else 0.25)
    if config.optimizer in ("sgd", "nesterov"):
        tx = optax.sgd(lr, momentum=0.9, nesterov=config.optimizer == "nesterov")
        return optax.chain(optax.add_decayed_weights(config.weight_decay), tx) if config.weight_decay else tx
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=config.weight_decay)
    tx = optax.adam(lr)
    return optax.chain(optax.add_decayed_weights(config.weight_decay), tx) if config.weight_decay else tx


# --------------------------------------------------------------------------- on-device batches


def normalise(x, mean, std):
    """uint8 pixels -> (x / 255 - mean) / std; float data -> (x - mean) / std (in ``mean``'s dtype)."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        x = x.astype(mean.dtype) / 255.0
    return (x.astype(mean.dtype) - mean) / std


def augment(key, x, *, crop: int, flip: bool):
    """Random crop of every spatial axis after zero padding by ``crop``; random horizontal flip (2-D)."""
    if crop:
        n_sp = x.ndim - 2
        key, sub = jax.random.split(key)
        padded = jnp.pad(x, [(0, 0)] + [(crop, crop)] * n_sp + [(0, 0)])
        offsets = jax.random.randint(sub, (x.shape[0], n_sp), 0, 2 * crop + 1)
        take = lambda img, off: jax.lax.dynamic_slice(img, (*off, 0), x.shape[1:])
        x = jax.vmap(take)(padded, offsets)
    if flip and x.ndim == 4:
        mirror = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
        x = jnp.where(mirror, x[:, :, ::-1], x)
    return x


def make_steps(graphdef_train, graphdef_eval, tx, config: TrainConfig, info):
    real = jnp.float64 if config.dtype == "float64" else jnp.float32
    mean, std = jnp.asarray(info.mean, real), jnp.asarray(info.std, real)

    def train_step(state: TrainState, images, labels, order, i):
        idx = jax.lax.dynamic_index_in_dim(order, i, keepdims=False)
        x, y = normalise(images[idx], mean, std), labels[idx]
        x = augment(jax.random.fold_in(state.key, state.step), x, crop=config.crop, flip=config.flip)

        def loss_fn(params):
            model = nnx.merge(graphdef_train, params, state.model_state, copy=True)
            logits = model(x).astype(real)
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(params=optax.apply_updates(state.params, updates), model_state=model_state,
                            opt_state=opt_state, step=state.step + 1)
        return new, {"loss": loss, "correct": jnp.sum(jnp.argmax(logits, -1) == y) / math.prod(y.shape[1:])}

    def eval_step(state: TrainState, images, labels, idx, mask):
        model = nnx.merge(graphdef_eval, state.params, state.model_state)
        logits = model(normalise(images[idx], mean, std)).astype(real)
        y = labels[idx]
        mask_y = mask.reshape(mask.shape + (1,) * (y.ndim - 1))  # per-position labels: mask every position
        positions = math.prod(y.shape[1:])
        losses = F.cross_entropy(logits, y, reduction="none")
        pred = jnp.argmax(logits, -1)
        return jnp.sum(losses * mask_y) / positions, jnp.sum((pred == y) * mask_y) / positions, pred

    return compiler.jit(train_step, donate_argnums=0), compiler.jit(eval_step)


def evaluate(eval_step, state, images, labels, batch_size: int):
    """Loss, accuracy and predictions over every example: the last batch is padded and masked."""
    n = int(labels.shape[0])
    batch_size = min(batch_size, n)
    steps = math.ceil(n / batch_size)
    idx = np.zeros(steps * batch_size, np.int32)
    idx[:n] = np.arange(n)
    mask = np.zeros(steps * batch_size, np.float32)
    mask[:n] = 1
    idx, mask = jnp.asarray(idx.reshape(steps, batch_size)), jnp.asarray(mask.reshape(steps, batch_size))
    loss_sum, correct, preds = 0.0, 0, []
    for s in range(steps):
        l, c, p = eval_step(state, images, labels, idx[s], mask[s])
        loss_sum, correct = loss_sum + l, correct + c
        preds.append(p)
    preds = np.asarray(jnp.concatenate(preds))[:n]
    return float(loss_sum) / n, float(correct) / n, preds


def confusion_matrix(labels, preds, num_classes: int):
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (np.asarray(labels), np.asarray(preds)), 1)
    return m


# --------------------------------------------------------------------------- checkpoints


def _checkpointer(out: str):
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(os.path.abspath(os.path.join(out, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False))


def _as_tree(state: TrainState):
    # Orbax wants string keys; the state's own structure is rebuilt from the live state's treedef.
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}


def save_checkpoint(manager, epoch: int, state: TrainState):
    import orbax.checkpoint as ocp
    manager.save(epoch, args=ocp.args.StandardSave(_as_tree(state)))
    manager.wait_until_finished()


def restore_checkpoint(manager, template: TrainState):
    import orbax.checkpoint as ocp
    epoch = manager.latest_step()
    if epoch is None:
        return None, 0
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _as_tree(template))
    try:
        tree = manager.restore(epoch, args=ocp.args.StandardRestore(target))
    except ValueError as err:
        raise ValueError(f"the checkpoint of epoch {epoch} in {manager.directory} does not match this run's model and "
                         f"optimizer (were --model, --optimizer or --dtype changed?): {str(err).splitlines()[0]}") from err
    leaves = [jnp.asarray(tree[k]) for k in sorted(tree)]
    return jax.tree.unflatten(jax.tree.structure(template), leaves), epoch


# --------------------------------------------------------------------------- the loop


class _Progress:
    """A one-line progress bar on a terminal; silent otherwise (plain epoch lines are printed anyway)."""

    def __init__(self, stream):
        self.stream, self.live, self.last = stream, stream.isatty(), 0.0

    def update(self, epoch, epochs, step, steps):
        now = time.perf_counter()
        if self.live and (now - self.last > 0.2 or step == steps):
            filled = int(30 * step / steps)
            self.stream.write(f"\repoch {epoch}/{epochs} [{'#' * filled}{'.' * (30 - filled)}] {step}/{steps}")
            self.stream.flush()
            self.last = now

    def clear(self):
        if self.live:
            self.stream.write("\r" + " " * 70 + "\r")


def init_state(config: TrainConfig, input_shape, num_classes: int, steps_per_epoch: int):
    wide = config.dtype == "float64"  # parameters in float64 too, for gradient comparisons
    model = create_model(config.model, input_shape=input_shape, num_classes=num_classes, grad=config.grad,
                         dtype=DTYPES[config.dtype] if config.dtype == "bfloat16" else None,
                         param_dtype=jnp.float64 if wide else jnp.float32, seed=config.seed)
    model.train()
    graphdef_train, params, model_state = nnx.split(model, nnx.Param, ...)
    model.eval()
    graphdef_eval = nnx.graphdef(model)
    tx = make_optimizer(config, steps_per_epoch)
    state = TrainState(params, model_state, tx.init(params), jnp.zeros((), jnp.int32),
                       jax.random.PRNGKey(config.seed))
    return state, graphdef_train, graphdef_eval, tx


RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "curves.png")


def write_atomically(path: str, text: str):
    """Write ``text`` to ``path`` through a temporary file and a rename: a kill leaves the old or the new."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def fit(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, dataset: Dataset | None = None,
        log=print):
    """Train ``config`` (see :class:`TrainConfig`); returns the list of per-epoch metric dicts.

    A folder that already holds a run is never touched unless asked: ``resume`` continues it;
    ``overwrite`` replaces it, and only once the new run's config, data and model have been built.
    """
    config = resolve(config)
    out = config.out
    config_path = os.path.join(out, "config.json")
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if resume and not os.path.exists(config_path):
        raise ValueError(f"--resume: {out} holds no run to resume (no config.json)")
    if existing and not resume and not overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                         f"or --overwrite to replace it")

    data = dataset or load_dataset(config.dataset, data_dir=config.data_dir, source=config.source)
    info = DATASETS[config.dataset]
    n_train = len(data.train)
    batch = min(config.batch_size, n_train)
    steps = n_train // batch  # the last partial batch is dropped: one compiled shape
    state, graphdef_train, graphdef_eval, tx = init_state(config, data.train.images.shape[1:], info.num_classes, steps)
    if overwrite:  # everything above is validated: now the old run may go
        for name in existing:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)
    write_atomically(config_path, json.dumps(dataclasses.asdict(config), indent=1))
    train_step, eval_step = make_steps(graphdef_train, graphdef_eval, tx, config, info)
    train_x, train_y = jax.device_put(data.train.images), jax.device_put(data.train.labels)
    test_x, test_y = jax.device_put(data.test.images), jax.device_put(data.test.labels)

    manager = _checkpointer(out)
    metrics_path = os.path.join(out, "metrics.jsonl")
    history, start_epoch = [], 0
    if resume:
        state, start_epoch = restore_checkpoint(manager, state)
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                history = [json.loads(line) for line in f if line.strip()][:start_epoch]
        log(f"resuming {out} after epoch {start_epoch}")
    with open(metrics_path, "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)

    log(f"{config.dataset} ({data.source}): {n_train} train / {len(data.test)} test; model {config.model}; "
        f"{config.epochs} epochs x {steps} steps of {batch}; {config.optimizer} lr {config.lr} {config.schedule}; "
        f"grad={config.grad} dtype={config.dtype} on {jax.devices()[0].platform}")
    progress = _Progress(sys.stderr)
    wall_start = time.perf_counter() - (history[-1]["wall_s"] if history else 0.0)
    preds = None
    for epoch in range(start_epoch, config.epochs):
        order = jax.random.permutation(jax.random.fold_in(state.key, epoch), n_train)[: steps * batch]
        order = order.reshape(steps, batch)
        t0 = time.perf_counter()
        losses, correct = [], []
        for i in range(steps):
            state, m = train_step(state, train_x, train_y, order, i)
            losses.append(m["loss"])
            correct.append(m["correct"])
            progress.update(epoch + 1, config.epochs, i + 1, steps)
        losses = np.asarray(jnp.stack(losses))
        train_time = time.perf_counter() - t0
        progress.clear()
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            step = epoch * steps + int(bad[0]) + 1
            last = manager.latest_step()
            raise TrainingDiverged(
                f"loss became {losses[bad[0]]} at step {step} (epoch {epoch + 1}); training stopped. "
                + (f"The last good checkpoint is epoch {last} in {os.path.join(out, 'checkpoints')}."
                   if last is not None else "No checkpoint was written yet."))
        test_loss, test_acc, preds = evaluate(eval_step, state, test_x, test_y, config.eval_batch_size)
        record = dict(epoch=epoch + 1, step=int(state.step), train_loss=float(losses.mean()),
                      train_accuracy=float(np.sum(np.asarray(correct))) / (steps * batch), test_loss=test_loss,
                      test_accuracy=test_acc, images_per_s=steps * batch / train_time,
                      wall_s=time.perf_counter() - wall_start)
        history.append(record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        save_checkpoint(manager, epoch + 1, state)
        log(f"epoch {epoch + 1:3d}/{config.epochs}  train loss {record['train_loss']:.4f} acc "
            f"{record['train_accuracy']:.4f}  test loss {test_loss:.4f} acc {test_acc:.4f}  "
            f"{record['images_per_s']:,.0f} img/s  {record['wall_s']:.1f}s")
    if history:
        if preds is None:
            _, _, preds = evaluate(eval_step, state, test_x, test_y, config.eval_batch_size)
        matrix = confusion_matrix(data.test.labels, preds, info.num_classes)
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"confusion_matrix": matrix.tolist()}) + "\n")
        log("test confusion matrix (rows: true class, columns: predicted):\n" + format_matrix(matrix))
        plot_curves(history, os.path.join(out, "curves.png"), title=f"{config.model} on {config.dataset}")
        log(f"final test accuracy {history[-1]['test_accuracy']:.4f}; metrics, curves.png and checkpoints in {out}")
    manager.close()
    return history


def format_matrix(matrix) -> str:
    width = max(len(str(int(matrix.max()))), 3)
    head = "     " + " ".join(f"{j:>{width}d}" for j in range(matrix.shape[1]))
    return "\n".join([head] + [f"{i:>3d}: " + " ".join(f"{v:>{width}d}" for v in row) for i, row in enumerate(matrix)])


def plot_curves(history, path: str, *, title: str = ""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], label="train")
    ax_acc.plot(epochs, [h["test_accuracy"] for h in history], label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
