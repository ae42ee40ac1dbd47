"""The ``jaxconv`` command: train, eval, predict, summary, gradcheck, bench, visualize.

Every failure a user can cause gets one line on stderr: bad flags and inputs exit 2; a run that diverged,
ran out of memory or could not write exits 1; a run stopped by a signal exits 128 + its number after its
checkpoint; a failed gradient check exits 1.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys

import numpy as np

EPILOG = "Bare `jaxconv train` trains mnist1d_cnn on MNIST-1D (generated locally, no download)."


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, exit 2 (argparse's default adds the whole usage)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _recipes_text() -> str:
    """Every recipe file and the values it sets: for `train --help`."""
    from jaxconv.config import RECIPE_FIELDS, recipes
    lines = ["recipes (configs/NAME.py; --dataset D uses D's, or D_MODEL's with --model; --config NAME or a path "
             "starts from one; any flag overrides):"]
    for name, config in sorted(recipes().items()):
        lines.append(f"  {name}: dataset={config.dataset}, " + ", ".join(
            f"{k}={getattr(config, k)}" for k in RECIPE_FIELDS))
    return "\n".join(lines)


COMMANDS = {
    "train": "train a registered model",
    "eval": "evaluate a run's checkpoint on its test set",
    "predict": "classify image files (PNG, JPEG, .npy) with a trained run",
    "summary": "print a model's layer table",
    "bench": "time training or inference steps: compile, step, img/s, FLOPs, MFU, memory",
    "gradcheck": "manual vs autodiff vs finite-difference gradients, per layer",
    "visualize": "draw a trained run's first-layer filters and its feature maps for one input (PNG)",
}


def _top_parser() -> argparse.ArgumentParser:
    """`jaxconv`, `jaxconv --help`: the commands, with nothing imported that starts JAX."""
    parser = _Parser(prog="jaxconv", description="Convolutional networks on JAX/Flax.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version="jaxconv 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from jaxconv.config import RESUMABLE, flag
    from jaxconv.data import DATASETS, SOURCES
    from jaxconv.models import MODELS

    parser = _Parser(prog="jaxconv", description="Convolutional networks on JAX/Flax.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    # Only the flags given appear in the namespace: TrainConfig and the recipes supply the rest, and a
    # resumed run can tell a flag given on purpose from a default.
    train = sub.add_parser("train", help=COMMANDS["train"], argument_default=argparse.SUPPRESS,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"{EPILOG}\n\n{_recipes_text()}\n\nWith --resume, only "
                                  f"{', '.join(map(flag, RESUMABLE))} may differ from the run's config.json (more "
                                  f"--epochs stretches a cosine or one-cycle schedule from where the run stopped).\n"
                                  f"SIGINT or SIGTERM stops a run after a checkpoint.")
    train.add_argument("--config", metavar="FILE|NAME",
                       help="start from a config file's get_config() (configs/NAME.py, or NAME for a bundled "
                            "recipe); the flags given override it")
    train.add_argument("--dataset", choices=list(DATASETS), help="default: mnist1d")
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
    train.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips (images)")
    train.add_argument("--grad", choices=["auto", "manual"],
                       help="manual: every layer's backward is the hand-written one (default auto)")
    train.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default float32)")
    train.add_argument("--seed", type=int, help="default 0")
    train.add_argument("--data-dir")
    train.add_argument("--source", choices=list(SOURCES), help="default auto")
    train.add_argument("--out", help="run folder (default runs/DATASET_MODEL_sSEED)")
    train.add_argument("--eval-batch-size", type=_positive_int, help="default 1000")
    train.add_argument("--val-split", type=float, metavar="FRACTION",
                       help="hold this share of the training set out (drawn by --seed) for per-epoch validation "
                            "and the best checkpoint; the test set is then evaluated at the end")
    train.add_argument("--test-every-epoch", action="store_true",
                       help="with --val-split: evaluate the test set every epoch too")
    train.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                       help="also checkpoint every STEPS training steps (default: at epoch ends only)")
    train.add_argument("--steps-per-dispatch", type=int, metavar="N",
                       help="run N training steps per compiled program (one lax.scan), so Python dispatches once "
                            "per N steps; results equal N=1 up to rounding. Default: 1 on a CPU (XLA:CPU ran "
                            "scanned steps slower), 32 on a GPU or TPU (an H200 ran an epoch 3.1x faster on "
                            "MNIST-1D and 4.5x on MNIST/LeNet-5; benchmarks/scan_vs_step.py measures it). "
                            "Checks for SIGINT/SIGTERM and --checkpoint-every happen between dispatches")
    train.add_argument("--devices", metavar="N|all",
                       help="split each global batch across N devices of every process (default: all of them); "
                            "--batch-size stays the global batch and must divide by the device count")
    train.add_argument("--seeds", type=_positive_int, metavar="K",
                       help="train K runs (seeds --seed .. --seed+K-1) together as one program; each keeps its "
                            "own folder OUT/seed_S, their mean and spread go to OUT/seeds.jsonl")
    dist = train.add_argument_group(
        "many hosts", "jax.distributed: start one process per host (or per GPU), each with the same flags but its "
                      "own --process-id; the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                      "JAX_PROCESS_ID stand in for the flags")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    dist.add_argument("--num-processes", type=_positive_int, metavar="N")
    dist.add_argument("--process-id", type=int, metavar="I", help="0 .. N-1; process 0 writes the run's files")
    train.add_argument("--resume", action="store_true", default=False,
                       help="continue the run in --out from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", default=False,
                       help="replace the run already in --out (removed only after the new run is validated)")

    ev = sub.add_parser("eval", help=COMMANDS["eval"])
    ev.add_argument("--out", required=True, help="the run folder")
    ev.add_argument("--data-dir")
    ev.add_argument("--which", choices=["auto", "best", "latest"], default="auto",
                    help="auto: the best checkpoint when the run kept one, else the latest")

    pr = sub.add_parser("predict", help=COMMANDS["predict"])
    pr.add_argument("--out", required=True, help="the run folder")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--top", type=_positive_int, default=3, help="classes shown per image (default 3)")
    pr.add_argument("--which", choices=["auto", "best", "latest"], default="auto")

    summ = sub.add_parser("summary", help=COMMANDS["summary"])
    summ.add_argument("--model", required=True, choices=list(MODELS))
    summ.add_argument("--dataset", choices=list(DATASETS), help="build the model for this dataset's input shape")
    summ.add_argument("--depth", type=int, help="nesting levels to show (0: the model's own layers; default: all)")
    summ.add_argument("--plot", metavar="FILE", help="also draw the receptive field after every layer (PNG)")

    vis = sub.add_parser("visualize", help=COMMANDS["visualize"],
                         description="Writes RUN/pictures/filters.png and RUN/pictures/feature_maps_NAME.png (the "
                                     "input, its predicted class probabilities, every conv layer's output channels).")
    vis.add_argument("--out", required=True, help="the run folder")
    what = vis.add_mutually_exclusive_group()
    what.add_argument("--image", metavar="FILE", help="a PNG, JPEG or .npy input")
    what.add_argument("--index", type=int, default=0, help="the test set example to show (default 0)")
    vis.add_argument("--data-dir", help="where the run's dataset is (default: the run's --data-dir)")
    vis.add_argument("--which", choices=["auto", "best", "latest"], default="auto")
    vis.add_argument("--channels", type=_positive_int, default=16, help="feature maps drawn per layer (default 16)")

    bench = sub.add_parser("bench", help=COMMANDS["bench"],
                           description="Every combination of the comma-separated lists is measured; see "
                                       "jaxconv.bench for what each column means.")
    bench.add_argument("--model", required=True, help="M[,M...] or all")
    bench.add_argument("--batch-size", default="128", metavar="B[,B...]", help="global batch sizes (default 128)")
    bench.add_argument("--dtype", default="float32", metavar="float32,bfloat16")
    bench.add_argument("--grad", default="auto", metavar="auto,manual")
    bench.add_argument("--devices", default="1", metavar="N[,N...]|all", help="devices the batch is split across")
    bench.add_argument("--mode", default="train", metavar="train,inference")
    bench.add_argument("--compare", metavar="torch,flax", default="",
                       help="also time the PyTorch twin (best of NCHW, channels_last) and/or the plain Flax NNX "
                            "program of the same model (nnx.jit, nnx.Optimizer; one device)")
    bench.add_argument("--steps", type=_positive_int, default=20, help="timed steps per configuration (default 20)")
    bench.add_argument("--json", metavar="FILE", help="JSON lines: every field and the environment")
    bench.add_argument("--csv", metavar="FILE")
    bench.add_argument("--plot", metavar="FILE", help="PNG: throughput vs batch; scaling vs devices")

    gc = sub.add_parser("gradcheck", help=COMMANDS["gradcheck"])
    gc.add_argument("--model", required=True, choices=list(MODELS))
    gc.add_argument("--batch-size", type=_positive_int, default=8)
    gc.add_argument("--timing-batch", type=_positive_int, default=128)
    return parser


def _join_processes(args) -> None:
    """``jax.distributed.initialize`` from the flags or the environment, before anything else touches JAX."""
    env = os.environ
    coordinator = getattr(args, "coordinator", None) or env.get("JAX_COORDINATOR_ADDRESS")
    count = getattr(args, "num_processes", None) or env.get("JAX_NUM_PROCESSES")
    me = getattr(args, "process_id", None)
    me = env.get("JAX_PROCESS_ID") if me is None else me
    given = [name for name, value in (("--coordinator", coordinator), ("--num-processes", count),
                                      ("--process-id", me)) if value is not None]
    if not given:
        return
    if len(given) < 3:
        missing = sorted({"--coordinator", "--num-processes", "--process-id"} - set(given))
        raise ValueError(f"a multi-process run needs --coordinator, --num-processes and --process-id; "
                         f"{', '.join(missing)} missing")
    from jaxconv import parallel
    parallel.initialize(coordinator, int(count), int(me))


def _train(args) -> int:
    from jaxconv import runs
    from jaxconv.config import TrainConfig, load_config_file, resolve

    _join_processes(args)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    if "config" in vars(args):
        if args.resume:
            raise ValueError("--config starts a run; --resume continues one with its own config.json (give only "
                             "the flags that may change)")
        given = {**dataclasses.asdict(load_config_file(args.config)), **given}
    if args.resume:  # the stored run's settings, with the flags given now on top (fit checks they may change)
        out = args.out if "out" in given else resolve(TrainConfig(**given)).out
        runs.claim(out, resume=True, overwrite=args.overwrite)  # "no run to resume" before reading its config
        config = TrainConfig(**{**dataclasses.asdict(runs.load_config(out)), **given, "out": out})
    else:
        config = TrainConfig(**given)
    from jaxconv import parallel
    from jaxconv.train import fit
    fit(config, resume=args.resume, overwrite=args.overwrite)
    parallel.shutdown()
    return 0


def _eval(args) -> int:
    import jax.numpy as jnp
    from jaxconv import functional as F
    from jaxconv.data import DATASETS, load_dataset
    from jaxconv.inference import load
    from jaxconv.steps import confusion_matrix
    from jaxconv.reports import format_matrix

    model = load(args.out, args.which)
    config, info = model.config, DATASETS[model.config.dataset]
    data = load_dataset(config.dataset, data_dir=args.data_dir or config.data_dir, source=config.source)
    logits = model(data.test.images)
    labels = data.test.labels
    loss = float(F.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    preds = logits.argmax(-1)
    print(f"{config.model} on {config.dataset}, {model!r}: test loss {loss:.4f} accuracy "
          f"{float(np.mean(preds == labels)):.4f}")
    print(format_matrix(confusion_matrix(labels, preds, info.num_classes), info.classes))
    return 0


def _predict(args) -> int:
    from jaxconv.data import DATASETS
    from jaxconv.inference import load, read_image

    model = load(args.out, args.which)
    images = [read_image(path, model.input_shape) for path in args.images]
    print(f"{model!r}")
    for path, image in zip(args.images, images):
        if DATASETS[model.config.dataset].per_pixel:
            counts = np.bincount(np.asarray(model(image)).argmax(-1).ravel(), minlength=len(model.class_names))
            shares = ", ".join(f"{model.class_names[c]} {n / counts.sum():.1%}" for c, n in enumerate(counts) if n)
            print(f"{path}: pixels per class: {shares}")
            continue
        batch = model.prepare(image)[0]
        for k, ranked in enumerate(model.top(batch, args.top)):
            where = f"{path}[{k}]" if len(batch) > 1 else path
            print(f"{where}: " + ", ".join(f"{name} {p:.3f}" for name, p in ranked))
    return 0


def _summary(args) -> int:
    from jaxconv.data import DATASETS
    from jaxconv.models import create_model
    from jaxconv.shapes import summary

    shape = DATASETS[args.dataset].input_shape if args.dataset else None
    model = create_model(args.model, input_shape=shape)
    print(summary(model, depth=args.depth))
    if args.plot:
        from jaxconv.pictures import plot_receptive_fields
        plot_receptive_fields(summary(model, depth=0), args.plot)
        print(f"receptive fields drawn in {args.plot}")
    return 0


def _visualize(args) -> int:
    from jaxconv import pictures
    from jaxconv.data import load_dataset
    from jaxconv.inference import load, read_image

    model = load(args.out, args.which)
    config = model.config
    if args.image:
        image, name = read_image(args.image, model.input_shape), os.path.splitext(os.path.basename(args.image))[0]
    else:
        test = load_dataset(config.dataset, data_dir=args.data_dir or config.data_dir, source=config.source).test
        if not 0 <= args.index < len(test):
            raise ValueError(f"--index must be in [0, {len(test) - 1}] for {config.dataset}'s test set, got {args.index}")
        image, name = test.images[args.index], f"test{args.index}"
    batch = model.prepare(image)[0]
    logits, maps = pictures.conv_outputs(model.module, model.normalised(batch))
    shifted = logits[0] - logits[0].max(axis=-1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    folder = os.path.join(args.out, "pictures")
    os.makedirs(folder, exist_ok=True)
    shown = batch[0] / 255.0 if batch.dtype == np.uint8 else batch[0]
    feature_path = os.path.join(folder, f"feature_maps_{name}.png")
    pictures.plot_feature_maps(shown, maps, probabilities, model.class_names, feature_path,
                               title=f"{config.model} on {config.dataset} ({model.checkpoint['which']} checkpoint, "
                                     f"step {model.checkpoint['step']}): {name}", max_channels=args.channels)
    written = [feature_path]
    kernel = pictures.first_conv_kernel(model.module)
    if kernel is not None:
        filters_path = os.path.join(folder, "filters.png")
        pictures.plot_filters(kernel[1], filters_path, title=f"{config.model}: {kernel[0]} filters "
                                                             f"{tuple(kernel[1].shape)}")
        written.append(filters_path)
    if probabilities.ndim == 1:
        best = np.argsort(-probabilities, kind="stable")[:3]
        print(f"{name}: " + ", ".join(f"{model.class_names[k]} {probabilities[k]:.3f}" for k in best))
    print(f"{len(maps)} conv layers drawn; " + ", ".join(written))
    return 0



def _bench(args) -> int:
    import itertools
    from jaxconv import bench
    from jaxconv.models import MODELS

    def listed(text, flag, choices=None, kind=str):
        values = [v.strip() for v in text.split(",") if v.strip()]
        for v in values:
            if choices is not None and v not in choices:
                raise ValueError(f"{flag}: unknown {v!r}; choose from {', '.join(choices)}")
            if kind is int and not (v.isdigit() and int(v) >= 1):
                raise ValueError(f"{flag}: {v!r} is not a count >= 1")
        return [kind(v) for v in values]

    models = list(MODELS) if args.model == "all" else listed(args.model, "--model", list(MODELS))
    grid = itertools.product(models, listed(args.mode, "--mode", ["train", "inference"]),
                             listed(args.batch_size, "--batch-size", kind=int),
                             listed(args.dtype, "--dtype", ["float32", "bfloat16"]),
                             listed(args.grad, "--grad", ["auto", "manual"]),
                             ["all"] if args.devices == "all" else listed(args.devices, "--devices", kind=int))
    compare = listed(args.compare, "--compare", ["torch", "flax"])
    env = bench.environment()
    print(f"jaxconv bench on {env['device_count']} {env['device_kind']} device(s), {env['cpu_count']} cores; "
          f"jax {env['jax']}, flax {env['flax']}, torch {env['torch']}; XLA options {env['xla_options'] or 'none'}")
    rows = []
    # JSON lines are written as each configuration is measured: a long sweep stopped part-way keeps its rows
    json_lines = open(args.json, "w") if args.json else contextlib.nullcontext()
    with json_lines:
        for model, mode, batch, dtype, grad, devices in grid:
            row = bench.measure(model, batch=batch, dtype=dtype, grad=grad, mode=mode, devices=devices,
                                compare_torch="torch" in compare, compare_flax="flax" in compare, steps=args.steps)
            rows.append(row)
            if args.json:
                bench.write_json_line(json_lines, row, env)
            _print_bench_row(row)
    print(bench.format_table(rows))
    print(f"FLOPs: multiply-add = 2 in both columns; model = jaxconv's summary count x batch (training: 3x, "
          f"less the data's gradient); "
          f"XLA = cost_analysis() of the step's program as traced. "
          f"MFU against {rows[0]['peak_flops_per_s'] / rows[0]['devices']:.3g} FLOP/s per device "
          f"({rows[0]['peak_source']}). Memory: {rows[0]['memory_source']}.")
    if args.csv:
        bench.write_csv(args.csv, rows, env)
    if args.plot:
        bench.plot(args.plot, rows)
    return 0


def _print_bench_row(row: dict) -> None:
    from jaxconv import bench
    print(f"  {row['model']} {row['mode']} batch {row['batch']} {row['dtype']} grad={row['grad']} x{row['devices']}: "
          f"step {row['step_s'] * 1e3:.2f} ms"
          + (f", torch {row['torch_step_s'] * 1e3:.2f} ms ({row['torch_layout']}; {row['speed_vs_torch']:.2f}x, "
             f"rounds {bench.rounds_text(row, 'speed_vs_torch')})" if "torch_step_s" in row else "")
          + (f"; {row['torch_error']}" if row.get("torch_error") else "")
          + (f", flax {row['flax_step_s'] * 1e3:.2f} ms ({row['speed_vs_flax']:.2f}x, rounds "
             f"{bench.rounds_text(row, 'speed_vs_flax')})" if "flax_step_s" in row else "")
          + (f"; flax: {row['flax_error']}" if row.get("flax_error") else ""), flush=True)


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
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # bare `jaxconv`: what it can do
        _top_parser().print_help()
        return 0
    if argv[0].startswith("-"):  # --help, --version: answered without starting JAX
        _top_parser().parse_args(argv)
    args = build_parser().parse_args(argv)
    if not os.environ.get("JAXCONV_DEBUG"):  # JAXCONV_DEBUG=1 keeps them
        _quiet_echoes_of_failed_writes()
    commands = {"train": _train, "eval": _eval, "predict": _predict, "summary": _summary, "gradcheck": _gradcheck,
                "bench": _bench, "visualize": _visualize}
    if args.command in ("train", "eval", "predict"):  # a second run loads its compiled steps (bench times compiles)
        from jaxconv.compiler import enable_compilation_cache
        enable_compilation_cache()
    try:
        return commands[args.command](args)
    except BaseException as err:  # every failure a user can cause or meet: one line, a status that says which
        message, status = explain(err)
        if message is None:
            raise
        print(f"jaxconv {args.command}: {message}", file=sys.stderr)
        if "jaxconv.parallel" in sys.modules:  # a multi-process run leaves without waiting for its peers
            sys.modules["jaxconv.parallel"].leave_now(status)
        return status


def _quiet_echoes_of_failed_writes():
    """A failed Orbax write (a full disk) is answered in one line, but echoes of it reach stderr from
    elsewhere: each writer thread logs its traceback (absl); tasks whose exception nobody awaited are
    logged when collected (asyncio); and TensorStore's native callbacks fire into the event loop Orbax
    has closed, each ``RuntimeError: Event loop is closed`` printed through ``sys.excepthook`` or
    ``sys.unraisablehook``. Silence those, and only those."""
    import logging
    if getattr(_quiet_echoes_of_failed_writes, "installed", False):  # main() may run many times in a process
        return
    _quiet_echoes_of_failed_writes.installed = True

    def echo(kind, value):
        return kind is RuntimeError and str(value) == "Event loop is closed"

    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    hook, unraisable = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda kind, value, tb: None if echo(kind, value) else hook(kind, value, tb)
    sys.unraisablehook = lambda u: None if echo(u.exc_type, u.exc_value) else unraisable(u)


def explain(err: BaseException) -> tuple[str | None, int]:
    """``(one line, exit status)`` for a failure a user can cause or meet; ``(None, 0)`` for a bug."""
    import errno
    from jaxconv import parallel
    from jaxconv.data import DataError
    from jaxconv.train import OutOfMemory, Stopped, TrainingDiverged

    if isinstance(err, Stopped):
        return str(err), 128 + err.signal
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (nothing was trained since the last checkpoint, if any)", 130
    if isinstance(err, (ValueError, DataError)):
        return f"error: {err}", 2
    if isinstance(err, (TrainingDiverged, OutOfMemory)):
        return f"error: {err}", 1
    lost = parallel.failed_collective(err)
    if lost:
        return f"error: {lost}", 1
    if isinstance(err, OSError) and err.errno is not None:
        where = f" ({err.filename})" if err.filename else ""
        hint = {errno.ENOSPC: "; free some space or choose another --out, then --resume",
                errno.EACCES: "; choose a folder you may write to",
                errno.EROFS: "; choose a folder you may write to"}.get(err.errno, "")
        return f"error: {err.strerror}{where}{hint}", 1
    return None, 0
