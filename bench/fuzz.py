"""Fuzzing benchmark: thousands of seeded mutations of the samples through the read and
flatten step (what each file costs the pipeline), by outcome.

    python bench/fuzz.py [--count 5000] [--seed 11] [--slowest 10]

Prints how many mutants became a row and how many failed, by error type, and the
slowest mutants (name, mutation, outcome, milliseconds). The mutations are those of
``tests/test_fuzz.py`` (byte flips, truncations, inserted and deleted bytes, corrupted
length fields); the same seed gives the same files. Nothing it prints quotes a value.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.test_fuzz import mutants, outcome  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--slowest", type=int, default=10)
    args = parser.parse_args(argv)

    by_outcome: collections.Counter = collections.Counter()
    by_mutation: collections.Counter = collections.Counter()
    timings = []
    started = time.monotonic()
    for name, kind, data in mutants(args.count, args.seed):
        began = time.perf_counter()
        result, _message = outcome(data)
        timings.append((time.perf_counter() - began, name, kind, result))
        by_outcome[result] += 1
        by_mutation[kind] += 1
    total = time.monotonic() - started

    print(f"{args.count:,} mutants (seed {args.seed}) in {total:.1f} s "
          f"({args.count / total:,.0f}/s); every one a row or a classified failure")
    print("outcomes:")
    for result, count in by_outcome.most_common():
        print(f"  {result:<32} {count:>7,}")
    print("mutations: " + ", ".join(f"{kind} {count:,}" for kind, count in sorted(by_mutation.items())))
    print(f"slowest {args.slowest}:")
    for seconds, name, _kind, result in sorted(timings, reverse=True)[: args.slowest]:
        print(f"  {seconds * 1000:8.1f} ms  {name}  → {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
