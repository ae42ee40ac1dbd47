"""Many seeds in one program against the same seeds one after another: wall time of `jaxconv train`.

    python benchmarks/seeds_vs_sequential.py [--seeds 8] [--epochs 120] [-- extra train flags]

Runs, in one process tree and one after another on the same machine: `jaxconv train --seeds K` (one
program for all K), then K single-seed runs (`--seed 0 .. K-1`), each as its own `jaxconv train` process,
as a user would run them. Prints both wall times (process start to exit), the ratio of the K-seed run
to one single-seed run (the mean of the K) and the throughput gain over running them in turn.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def timed(args, out):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxconv", "train", "--out", out, *args], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("extra", nargs="*", help="more `jaxconv train` flags (after --)")
    args = parser.parse_args()
    flags = ([] if args.epochs is None else ["--epochs", str(args.epochs)]) + args.extra
    with tempfile.TemporaryDirectory() as tmp:
        together = timed(flags + ["--seeds", str(args.seeds)], os.path.join(tmp, "together"))
        alone = [timed(flags + ["--seed", str(s)], os.path.join(tmp, f"alone{s}")) for s in range(args.seeds)]
    one = sum(alone) / len(alone)
    print(f"jaxconv train {' '.join(flags)}: --seeds {args.seeds} in one program {together:.1f} s; "
          f"{args.seeds} single-seed runs in turn {sum(alone):.1f} s (one: mean {one:.1f} s, "
          f"min {min(alone):.1f}, max {max(alone):.1f})")
    print(f"--seeds {args.seeds} / one single-seed run = {together / one:.2f}x the wall time; "
          f"throughput {sum(alone) / together:.2f}x running them in turn")


if __name__ == "__main__":
    main()
