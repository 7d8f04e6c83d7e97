"""M2N2 with P children per step on the digits protocol: passes per second and accuracy.

    python -m benchmarks.population_size [--children 1 4 16] [--runs 10] [--passes 50000]
        [--seed 42] [--mutation-rng threefry2x32] [--out benchmarks/results]

From scratch as experiments/from_scratch.py (runs seed .. seed + R - 1, two N(0, 0.01^2)
seeds per run, archive 20, mutation std 0.01, the 1,437 training images), every value
of P through `m2n2_jax.run` with the default mesh (one CPU device per core), so P = 1
is the protocol's M2N2 run bit for bit:
(1) speed, side by side in this process: for each P a run of --speed-passes passes per
    seed (one compiled call, compiled by a first run), timed in --speed-rounds rounds
    (P = 1, 4, 16, then again), passes/s and its ratio to P = 1 within each round;
(2) accuracy at equal passes: one run of --passes passes per seed for each P, the
    final test accuracy (mean and standard error over the runs) and its wall time
    (--speed-only keeps those of OUT/population_size.json, measured with the same
    settings, and reruns (1) alone).
Run it from the repository root (`-m`: it imports `experiments.harness` and
`experiments.methods`). Writes OUT/population_size.json (with `harness.machine()`)
and .txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

if not __package__:  # run as a file: the imports below need the repository root on the path
    raise SystemExit("run from the repository root as a module: python -m benchmarks.population_size")

from experiments import harness

harness.use_cpu_devices()

import jax
import numpy as np

import m2n2_jax as mj
from experiments import methods
from m2n2_jax.mutation import MUTATION_RNGS
from m2n2_jax.tasks import digits

score_fn = digits.classification_scores  # one object: equal algorithms share compiled programs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--children", type=int, nargs="+", default=[1, 4, 16], help="values of P")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--passes", type=int, default=50_000, help="passes per run for the accuracy, seeds included")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--speed-passes", type=int, default=2 + 1_600, help="passes per run of each timed run")
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--mutation-rng", default="threefry2x32", choices=MUTATION_RNGS)
    p.add_argument("--speed-only", action="store_true", help="rerun (1), keep (2) from OUT/population_size.json")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if min(args.children) < 1 or args.runs < 1 or args.speed_rounds < 1:
        raise SystemExit("error: --children, --runs and --speed-rounds must be >= 1")
    if min(args.passes, args.speed_passes) < 2 + max(args.children):
        raise SystemExit(f"error: --passes and --speed-passes must be >= 2 + {max(args.children)}")

    path, accuracy = os.path.join(args.out, "population_size.json"), {}
    if args.speed_only:
        old = json.load(open(path))
        if any(old[k] != getattr(args, k) for k in ("runs", "seed", "passes", "mutation_rng")) or any(
                str(c) not in old["accuracy"] for c in args.children):
            raise SystemExit(f"error: {path} was measured with other settings")
        accuracy = {c: old["accuracy"][str(c)] for c in args.children}

    train, test = digits.load_digits()
    seed_fn = lambda key: jax.vmap(lambda k: digits.init_mlp(k, 256))(jax.random.split(key, 2))
    keys = harness.run_keys(args.seed, args.runs)
    protocol, params = methods.make_method("m2n2", methods.Settings())  # archive 20, mutation std 0.01
    algorithms = {c: dataclasses.replace(protocol, population_size=c, mutation_rng=args.mutation_rng)
                  for c in args.children}

    def run(c, passes, steps_per_call=None):
        return mj.run(algorithms[c], keys, score_fn, train, passes, params=params, seed_fn=seed_fn, test_data=test,
                      steps_per_call=steps_per_call, progress=False)

    # (1) speed: each P's whole run is one compiled call (compiled by the first run).
    calls = {c: (args.speed_passes - 2) // c for c in args.children}
    for c in args.children:
        run(c, args.speed_passes, calls[c])
    speed = {c: [] for c in args.children}
    for _ in range(args.speed_rounds):
        for c in args.children:
            passes = 2 + calls[c] * c
            speed[c].append(args.runs * passes / run(c, args.speed_passes, calls[c]).wall_seconds)
    base = args.children[0]
    ratios = {c: [s / b for s, b in zip(speed[c], speed[base])] for c in args.children}

    # (2) accuracy at equal passes.
    for c in [] if args.speed_only else args.children:
        result = run(c, args.passes)
        final = result.final_test_score
        accuracy[c] = {"final_test_accuracy": final.tolist(), "mean": float(final.mean()),
                       "stderr": float(final.std(ddof=1) / np.sqrt(len(final))) if len(final) > 1 else float("nan"),
                       "passes": int(result.passes[-1]), "wall_seconds": result.wall_seconds,
                       "passes_per_second": args.runs * int(result.passes[-1]) / result.wall_seconds}
        print(f"P = {c}: final test accuracy {accuracy[c]['mean']:.4f} ± {accuracy[c]['stderr']:.4f} "
              f"({result.wall_seconds:.0f} s)", flush=True)

    m = harness.machine()
    lines = [f"{m['device']} ({m['processor']}, {m['cores']} cores), jax {jax.__version__}; digits from scratch, "
             f"{args.runs} runs from seed {args.seed}, mutation RNG {args.mutation_rng}",
             f"speed: {args.speed_passes} passes per run, {args.speed_rounds} rounds side by side (median, range); "
             f"accuracy: {args.passes} passes per run",
             f"{'P':>3}{'passes/s':>10}{'/ P=' + str(base):>9}{'range':>12}{'test accuracy':>22}{'wall s':>9}"]
    for c in args.children:
        a = accuracy[c]
        spread = f"{min(ratios[c]):.2f}-{max(ratios[c]):.2f}"
        acc = f"{a['mean']:.4f} ± {a['stderr']:.4f}"
        lines.append(f"{c:>3}{np.median(speed[c]):>10.0f}{np.median(ratios[c]):>9.2f}{spread:>12}{acc:>22}"
                     f"{a['wall_seconds']:>9.0f}")
    print("\n".join(lines))
    record = {"children": args.children, "runs": args.runs, "seed": args.seed, "passes": args.passes,
              "speed_passes": args.speed_passes, "speed_rounds": args.speed_rounds, "mutation_rng": args.mutation_rng,
              "passes_per_second": {str(c): v for c, v in speed.items()},
              "ratio_to_first": {str(c): v for c, v in ratios.items()},
              "accuracy": {str(c): v for c, v in accuracy.items()}}
    record = harness.write_json(path, record)
    with open(os.path.join(args.out, "population_size.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return record


if __name__ == "__main__":
    main()
