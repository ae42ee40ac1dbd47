"""Benchmarks a researcher can cite: compile time, step time, throughput, FLOPs, MFU and memory of a model's
training or inference step, and the same model's PyTorch twin measured the same way beside it.

``measure(...)`` returns one flat dict per configuration (every field of the JSON, CSV and table of
``jaxconv bench``). ``jaxconv.timing.time_calls({name: fn})`` is the timer underneath, for a research script's
own step.

Conventions, said once:

* FLOPs count a multiply-add as 2, in both columns: ``flops_xla`` is XLA's cost analysis of the step's
  program as traced (``jit(...).lower(...).cost_analysis()``: forward, backward and optimizer update, before
  the backend's passes; where the backend gives no analysis of a lowered program, as GPUs' don't, the same
  step lowered for a CPU device); ``flops_model`` is jaxconv's own per-layer count
  (:func:`jaxconv.shapes.summary`) times the batch - the forward pass for inference; for training
  (:func:`jaxconv.shapes.training_flops`) 3x the forward pass (the backward pass computes a gradient for the
  input and for the weights, each about one forward's work; the convention of Kaplan et al. (2020) and of
  most MFU reports), less the gradient of the data, which no step computes: the first conv counts its
  forward and weight gradient only. ``flops_xla_compiled`` is
  the compiled program's analysis: on a GPU it leaves out the convolutions, which the compiler hands to cuDNN
  as library calls (seen on an H200: 2.3 of cifar_resnet18's 371 training GFLOPs), and on a CPU those jaxconv hands
  to oneDNN as custom calls (:mod:`jaxconv.onednn`), so it is kept as a field but not compared; ``flops_xla`` then
  comes from the step lowered with XLA's convolutions.
* MFU = achieved FLOP/s / the device's peak FLOP/s, achieved = ``flops_model`` / step time (the model's
  necessary work, not what XLA happened to compile). Peaks come from :data:`PEAK_FLOPS` (vendor figures,
  dense, per device) for the unit that does float32 work at JAX's matmul precision in force: by default JAX
  computes float32 convolutions and matmuls with TF32 tensor cores on NVIDIA GPUs since Ampere and with one
  bfloat16 pass on TPUs, so a float32 step is measured against that unit's peak; with
  ``jax_default_matmul_precision`` "highest" or "float32", against the plain float32 peak. On a CPU, or a
  device the table lacks, the peak is a matmul of the same dtype timed once in this process (``peak_source``
  says which).
* Memory: the device's ``memory_stats()['peak_bytes_in_use']`` where the backend has it; on a CPU, the
  process's peak resident memory (``ru_maxrss``), which only grows over a run (``memory_source`` says).
* Time: ``compile_s`` is the lowering and compilation of the step (``jit(...).lower(...).compile()``),
  ``first_call_s`` the first call after it; then each contender's calls alternate round by round with the
  others' (so a noisy machine slows all alike), each call waited for, the first call of each round untimed
  (:func:`jaxconv.timing.time_calls`). ``speed_vs_torch`` is the ratio of the medians; ``speed_vs_torch_q25``
  and ``_q75`` the quartiles of the call-by-call ratios within rounds (:func:`jaxconv.timing.ratio_quartiles`;
  the table's "rounds" column): where they straddle 1.0 the run has not settled which is faster. They measure
  the noise within one run; a machine whose speed drifts between runs moves a ratio further. The same for
  ``speed_vs_flax``.
"""
from __future__ import annotations

import math
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxconv import compiler, onednn_conv, parallel
from jaxconv import functional as F
from jaxconv.models import create_model
from jaxconv.shapes import summary, training_flops
from jaxconv.timing import ratio_quartiles, time_calls  # noqa: F401  (time_calls: part of this module's API)

# Peak dense FLOP/s per device (multiply-add = 2), from the vendors' data sheets, by the unit doing the work:
# "float32" the plain (non-tensor-core) rate, "tf32" NVIDIA's TensorFloat-32 tensor-core rate, "bfloat16" the
# bfloat16 matrix rate. Sheets quoting "with sparsity" figures are halved to the dense rate.
PEAK_FLOPS = {
    # NVIDIA A100 data sheet: FP32 19.5, TF32 tensor 156, BF16 tensor 312 TFLOPS (dense)
    "A100": {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12},
    # NVIDIA H100 SXM5 data sheet: FP32 67, TF32 tensor 989 and BF16 tensor 1,979 TFLOPS with sparsity
    "H100": {"float32": 67e12, "tf32": 494.5e12, "bfloat16": 989e12},
    # NVIDIA H200 SXM data sheet: the same compute as H100 SXM
    "H200": {"float32": 67e12, "tf32": 494.5e12, "bfloat16": 989e12},
    # Google Cloud TPU system architecture pages, BF16 per chip: v4 275, v5e 197, v5p 459, v6e 918 TFLOPS
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},
    "TPU v5e": {"bfloat16": 197e12},
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v5": {"bfloat16": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12},
    "TPU v6e": {"bfloat16": 918e12},
}
# jax_default_matmul_precision values that keep float32 work in float32 (any other value, None included,
# lets an accelerator use its faster unit: TF32 on NVIDIA GPUs, bfloat16 passes on TPUs)
FULL_FLOAT32 = ("highest", "float32", "f32_f32_f32")


