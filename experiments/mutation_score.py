"""The share of mutants the tests kill, per module, from mutmut's results.

    pip install mutmut
    mutmut run --max-children 2          # the modules and tests named in pyproject.toml [tool.mutmut]
    python experiments/mutation_score.py [--survivors]

A module too slow to test whole (each of train.py's 1,279 mutants needs training runs) is scored on a uniform random
sample of its mutants, drawn reproducibly:

    mutmut run --max-children 2 $(python experiments/mutation_score.py --sample 200 --module jaxconv.train)
    python experiments/mutation_score.py      # the sample's score; the rest of the module shows as unchecked

Score = (killed + timed out) / every mutant checked, counting "no tests" (no test reaches the line)
and "suspicious" as survivors. Mutants not yet checked are listed apart, never counted.
"""
from __future__ import annotations

import argparse
import collections
import random
import subprocess
import sys

KILLED = ("killed", "timeout")
LIVED = ("survived", "no tests", "suspicious")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="list the surviving mutants")
    parser.add_argument("--sample", type=int, metavar="N", help="print N mutant names of --module drawn at random")
    parser.add_argument("--module", help="with --sample: the module, e.g. jaxconv.train")
    parser.add_argument("--seed", type=int, default=0, help="with --sample: the draw's seed (default 0)")
    args = parser.parse_args()
    listing = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    if args.sample:
        names = sorted(line.strip().rsplit(": ", 1)[0] for line in listing.splitlines()
                       if line.strip().startswith(f"{args.module}.x"))
        if not names:
            parser.error(f"mutmut lists no mutants of {args.module!r} (run `mutmut run` once to make them)")
        print("\n".join(random.Random(args.seed).sample(names, min(args.sample, len(names)))))
        return 0
    counts = collections.defaultdict(collections.Counter)
    survivors = []
    for line in listing.splitlines():
        if ": " not in line:
            continue
        name, status = line.strip().rsplit(": ", 1)
        module = name.split(".x")[0] if ".x" in name else name.rsplit(".", 1)[0]
        counts[module][status] += 1
        if status in LIVED:
            survivors.append(f"{name}: {status}")
    print(f"{'module':28s} {'mutants':>8s} {'killed':>7s} {'lived':>6s} {'unchecked':>10s} {'score':>7s}")
    total = collections.Counter()
    for module, c in sorted(counts.items()):
        killed, lived = sum(c[s] for s in KILLED), sum(c[s] for s in LIVED)
        unchecked = sum(c.values()) - killed - lived
        total.update(killed=killed, lived=lived, unchecked=unchecked, all=sum(c.values()))
        score = f"{killed / (killed + lived):.1%}" if killed + lived else "-"
        print(f"{module:28s} {sum(c.values()):8d} {killed:7d} {lived:6d} {unchecked:10d} {score:>7s}")
    if total["killed"] + total["lived"]:
        print(f"{'all':28s} {total['all']:8d} {total['killed']:7d} {total['lived']:6d} {total['unchecked']:10d} "
              f"{total['killed'] / (total['killed'] + total['lived']):>7.1%}")
    if args.survivors:
        print("\n".join(["", "survivors:"] + survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
