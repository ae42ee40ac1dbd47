"""Which operations XLA:CPU hands to YNNPACK, per step kind: jaxconv's choice (dots and reductions) against
YNNPACK taking the convolutions too (XLA's default) and against dots only, for whole training or inference steps.

    python benchmarks/library_fusions.py [--models resnet20,resnet18] [--mode inference] [--steps 8]

Each configuration is the same `jaxconv.bench.jax_step` compiled with its own
`xla_cpu_experimental_ynn_fusion_type`; calls alternate (`jaxconv.timing.time_calls`), medians. Batch 128, the
ImageNet-sized ResNets 16. jaxconv keeps convolutions with XLA's own (Eigen) kernels in every step; this is the
measurement behind that choice for inference steps (for training it is YNNPACK's slow weight gradient, see
`jaxconv/compiler.py`).
"""
import argparse
import functools

import jax

from jaxconv import bench, parallel
from jaxconv.models import create_model
from jaxconv.timing import time_calls

KEY = "xla_cpu_experimental_ynn_fusion_type"
SETTINGS = {
    "dots+reductions (jaxconv)": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "+convolutions (XLA default)": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE,"
                                   "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "dots only": "LIBRARY_FUSION_TYPE_DOT",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet18")
    parser.add_argument("--mode", default="inference", choices=("train", "inference"))
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if jax.default_backend() != "cpu":
        raise SystemExit("library_fusions.py: these are XLA:CPU options; run it on a CPU")
    mesh = parallel.make_mesh(1)
    for name in args.models.split(","):
        batch = 16 if name in ("resnet18", "resnet50") else 128
        runs = {}
        for label, value in SETTINGS.items():
            jit = functools.partial(jax.jit, compiler_options={KEY: value})
            runs[label], _ = bench.jax_step(create_model(name), batch, mode=args.mode, dtype="float32", mesh=mesh,
                                            jit=jit)
        timed = time_calls(runs, steps=args.steps)
        ours = timed["dots+reductions (jaxconv)"]["median_s"]
        for label, t in timed.items():
            print(f"{name} {args.mode} batch {batch}: {label:28s} {t['median_s'] * 1e3:9.2f} ms "
                  f"({t['median_s'] / ours:.2f}x jaxconv's time)", flush=True)


if __name__ == "__main__":
    main()
