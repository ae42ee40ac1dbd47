"""Where one jaxconv step's time goes on this machine: a `jax.profiler` trace of a few steps, summed by XLA op kind.

    python benchmarks/step_profile.py --model resnet20 [--mode train] [--batch 128] [--steps 3] [--trace DIR]

The step is `jaxconv.bench.jax_step` (what `jaxconv bench` times). After warm-up it times `--steps` steps, then
traces as many (`jax.profiler.trace(..., create_perfetto_trace=True)`; the trace stays in DIR, default a temporary
folder, for Perfetto or TensorBoard). Each op's events are summed over every thread and the steps, divided by the
steps, and grouped by kind (the op name without its number: `transpose_copy_fusion`, `ynn_fusion`, ...). On XLA:CPU
the trace marks fusions and library calls but not the work of XLA's own (Eigen) convolution kernels, which runs
unmarked on the pool's threads: "unmarked" is the threads' time (cores x wall) less the marked ops, that is the
convolutions and any idle time together (oneDNN's convolutions, where jaxconv.onednn_conv runs them, are marked:
`ffi_call`). Times are thread-time, so they add up to more than the wall time.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

from jaxconv import bench, parallel
from jaxconv.models import create_model

# events that wrap others (the executor, Python frames, the dispatch), not ops of the program
WRAPPERS = re.compile(r"^\$|ThunkExecutor|PjitFunction|SlinkyThreadPool|^end: |ParseArguments|Handle input|"
                      r"CommonPjRt|AllocateOutputBuffers|PythonRefManager")


def op_times(trace_dir: str) -> collections.Counter:
    """Microseconds per op name, summed over the trace's complete events."""
    path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not WRAPPERS.search(e["name"]):
            total[e["name"]] += e.get("dur", 0)
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--mode", default="train", choices=("train", "inference"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--trace", help="folder for the trace (default: a temporary one)")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    run, _ = bench.jax_step(create_model(args.model), args.batch, mode=args.mode, dtype="float32",
                            mesh=parallel.make_mesh(1))
    for _ in range(3):
        run()
    start = time.perf_counter()
    for _ in range(args.steps):
        run()
    wall = (time.perf_counter() - start) / args.steps
    trace_dir = args.trace or tempfile.mkdtemp(prefix="jaxconv_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            run()
    kinds = collections.Counter()
    for name, us in op_times(trace_dir).items():
        kinds[re.sub(r"\.\d+$", "", name)] += us / args.steps / 1e3
    cores = os.cpu_count() if jax.default_backend() == "cpu" else 1
    thread_ms = cores * wall * 1e3
    top = kinds.most_common(args.top)
    marked = sum(kinds.values())
    print(f"{args.model} {args.mode} batch {args.batch} on {jax.devices()[0].device_kind}: "
          f"{wall * 1e3:.2f} ms a step (untraced), {cores} cores = {thread_ms:.2f} thread-ms")
    for kind, ms in top:
        print(f"  {kind:32s} {ms:9.2f} thread-ms  {ms / thread_ms:6.1%}")
    print(f"  {'(other marked ops)':32s} {marked - sum(ms for _, ms in top):9.2f} thread-ms")
    unmarked = thread_ms - marked
    print(f"  {'unmarked: Eigen convolutions, idle':32s} {unmarked:9.2f} thread-ms  {unmarked / thread_ms:6.1%}")
    print(f"trace: {trace_dir}")


if __name__ == "__main__":
    main()
