"""Are two result JSONs the same runs? Compares, bit for bit, every run's logged test
and training curves on the passes both logged (a short rerun against a recorded long
one), and the seeds.

    python experiments/same_curves.py experiments/results/from_scratch/m2n2.json /tmp/short/m2n2.json

Prints one line per pair and exits 1 if any differ.
"""

from __future__ import annotations

import json
import sys


def compare(recorded: dict, rerun: dict) -> tuple[bool, int]:
    """(identical, points compared per run) on the common prefix of the logged passes."""
    passes_a, passes_b = recorded["curve"]["forward_passes"], rerun["curve"]["forward_passes"]
    n = min(len(passes_a), len(passes_b))
    if passes_a[:n] != passes_b[:n] or recorded["seeds"][:len(rerun["seeds"])] != rerun["seeds"]:
        return False, 0
    runs = len(rerun["seeds"])
    same = all(a[:n] == b[:n] for a, b in zip(recorded["test_accuracy_runs"][:runs], rerun["test_accuracy_runs"]))
    if runs == len(recorded["seeds"]):  # the mean curve is over the same runs
        same &= recorded["curve"]["train_accuracy_mean"][:n] == rerun["curve"]["train_accuracy_mean"][:n]
    return same, n


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or len(args) % 2:
        raise SystemExit("usage: same_curves.py RECORDED.json RERUN.json [RECORDED.json RERUN.json ...]")
    status = 0
    for recorded, rerun in zip(args[::2], args[1::2]):
        with open(recorded) as a, open(rerun) as b:
            same, n = compare(json.load(a), json.load(b))
        print(f"{'identical' if same else 'DIFFERENT'}: {rerun} vs {recorded} ({n} logged points per run)")
        status |= not same
    return status


if __name__ == "__main__":
    sys.exit(main())
