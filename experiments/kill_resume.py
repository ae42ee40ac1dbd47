"""Kill `jaxconv train` at many random moments, resume each time, and compare with an uninterrupted run.

    python experiments/kill_resume.py --chains 4 --kills 10

Each chain is one run (MNIST-1D, a validation split, a checkpoint every 5 steps) killed `--kills`
times by SIGKILL or SIGTERM after a random delay, resumed after each kill, then finished. Its end —
every metric but the timings, results.json, the confusion matrix, every array of the latest and best
checkpoints — is compared with a run never interrupted. Prints where each kill landed and the verdict.
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.kill_chain import differences, kill_chain, outcome, timed, train  # noqa: E402


def landed(attempt, previous_step) -> str:
    if attempt["partial_checkpoint"]:
        return "during a checkpoint write"
    if attempt["temp_files"]:
        return "during a metrics/config write"
    if not attempt["stdout"]:
        return "during start-up (imports, data, compile)"
    if attempt["returncode"] == 143:
        return "in training (SIGTERM caught: checkpoint, exit 143)"
    if attempt["step"] == previous_step:
        return "before the first new checkpoint"
    return "in training"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    flags = ["--epochs", str(args.epochs), "--checkpoint-every", "5", "--val-split", "0.1"]
    root = tempfile.mkdtemp(prefix="kill_resume_")
    (rc, _, err), seconds = timed(train, [*flags, "--out", os.path.join(root, "full")])
    assert rc == 0, err
    reference = outcome(os.path.join(root, "full"))
    print(f"uninterrupted run: {seconds:.1f} s; kill delays drawn from [1.5, {0.5 * seconds:.1f}] s")
    where, verdicts, total = collections.Counter(), [], 0
    for chain in range(args.chains):
        out = os.path.join(root, f"chain{chain}")
        attempts = kill_chain(out, flags, kills=args.kills, window=(1.5, 0.5 * seconds), seed=chain,
                              signals=(signal.SIGKILL, signal.SIGTERM))
        assert attempts[-1]["returncode"] == 0, attempts[-1]["stderr"]
        previous = None
        for a in attempts[:-1]:
            where[landed(a, previous)] += 1
            previous = a["step"]
        total += len(attempts) - 1
        diffs = differences(reference, outcome(out))
        verdicts.append(not diffs)
        print(f"chain {chain}: {len(attempts) - 1} kills, steps at each kill "
              f"{[a['step'] for a in attempts[:-1]]}: {'identical' if not diffs else 'DIFFERENT: ' + str(diffs[:5])}")
    print(f"\n{total} kills in {args.chains} chains; where they landed:")
    for place, n in where.most_common():
        print(f"  {n:3d}  {place}")
    print(f"\nfinal metrics and parameters identical to the uninterrupted run in {sum(verdicts)}/{len(verdicts)} chains")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
