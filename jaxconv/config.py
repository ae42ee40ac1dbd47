"""A training run's configuration: the fields, the recipes that fill them, and the checks on them.

``resolve(config)`` fills every unset field from the dataset's recipe (and the model's, where it has
one) and checks every value; a ``ValueError`` names the flag. ``check_resume(stored, config)`` says
whether a run may continue under ``config``: only the fields in ``RESUMABLE`` may differ.
"""
from __future__ import annotations

import dataclasses
import os
from jaxconv.data import DATASETS
from jaxconv.models import MODELS


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
    val_split: float = 0.0                # share of the training set held out for per-epoch validation
    test_every_epoch: bool = False        # with a validation split: evaluate the test set every epoch too
    checkpoint_every: int = 0             # steps between mid-epoch checkpoints (0: at epoch ends only)
    steps_per_dispatch: int | None = None  # training steps per compiled program (a lax.scan when > 1); None:
                                           # per platform (jaxconv.compiler.steps_per_dispatch)
    devices: str | int = "all"            # devices per process the global batch is split across: N or "all"
    seeds: int = 1                        # replicas trained together (seeds seed..seed+seeds-1), one program


# The recipe fields: what a recipe file (``configs/<name>.py``) fills, and what `--dataset` alone implies.
RECIPE_FIELDS = ("model", "epochs", "batch_size", "optimizer", "lr", "schedule", "warmup_epochs", "weight_decay",
                 "label_smoothing", "crop", "flip")


def recipes() -> dict[str, TrainConfig]:
    """Every recipe file in ``configs/`` (the package ``jaxconv.configs`` once installed), by name."""
    import importlib
    import pkgutil

    import jaxconv.configs as package
    found = {}
    for module in pkgutil.iter_modules(package.__path__):
        config = importlib.import_module(f"{package.__name__}.{module.name}").get_config()
        if not isinstance(config, TrainConfig):
            raise TypeError(f"configs/{module.name}.py: get_config() must return a TrainConfig, "
                            f"got {type(config).__name__}")
        found[module.name] = config
    return found


def recipe_for(dataset: str, model: str | None) -> TrainConfig:
    """The recipe file for this dataset and model if there is one, else ``configs/<dataset>.py`` (its model
    replaced by ``model`` when one is given)."""
    known = recipes()
    default = known[dataset]
    model = model or default.model
    matches = [c for c in known.values() if (c.dataset, c.model) == (dataset, model)]
    return matches[0] if matches else dataclasses.replace(default, model=model)