def table_peak(device_kind: str, dtype: str, precision: str | None = None) -> tuple[float, str] | None:
    """``(peak FLOP/s, unit)`` from the table for a device kind (longest matching name first) and the step's
    dtype at matmul ``precision`` (``jax_default_matmul_precision``'s value), or ``None`` if the table lacks it."""
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            units = PEAK_FLOPS[name]
            if dtype == "float32" and str(precision).lower() not in FULL_FLOAT32:
                wanted = ("tf32", "bfloat16", "float32")
            else:
                wanted = (dtype,)
            return next(((units[u], u) for u in wanted if u in units), None)
    return None


def measured_peak(dtype=jnp.float32, n: int = 2048, calls: int = 10) -> float:
    """FLOP/s of an ``n x n`` by ``n x n`` matmul on the default device (the best of ``calls``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    best = math.inf
    for _ in range(calls):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def jax_step(model, batch: int, *, mode: str, dtype: str, mesh, jit=compiler.jit, compile: bool = True):
    """``(run, compiled)`` for ``model``'s training (SGD with momentum 0.9) or inference step on a random
    batch split over ``mesh``: ``run()`` does one step and waits; ``compiled`` is the lowered-and-compiled
    step (for its cost analysis; ``.lowered`` the program as traced). ``compile=False`` only lowers it."""
    real = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    key_x, key_y = jax.random.split(jax.random.key(0))
    *positions, classes = model.output_shape(model.input_shape)
    x = jax.device_put(jax.random.normal(key_x, (batch, *model.input_shape), real), parallel.split(mesh))
    y = jax.device_put(jax.random.randint(key_y, (batch, *positions), 0, classes), parallel.split(mesh))
    replicated = parallel.replicated(mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = jax.device_put((params, rest), replicated)
    if mode == "inference":
        model.eval()
        graphdef, _, rest_eval = nnx.split(model, nnx.Param, ...)

        def infer(p, r, x):
            return nnx.merge(graphdef, p, r)(x)
        step = jit(infer, out_shardings=parallel.split(mesh))
        args = (params, jax.device_put(rest_eval, replicated), x)
        return (lambda: jax.block_until_ready(step(*args))), _compiled(step, args, compile)
    tx = optax.sgd(0.01, momentum=0.9)

    def train(p, opt_state, r, x, y):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, r, copy=True)
            return F.cross_entropy(m(x).astype(jnp.float32), y), nnx.state(m, nnx.Not(nnx.Param))
        (loss, r), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, r, x, y, loss

    step = jit(train, donate_argnums=(0, 1, 2), out_shardings=(replicated,) * 3 + (parallel.split(mesh),) * 2
               + (replicated,))
    state = [params, jax.device_put(tx.init(params), replicated), rest, x, y]
    compiled = _compiled(step, state, compile)

    def run():
        *state[:], loss = step(*state)
        jax.block_until_ready(loss)
    return run, compiled


def flax_step(model, batch: int, *, mode: str, dtype: str):
    """``run()`` for the plain Flax NNX program of the same model (:func:`jaxconv.flax_twin.flax_twin`), as a
    Flax user writes it: ``nnx.jit``, ``nnx.Optimizer`` updated in place (SGD with momentum 0.9), optax's
    cross-entropy; or ``nnx.jit`` of the model in eval mode for inference. One device."""
    from jaxconv.flax_twin import flax_twin
    real = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    twin = flax_twin(model)
    key_x, key_y = jax.random.split(jax.random.key(0))
    *positions, classes = model.output_shape(model.input_shape)
    x = jax.random.normal(key_x, (batch, *model.input_shape), real)
    y = jax.random.randint(key_y, (batch, *positions), 0, classes)
    if mode == "inference":
        twin.eval()
        infer = nnx.jit(lambda m, x: m(x))
        return lambda: jax.block_until_ready(infer(twin, x))
    twin.train()
    optimizer = nnx.Optimizer(twin, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def train(m, opt, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x).astype(jnp.float32), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    return lambda: jax.block_until_ready(train(twin, optimizer, x, y))


def _compiled(step, args, compile: bool = True):
    """``step`` lowered and compiled for ``args``, with the seconds it took as ``.seconds`` and the lowered
    program as ``.lowered``."""
    start = time.perf_counter()
    lowered = step.lower(*args)
    compiled = lowered.compile() if compile else None
    return _Timed(compiled, time.perf_counter() - start, lowered)


class _Timed:
    def __init__(self, compiled, seconds: float, lowered=None):
        self.compiled, self.seconds, self.lowered = compiled, seconds, lowered

    def cost_analysis(self):
        return self.compiled.cost_analysis()


def torch_step(model, batch: int, *, mode: str, dtype: str, channels_last: bool):
    """The same step on ``model``'s PyTorch twin (CUDA when available): a call that waits."""
    import torch
    from jaxconv.torch_twin import torch_twin
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # what a PyTorch user sets for fixed shapes: cuDNN picks its fastest algorithm once
        torch.backends.cudnn.benchmark = True
    real = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    net = torch_twin(model).to(device=device, dtype=real)
    x = torch.randn(batch, model.input_shape[-1], *model.input_shape[:-1], device=device, dtype=real)
    *positions, classes = model.output_shape(model.input_shape)
    y = torch.randint(0, classes, (batch, *positions), device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if mode == "inference":
        net.eval()

        def infer():
            with torch.inference_mode():
                net(x)
            sync()
        return infer
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x).float(), y).backward()
        opt.step()
        sync()
    return train


