"""Time to first step of `jaxconv train`, cold (empty compilation cache) and warm (the same command again).

    python benchmarks/time_to_first_step.py [-- extra train flags, e.g. --dataset mnist --data-dir DIR]

Each run is its own process with JAXCONV_DATA pointing at a fresh folder (so the cache starts empty); reads
the "first step done N s after fit() began" line each prints, and the process wall time.
"""
import os
import re
import subprocess
import sys
import tempfile
import time


def main():
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "JAXCONV_DATA": os.path.join(tmp, "cache"), "JAXCONV_COMPILATION_CACHE": "1"}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        if "--dataset" not in extra or "mnist1d" in extra:  # MNIST-1D's generated data lives in the same folder
            subprocess.run([sys.executable, "-c", "from jaxconv.data import load_dataset; load_dataset('mnist1d')"],
                           env=env, check=True)
        found = {}
        for run in ("cold", "warm"):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "jaxconv", "train", "--epochs", "1", *extra, "--out",
                                   os.path.join(tmp, run)], env=env, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
            first = float(re.search(r"first step done ([\d.]+) s", done.stdout).group(1))
            found[run] = (first, wall)
            print(f"{run}: first step {first:.2f} s after fit() began; process {wall:.2f} s")
    print(f"warm / cold: first step {found['cold'][0] / found['warm'][0]:.1f}x sooner, "
          f"process {found['cold'][1] / found['warm'][1]:.1f}x shorter")


if __name__ == "__main__":
    main()
