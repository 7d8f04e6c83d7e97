"""Evolution from scratch on the digits task (SPEC.md; the paper's left panel).

    python experiments/from_scratch.py --method m2n2 --runs 10 --forward-passes 50000 \
        --seed 42 --out experiments/results/from_scratch

writes OUT/METHOD.json (see common.result_record for the fields).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_devices import use_all_cores  # noqa: E402

use_all_cores()

import jax  # noqa: E402

import m2n2_jax as mj  # noqa: E402
from common import digits_problem, result_record, run_keys, write_json  # noqa: E402
from m2n2_jax.models.mlp import random_params  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="m2n2", help=f"one of: {', '.join(mj.METHODS)}")
    p.add_argument("--runs", type=int, default=10, help="independent runs (seeds)")
    p.add_argument("--forward-passes", type=int, default=50_000, help="budget per run, seeds included")
    p.add_argument("--seed", type=int, default=42, help="first seed; runs use seed .. seed+runs-1")
    p.add_argument("--out", default="experiments/results/from_scratch", help="output directory")
    p.add_argument("--hidden", type=int, default=256, help="MLP hidden width (paper: 256)")
    p.add_argument("--archive-size", type=int, default=20)
    p.add_argument("--mutation-std", type=float, default=0.01)
    p.add_argument("--log-every", type=int, default=100, help="log every this many passes")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.method not in mj.METHODS:
        raise SystemExit(f"error: unknown method {args.method!r}; choose one of {', '.join(mj.METHODS)}")
    if args.runs < 1:
        raise SystemExit(f"error: --runs must be >= 1, got {args.runs}")
    model, score_fn, train, test, descriptor_fn = digits_problem(args.hidden)
    input_dim = train[0].shape[1]
    seed_models = lambda key: jax.vmap(lambda k: random_params(k, model, input_dim))(jax.random.split(key, 2))
    try:
        algo = mj.make_method(
            args.method, mutation_std=args.mutation_std, archive_size=args.archive_size, descriptor_fn=descriptor_fn
        )
        result = mj.run(
            run_keys(args.seed, args.runs), seed_models, score_fn, train, args.forward_passes, algo,
            test_data=test, log_every=args.log_every, progress=not args.no_progress,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    seeds = list(range(args.seed, args.seed + args.runs))
    record = result_record(
        args.method, seeds, result, experiment="from_scratch", hidden=args.hidden,
        num_params=mj.num_params(jax.tree.map(lambda x: x[0], result.best_params)),
        archive_size=args.archive_size, mutation_std=args.mutation_std,
    )
    path = os.path.join(args.out, f"{args.method}.json")
    write_json(path, record)
    print(f"{args.method}: final test accuracy {record['final_test_accuracy_mean']:.4f} "
          f"± {record['final_test_accuracy_stderr']:.4f} (stderr, {args.runs} runs), "
          f"{result.wall_seconds:.1f} s -> {path}")
    return record


if __name__ == "__main__":
    main()
