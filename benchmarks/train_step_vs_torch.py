"""Train-step throughput of registered models, jaxconv against their PyTorch twins: a thin call of `jaxconv bench`.

    python benchmarks/train_step_vs_torch.py [--model seed_cnn] [--batch 128] [--steps 30]

is `jaxconv bench --model M --batch-size B --compare torch --steps N` (SGD with momentum 0.9, float32, random
data; PyTorch's best of NCHW and channels_last; calls alternating). See `jaxconv bench --help`.
"""
import argparse
import sys

from jaxconv.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seed_cnn")
    parser.add_argument("--batch", default="128")
    parser.add_argument("--steps", default="30")
    args = parser.parse_args()
    sys.exit(main(["bench", "--model", args.model, "--batch-size", args.batch, "--compare", "torch",
                   "--steps", args.steps]))