def xla_flops(program) -> float | None:
    """FLOPs of one call of a lowered or compiled function, by XLA's cost analysis (multiply-add = 2); ``None``
    if absent."""
    cost = program.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    value = (cost or {}).get("flops")
    return float(value) if value is not None and value >= 0 else None


def traced_flops(model_name: str, batch: int = 128, mode: str = "train", dtype: str = "float32") -> dict:
    """jaxconv's FLOP count of a registered model's step beside XLA's count of the step as traced (lowered, not
    compiled: seconds even for the ResNets)."""
    model = create_model(model_name, dtype=jnp.bfloat16 if dtype == "bfloat16" else None)
    flops_model, flops_xla = model_flops(model, batch, mode), cpu_traced_flops(model, batch, mode, dtype)
    return dict(model=model_name, mode=mode, batch=batch, dtype=dtype, flops_model=flops_model, flops_xla=flops_xla,
                flops_ratio=flops_xla / flops_model if flops_xla else None)


def cpu_traced_flops(model, batch: int, mode: str, dtype: str) -> float | None:
    """XLA's cost analysis of the step as traced, lowered for one CPU device. The count is the program's, not the
    device's; a GPU backend gives none for a lowered program (``None``, seen with jax 0.11.2 on an H200), and its
    compiled program's leaves the cuDNN convolutions out. The convolutions are XLA's, not oneDNN's custom calls (whose
    work XLA's analysis does not see). ``None`` where JAX has no CPU backend."""
    try:
        cpu = jax.devices("cpu")[:1]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return None
    mesh = jax.make_mesh((1,), (parallel.AXIS,), devices=cpu, axis_types=(jax.sharding.AxisType.Auto,))
    with jax.default_device(cpu[0]), onednn_conv.xla_convolutions():  # XLA counts no custom call's work
        _, timed = jax_step(model, batch, mode=mode, dtype=dtype, mesh=mesh, compile=False)
    return xla_flops(timed.lowered)


def model_flops(model, batch: int, mode: str) -> float:
    """jaxconv's own count x batch: the summary's forward FLOPs per example, or for a training step
    :func:`jaxconv.shapes.training_flops` (3x the forward, less the data's gradient, which no step computes)."""
    per_example = training_flops(model) if mode == "train" else summary(model).total_flops
    return float(per_example * batch)


def peak_memory(device) -> tuple[int, str]:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def environment() -> dict:
    env = dict(jax=jax.__version__, jaxlib=jax.lib.__version__, python=platform.python_version(),
               platform=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
               device_count=jax.device_count(), process_count=jax.process_count(), cpu_count=os.cpu_count(),
               xla_options=compiler.compiler_options() or {}, xla_flags=os.environ.get("XLA_FLAGS", ""))
    import flax
    env["flax"] = flax.__version__
    try:
        import torch
        env["torch"], env["torch_threads"] = torch.__version__, torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    return env


