"""Training-step time with grad="manual" (every hand-written backward) against grad="auto": a thin call of
`jaxconv bench`.

    python benchmarks/manual_vs_auto_step.py [--models seed_cnn,lenet5] [--batch 128] [--steps 30]

is `jaxconv bench --model M --grad auto,manual --batch-size B --steps N`; compare the two rows of each model.
"""
import argparse
import sys

from jaxconv.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="seed_cnn,lenet5")
    parser.add_argument("--batch", default="128")
    parser.add_argument("--steps", default="30")
    args = parser.parse_args()
    sys.exit(main(["bench", "--model", args.models, "--grad", "auto,manual", "--batch-size", args.batch,
                   "--steps", args.steps]))
