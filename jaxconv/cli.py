"""The ``jaxconv`` command: train, eval, summary, gradcheck.

Bad flags get one line on stderr and exit status 2; a failed gradient check exits 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

EPILOG = "Bare `jaxconv train` trains mnist1d_cnn on MNIST-1D (generated locally, no download)."


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, exit 2 (argparse's default adds the whole usage)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from jaxconv.data import DATASETS, SOURCES
    from jaxconv.models import MODELS

    parser = _Parser(prog="jaxconv", description="Convolutional networks on JAX/Flax.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a registered model", epilog=EPILOG)
    train.add_argument("--dataset", default="mnist1d", choices=list(DATASETS))
    train.add_argument("--model", choices=list(MODELS), help="default: the dataset's recipe")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--optimizer", choices=["sgd", "nesterov", "adam", "adamw"])
    train.add_argument("--lr", type=float)
    train.add_argument("--schedule", choices=["constant", "cosine", "onecycle"])
    train.add_argument("--warmup-epochs", type=float)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--label-smoothing", type=float)
    train.add_argument("--crop", type=int, help="random-crop padding in pixels (0 turns it off)")
    train.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None)
    train.add_argument("--grad", choices=["auto", "manual"], default="auto",
                       help="manual: every layer's backward is the hand-written one")
    train.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--data-dir")
    train.add_argument("--source", choices=list(SOURCES), default="auto")
    train.add_argument("--out", help="run folder (default runs/DATASET_MODEL_sSEED)")
    train.add_argument("--eval-batch-size", type=_positive_int, default=1000)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --out (removed only after the new run is validated)")

    ev = sub.add_parser("eval", help="evaluate the last checkpoint of a run on its test set")
    ev.add_argument("--out", required=True, help="the run folder")
    ev.add_argument("--data-dir")

    summ = sub.add_parser("summary", help="print a model's layer table")
    summ.add_argument("--model", required=True, choices=list(MODELS))
    summ.add_argument("--dataset", choices=list(DATASETS), help="build the model for this dataset's input shape")
    summ.add_argument("--depth", type=int, help="nesting levels to show (0: the model's own layers; default: all)")

    gc = sub.add_parser("gradcheck", help="manual vs autodiff vs finite-difference gradients, per layer")
    gc.add_argument("--model", required=True, choices=list(MODELS))
    gc.add_argument("--batch-size", type=_positive_int, default=8)
    gc.add_argument("--timing-batch", type=_positive_int, default=128)
    return parser


def _train(args) -> int:
    from jaxconv.train import TrainConfig, TrainingDiverged, fit, resolve

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    if args.resume:
        path = os.path.join(args.out or resolve(TrainConfig(**given)).out, "config.json")
        if not os.path.exists(path):
            raise ValueError(f"--resume: no run to resume at {os.path.dirname(path)}")
        with open(path) as f:
            stored = json.load(f)
        # The stored run wins, except for flags given now with a value other than their default
        # (e.g. more --epochs).
        defaults = vars(build_parser().parse_args(["train"]))
        explicit = {k: v for k, v in given.items() if v is not None and v != defaults.get(k)}
        config = TrainConfig(**{**stored, **explicit})
    else:
        config = TrainConfig(**given)
    try:
        fit(config, resume=args.resume, overwrite=args.overwrite)
    except TrainingDiverged as err:
        print(f"jaxconv train: {err}", file=sys.stderr)
        return 1
    return 0


def _eval(args) -> int:
    from jaxconv.data import DATASETS, load_dataset
    from jaxconv.train import (TrainConfig, _checkpointer, confusion_matrix, evaluate, format_matrix, init_state,
                               make_steps, restore_checkpoint)
    import jax

    path = os.path.join(args.out, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"eval: {args.out} holds no run (no config.json)")
    with open(path) as f:
        config = TrainConfig(**json.load(f))
    data = load_dataset(config.dataset, data_dir=args.data_dir or config.data_dir, source=config.source)
    info = DATASETS[config.dataset]
    state, g_train, g_eval, tx = init_state(config, data.train.images.shape[1:], info.num_classes, 1)
    manager = _checkpointer(args.out)
    state, epoch = restore_checkpoint(manager, state)
    if epoch == 0:
        raise ValueError(f"eval: {args.out} has no checkpoint yet")
    _, eval_step = make_steps(g_train, g_eval, tx, config, info)
    loss, acc, preds = evaluate(eval_step, state, jax.device_put(data.test.images), jax.device_put(data.test.labels),
                                config.eval_batch_size)
    print(f"{config.model} on {config.dataset}, checkpoint of epoch {epoch}: test loss {loss:.4f} accuracy {acc:.4f}")
    print(format_matrix(confusion_matrix(data.test.labels, preds, info.num_classes)))
    return 0


def _summary(args) -> int:
    from jaxconv.data import DATASETS
    from jaxconv.models import create_model
    from jaxconv.shapes import summary

    shape = DATASETS[args.dataset].input_shape if args.dataset else None
    print(summary(create_model(args.model, input_shape=shape), depth=args.depth))
    return 0


def _gradcheck(args) -> int:
    import jax
    jax.config.update("jax_enable_x64", True)
    from jaxconv.gradcheck import TOLERANCE, model_report, step_time_ratio

    rows = model_report(args.model, batch=args.batch_size)
    fd_tolerance = 1e-5
    print(f"gradcheck {args.model}: manual backprop vs jax.grad vs central finite difference (random direction)")
    width = max(len("parameter"), *(len(r[1]) for r in rows))
    print(f"{'dtype':8s} {'parameter':{width}s} {'max abs err':>12s} {'rel err vs auto':>16s} {'rel err vs FD':>14s}")
    failed = False
    for dtype, path, abs_err, rel, fd in rows:
        bad = rel > TOLERANCE[dtype] or (fd == fd and fd > fd_tolerance)
        failed |= bad
        fd_text = "-" if fd != fd else f"{fd:.2e}"
        print(f"{dtype:8s} {path:{width}s} {abs_err:12.2e} {rel:16.2e} {fd_text:>14s}{'  FAIL' if bad else ''}")
    jax.config.update("jax_enable_x64", False)
    manual_s, auto_s = step_time_ratio(args.model, batch=args.timing_batch)
    print(f"train step (float32, batch {args.timing_batch}, {jax.devices()[0].platform}): manual {manual_s * 1e3:.2f} ms, "
          f"auto {auto_s * 1e3:.2f} ms, manual/auto = {manual_s / auto_s:.3f}")
    print(f"tolerances: float64 {TOLERANCE['float64']:.0e}, float32 {TOLERANCE['float32']:.0e}, "
          f"finite difference {fd_tolerance:.0e}: {'FAILED' if failed else 'all within'}")
    return 1 if failed else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxconv.data import DataError
    try:
        return {"train": _train, "eval": _eval, "summary": _summary, "gradcheck": _gradcheck}[args.command](args)
    except (ValueError, DataError) as err:
        print(f"jaxconv {args.command}: error: {err}", file=sys.stderr)
        return 2