def measure(model_name, *, batch: int = 128, dtype: str = "float32", grad: str = "auto",
            mode: str = "train", devices: str | int = 1, compare_torch: bool = False, compare_flax: bool = False,
            steps: int = 20, peak: tuple[float, str] | None = None) -> dict:
    """One configuration, measured: see the module docstring for every field's meaning. ``model_name`` is a
    registered model's name, or a built model (a module with ``input_shape``, e.g. ``Builder(...).build(name)``).
    ``compare_flax`` also times the plain Flax NNX program of the model (:func:`flax_step`, one device)."""
    if mode not in ("train", "inference"):
        raise ValueError(f"--mode must be train or inference, got {mode!r}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    mesh = parallel.make_mesh(devices)
    parallel.check_batch(batch, mesh)
    if isinstance(model_name, str):
        model = create_model(model_name, grad=grad, dtype=jnp.bfloat16 if dtype == "bfloat16" else None)
    else:
        model, model_name = model_name, getattr(model_name, "name", type(model_name).__name__)
    run, compiled = jax_step(model, batch, mode=mode, dtype=dtype, mesh=mesh)
    flops_model, flops_xla = model_flops(model, batch, mode), xla_flops(compiled.lowered)
    if flops_xla is None or "jaxconv_onednn" in compiled.lowered.as_text():
        # no analysis of a lowered program on this backend (GPUs), or oneDNN's custom calls, which it does not see:
        # the same step lowered for a CPU with XLA's convolutions, before the steps donate the model's arrays
        flops_xla = cpu_traced_flops(model, batch, mode, dtype)
    runs = {"jaxconv": run}
    torch_error = None
    if compare_torch:
        try:
            runs["torch NCHW"] = torch_step(model, batch, mode=mode, dtype=dtype, channels_last=False)
            if len(model.input_shape) == 3:
                runs["torch channels_last"] = torch_step(model, batch, mode=mode, dtype=dtype, channels_last=True)
        except ImportError as err:
            torch_error = f"PyTorch is not installed ({err}); install torch==2.13.0 to compare"
    flax_error = None
    if compare_flax:
        try:
            if mesh.size > 1:
                raise TypeError("the plain Flax program runs on one device; compare it with --devices 1")
            runs["flax"] = flax_step(model, batch, mode=mode, dtype=dtype)
        except TypeError as err:
            flax_error = str(err)
    timed = time_calls(runs, steps=steps)
    ours = timed["jaxconv"]
    device = mesh.devices.flat[0]
    if peak is None:
        peak = _peak(device.device_kind, dtype)
    memory, memory_source = peak_memory(device)
    row = dict(model=model_name, mode=mode, batch=batch, dtype=dtype, grad=grad, devices=mesh.size,
               device_kind=device.device_kind, compile_s=compiled.seconds, first_call_s=ours["first_s"],
               step_s=ours["median_s"],
               step_q25_s=ours["q25_s"], step_q75_s=ours["q75_s"], steps=ours["samples"],
               images_per_s=batch / ours["median_s"], images_per_s_per_device=batch / ours["median_s"] / mesh.size,
               flops_model=flops_model, flops_xla=flops_xla, flops_xla_compiled=xla_flops(compiled),
               flops_ratio=(flops_xla / flops_model) if flops_xla else None,
               achieved_flops_per_s=flops_model / ours["median_s"], peak_flops_per_s=peak[0] * mesh.size,
               peak_source=peak[1], memory_bytes=memory, memory_source=memory_source)
    row["mfu"] = row["achieved_flops_per_s"] / row["peak_flops_per_s"]
    torch_runs = {k: v for k, v in timed.items() if k.startswith("torch")}
    if torch_runs:
        layout, best = min(torch_runs.items(), key=lambda kv: kv[1]["median_s"])
        row.update(torch_step_s=best["median_s"], torch_layout=layout.split(" ", 1)[1],
                   torch_first_call_s=best["first_s"], speed_vs_torch=best["median_s"] / ours["median_s"])
        row["speed_vs_torch_q25"], row["speed_vs_torch_q75"] = ratio_quartiles(best, ours)
    elif compare_torch:
        row["torch_error"] = torch_error
    if "flax" in timed:
        row.update(flax_step_s=timed["flax"]["median_s"], flax_first_call_s=timed["flax"]["first_s"],
                   speed_vs_flax=timed["flax"]["median_s"] / ours["median_s"])
        row["speed_vs_flax_q25"], row["speed_vs_flax_q75"] = ratio_quartiles(timed["flax"], ours)
    elif compare_flax:
        row["flax_error"] = flax_error
    return row


_PEAKS: dict = {}


def _peak(device_kind: str, dtype: str) -> tuple[float, str]:
    precision = jax.config.jax_default_matmul_precision
    listed = table_peak(device_kind, dtype, precision)
    if listed is not None:
        peak, unit = listed
        how = "" if unit == dtype else f", the unit JAX's default precision uses for {dtype} here"
        return peak, f"table: {device_kind} {unit}{how}"
    if dtype not in _PEAKS:
        real = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
        _PEAKS[dtype] = measured_peak(real)
    return _PEAKS[dtype], f"measured: {dtype} 2048x2048 matmul in this process"


# --------------------------------------------------------------------------- many configurations, written out

COLUMNS = (("model", "model", "{}"), ("mode", "mode", "{}"), ("batch", "batch", "{}"), ("dtype", "dtype", "{}"),
           ("grad", "grad", "{}"), ("devices", "dev", "{}"), ("compile_s", "compile s", "{:.2f}"),
           ("step_s", "step ms", "{:.2f}", 1e3), ("images_per_s", "img/s", "{:,.0f}"),
           ("images_per_s_per_device", "img/s/dev", "{:,.0f}"), ("flops_model", "GFLOP model", "{:.3f}", 1e-9),
           ("flops_xla", "GFLOP XLA", "{:.3f}", 1e-9), ("mfu", "MFU", "{:.1%}"),
           ("memory_bytes", "mem MiB", "{:,.0f}", 2 ** -20), ("torch_step_s", "torch ms", "{:.2f}", 1e3),
           ("speed_vs_torch", "vs torch", "{:.2f}x"),
           ("speed_vs_torch_q25", "rounds", lambda row: rounds_text(row, "speed_vs_torch")),
           ("flax_step_s", "flax ms", "{:.2f}", 1e3), ("speed_vs_flax", "vs flax", "{:.2f}x"),
           ("speed_vs_flax_q25", "rounds", lambda row: rounds_text(row, "speed_vs_flax")))


def rounds_text(row: dict, key: str) -> str:
    """A speed-up's quartiles over the rounds (``key``'s ``_q25`` and ``_q75`` fields) as ``"0.89-0.91"``."""
    return f"{row[key + '_q25']:.2f}-{row[key + '_q75']:.2f}"


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (the columns any row has)."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]

    def cell(row, col):
        value = row.get(col[0])
        if value is None:
            return "-"
        if callable(col[2]):
            return col[2](row)
        return col[2].format(value * (col[3] if len(col) > 3 else 1))

    body = [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(c[1]), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(x.ljust(w) if i < 5 else x.rjust(w) for i, (x, w) in enumerate(zip(cells, widths)))
    return "\n".join([line([c[1] for c in cols]), line(["-" * w for w in widths]), *map(line, body)])


def write_json_line(file, row: dict, env: dict) -> None:
    """One row and the environment as a line of JSON, flushed to disk."""
    import json
    file.write(json.dumps({**row, "environment": env}) + "\n")
    file.flush()


def write_csv(path: str, rows: list[dict], env: dict) -> None:
    import csv
    fields = list(dict.fromkeys(k for row in rows for k in row)) + [f"env_{k}" for k in env]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{f"env_{k}": v for k, v in env.items()}})