def load_config_file(path: str) -> TrainConfig:
    """``get_config()`` of a config file given by path, or of a bundled recipe given by name."""
    import importlib.util

    known = recipes()
    if not os.path.exists(path) and path in known:
        return known[path]
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file (bundled recipes: {', '.join(sorted(known))})")
    spec = importlib.util.spec_from_file_location("jaxconv_user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's file: say which and why, in one line
        raise ValueError(f"--config {path}: {type(err).__name__}: {err}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"--config {path}: the file defines no get_config()")
    config = module.get_config()
    if not isinstance(config, TrainConfig):
        raise ValueError(f"--config {path}: get_config() must return a jaxconv.config.TrainConfig, "
                         f"got {type(config).__name__}")
    return config


OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "onecycle")
DTYPES = ("float32", "bfloat16", "float64")  # float64 needs jax_enable_x64
# Fields a resumed run may change: where things are, how long it runs, how it evaluates and checkpoints.
# (More --epochs stretches a cosine or one-cycle schedule from the step where the run stopped.)
# Checkpoints hold no device layout: a run may continue on another number of devices or processes.
# Steps per dispatch change how steps are grouped into programs, not what they compute.
RESUMABLE = ("epochs", "out", "data_dir", "eval_batch_size", "checkpoint_every", "steps_per_dispatch", "devices")


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill unset fields from the dataset's recipe and check every value; ``ValueError`` names the flag."""
    if config.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {config.dataset!r}; choose from {', '.join(DATASETS)}")
    recipe = recipe_for(config.dataset, config.model)
    filled = dataclasses.replace(config, **{k: getattr(recipe, k) for k in RECIPE_FIELDS if getattr(config, k) is None})
    checks = [
        (filled.model in MODELS, f"unknown model {filled.model!r}; choose from {', '.join(MODELS)}"),
        (filled.epochs >= 0, f"--epochs must be >= 0, got {filled.epochs}"),
        (filled.batch_size >= 1, f"--batch-size must be >= 1, got {filled.batch_size}"),
        (filled.optimizer in OPTIMIZERS, f"unknown optimizer {filled.optimizer!r}; choose from {', '.join(OPTIMIZERS)}"),
        (filled.lr > 0, f"--lr must be > 0, got {filled.lr}"),
        (filled.schedule in SCHEDULES, f"unknown schedule {filled.schedule!r}; choose from {', '.join(SCHEDULES)}"),
        (filled.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {filled.warmup_epochs}"),
        (filled.warmup_epochs == 0 or filled.warmup_epochs < filled.epochs,
         f"--warmup-epochs {filled.warmup_epochs} is not shorter than the run ({filled.epochs} epochs)"),
        (filled.warmup_epochs == 0 or filled.schedule != "constant",
         "--warmup-epochs needs --schedule cosine or onecycle (the constant schedule has no warm-up)"),
        (filled.weight_decay >= 0, f"--weight-decay must be >= 0, got {filled.weight_decay}"),
        (0 <= filled.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {filled.label_smoothing}"),
        (filled.crop >= 0, f"--crop must be >= 0, got {filled.crop}"),
        (filled.grad in ("auto", "manual"), f"--grad must be auto or manual, got {filled.grad!r}"),
        (filled.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {filled.dtype!r}"),
        (filled.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {filled.eval_batch_size}"),
        (0 <= filled.val_split < 1, f"--val-split must be in [0, 1), got {filled.val_split}"),
        (filled.devices == "all" or (str(filled.devices).isdigit() and int(filled.devices) >= 1),
         f"--devices must be a count >= 1 or 'all', got {filled.devices!r}"),
        (filled.seeds >= 1, f"--seeds must be >= 1, got {filled.seeds}"),
        (filled.checkpoint_every >= 0, f"--checkpoint-every must be >= 0 steps, got {filled.checkpoint_every}"),
        (filled.steps_per_dispatch is None or filled.steps_per_dispatch >= 1,
         f"--steps-per-dispatch must be >= 1, got {filled.steps_per_dispatch}"),
        (not filled.test_every_epoch or filled.val_split > 0,
         "--test-every-epoch adds the test set to the per-epoch validation; without --val-split the test set "
         "already is what every epoch evaluates"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    info, spec = DATASETS[filled.dataset], MODELS[filled.model]
    if spec.dense != info.per_pixel:
        fitting = [d for d in DATASETS if DATASETS[d].per_pixel == spec.dense]
        raise ValueError(f"{filled.model} predicts {'a class per position' if spec.dense else 'one class per example'} "
                         f"and {filled.dataset} labels {'every pixel' if info.per_pixel else 'whole examples'}; "
                         f"datasets for it: {', '.join(fitting)}")
    if info.per_pixel and (filled.crop or filled.flip):
        raise ValueError(f"--crop and --flip move pixels away from their per-pixel labels; {filled.dataset} takes "
                         f"--crop 0 --no-flip")
    if filled.flip and len(info.input_shape) != 3:
        raise ValueError(f"--flip mirrors images left to right; {filled.dataset}'s examples are "
                         f"{len(info.input_shape) - 1}-D: give --no-flip")
    if filled.devices != "all":
        filled.devices = int(filled.devices)
    if filled.out is None:
        seeds = f"{filled.seed}-{filled.seed + filled.seeds - 1}" if filled.seeds > 1 else filled.seed
        filled.out = os.path.join("runs", f"{filled.dataset}_{filled.model}_s{seeds}")
    return filled


def check_resume(stored: TrainConfig, config: TrainConfig) -> None:
    """``ValueError`` naming the first field outside ``RESUMABLE`` whose value differs (both resolved)."""
    for field in dataclasses.fields(TrainConfig):
        old, new = getattr(stored, field.name), getattr(config, field.name)
        if field.name not in RESUMABLE and old != new:
            raise ValueError(f"--resume: {flag(field.name)} is {new!r} but the run in {config.out} was made with "
                             f"{old!r}; a resumed run keeps its settings (only {', '.join(map(flag, RESUMABLE))} "
                             f"may change) - start a new run in another --out to change it")


def from_dict(stored: dict, where: str) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ValueError(f"{where} has settings this jaxconv does not know ({', '.join(unknown)}): "
                         f"was it written by another version?")
    return TrainConfig(**stored)


def describe(config: TrainConfig) -> str:
    """Every choice that changes results, in one line."""
    aug = [f"crop {config.crop}px"] if config.crop else []
    aug += ["flip"] if config.flip else []
    warm = f", {config.warmup_epochs:g} warm-up epochs" if config.warmup_epochs else ""
    return (f"{config.optimizer} lr {config.lr:g} {config.schedule}{warm}; weight decay {config.weight_decay:g}; "
            f"label smoothing {config.label_smoothing:g}; augmentation {', '.join(aug) or 'none'}; "
            f"grad={config.grad} dtype={config.dtype} "
            + (f"seeds {config.seed}..{config.seed + config.seeds - 1}" if config.seeds > 1 else f"seed {config.seed}"))
