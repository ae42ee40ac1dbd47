"""Per-step time of a jitted training step with grad="manual" over grad="auto", side by side.

    python benchmarks/manual_vs_auto_step.py [--models seed_cnn lenet5] [--batch 128] [--rounds 30]

Both variants are compiled first, then timed in alternation (one step of each per round); the
medians and their ratio are printed. Target (issue 4): manual/auto <= 1.05.
"""
import argparse
import os

import jax

from jaxconv.gradcheck import step_time_ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["seed_cnn", "lenet5"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print(f"{jax.devices()[0].platform} ({os.cpu_count()} cores), jax {jax.__version__}, float32, batch {args.batch}")
    print(f"{'model':12s} {'manual ms':>10s} {'auto ms':>10s} {'manual/auto':>12s}")
    for name in args.models:
        manual, auto = step_time_ratio(name, batch=args.batch, rounds=args.rounds)
        print(f"{name:12s} {manual * 1e3:10.2f} {auto * 1e3:10.2f} {manual / auto:12.3f}")


if __name__ == "__main__":
    main()
