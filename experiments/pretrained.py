"""Merging two pre-trained specialists on digits (SPEC.md; the paper's right panel).

    python experiments/pretrained.py --method m2n2 --runs 10 --forward-passes 10000 \
        --seed 42 --out experiments/results/pretrained

The archive starts from the specialist on digits 0-4 and the one on 5-9
(experiments/specialists.py, cached with orbax); no method mutates. `brute-force`
evaluates `--forward-passes` evenly spaced slerp ratios between the two specialists and
reports the best one on training data as a flat line (identical in every run).
Writes OUT/METHOD.json with the fields of experiments/from_scratch.py.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_devices import use_all_cores  # noqa: E402

use_all_cores()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import m2n2_jax as mj  # noqa: E402
from common import check_args, digits_problem, evolve, make_parser, save  # noqa: E402
from m2n2_jax.baselines.brute_force import slerp_ratio_search  # noqa: E402
from specialists import CACHE, HALVES, half_accuracy, load_or_train  # noqa: E402

METHODS = ("m2n2", "m2n2-no-attraction", "m2n2-no-splitpoint", "ga", "map-elites", "brute-force")


def brute_force(args, score_fn, train, test, specialists) -> tuple[mj.RunResult, float]:
    """The best-on-train slerp ratio, as a RunResult whose curve is flat, and the ratio."""
    t0 = time.perf_counter()
    ratios, train_scores = slerp_ratio_search(*specialists, score_fn, train, args.forward_passes)
    best = int(np.argmax(np.asarray(train_scores)))
    merged = mj.slerp(*specialists, ratios[best])
    test_acc = float(score_fn(merged, test).mean())
    passes = np.arange(0, args.forward_passes + 1, args.log_every)[1:]
    if passes.size == 0 or passes[-1] != args.forward_passes:
        passes = np.append(passes, args.forward_passes)
    shape = (args.runs, passes.size)
    return mj.RunResult(
        passes=passes, test_accuracy=np.full(shape, test_acc), train_accuracy=np.full(shape, float(train_scores[best])),
        state=None, best_params=jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], args.runs, 0), merged),
        wall_seconds=time.perf_counter() - t0,
    ), float(ratios[best])


def main(argv=None) -> dict:
    parser = make_parser(__doc__, METHODS, 10_000, "experiments/results/pretrained", 0.0)
    parser.add_argument("--train-steps", type=int, default=10, help="Adam steps of each specialist (SPEC: 10)")
    parser.add_argument("--specialist-init", choices=("paper", "key"), default="paper",
                        help="the paper's exact starting models, or a draw from --specialist-seed")
    parser.add_argument("--specialist-seed", type=int, default=0)
    parser.add_argument("--cache", default=CACHE, help="where the trained specialists are kept (orbax)")
    args = parser.parse_args(argv)
    check_args(args, METHODS)
    model, score_fn, train, test, descriptor_fn = digits_problem(args.hidden)
    specialists = load_or_train(model, train, args.hidden, steps=args.train_steps,
                                init=args.specialist_init, seed=args.specialist_seed, cache=args.cache)
    info = {
        "train_steps": args.train_steps,
        "specialist_init": args.specialist_init if args.specialist_init == "paper" else f"key {args.specialist_seed}",
        "specialists_test_accuracy": [float(score_fn(s, test).mean()) for s in specialists],
        "specialists_half_test_accuracy": [[half_accuracy(model, s, test, h) for h in HALVES] for s in specialists],
    }
    if args.method == "brute-force":
        if args.checkpoint_every is not None or args.resume is not None:
            raise SystemExit("error: brute-force is one grid search: it has nothing to checkpoint")
        if args.forward_passes < 2:
            raise SystemExit(f"error: forward_passes must be >= 2, got {args.forward_passes}")
        result, ratio = brute_force(args, score_fn, train, test, specialists)
        return save(args, "pretrained", result, best_ratio=ratio, **info)
    return evolve(args, "pretrained", specialists, score_fn, train, test, descriptor_fn, **info)


if __name__ == "__main__":
    main()