def plot(path: str, rows: list[dict]) -> None:
    """Throughput against batch size per model (and mode, dtype); scaling efficiency against device count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict = {}
    for r in rows:
        series.setdefault((r["model"], r["mode"], r["dtype"], r["grad"], r["devices"]), []).append(r)
    for (model, mode, dtype, grad, devices), rs in series.items():
        rs = sorted(rs, key=lambda r: r["batch"])
        left.plot([r["batch"] for r in rs], [r["images_per_s"] for r in rs], marker="o",
                  label=f"{model} {mode} {dtype} grad={grad} x{devices}")
    left.set(xscale="log", xlabel="global batch", ylabel="images/s", title="throughput")
    scaling: dict = {}
    for r in rows:
        scaling.setdefault((r["model"], r["mode"], r["dtype"], r["grad"], r["batch"]), []).append(r)
    for key, rs in scaling.items():
        base = next((r for r in rs if r["devices"] == 1), None)
        if base is None or len(rs) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["devices"])
        right.plot([r["devices"] for r in rs], [r["images_per_s"] / (base["images_per_s"] * r["devices"]) for r in rs],
                   marker="o", label=f"{key[0]} {key[1]} batch {key[4]}")
    right.set(xlabel="devices", ylabel="throughput / (devices x one device's)", title="scaling efficiency")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
