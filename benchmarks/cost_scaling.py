"""Seconds per forward pass and peak memory of M2N2 vs CMA-ES vs Sep-CMA-ES as D grows.

    python benchmarks/cost_scaling.py [--hidden 16 32 64 128 256 512] [--timeout 900]

D = 75 * hidden + 10 for the digits MLP (hidden 256: D = 19,210). Each (method, width)
runs in its own subprocess, so its peak resident memory (ru_maxrss) is its own. The
time per pass excludes compilation: after a warm-up call, two budgets are run in the
same process and the difference is divided by the difference in passes (the seeds'
passes, 2 for M2N2 and 1 for the ES, cancel out). One run, ES population 20, the same
data, model and methods as experiments/from_scratch.py (m2n2_jax.tasks.methods), all
through `m2n2_jax.run`. A method whose child process exceeds
--timeout is recorded as such and larger widths of it are skipped. Writes
OUT/cost_scaling.json and OUT/cost_scaling.png (log-log).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

METHODS = ("m2n2", "sep-cma-es", "cma-es")
POPULATION = 20  # ES models per generation


def measure(method: str, hidden: int, generations: tuple[int, int]) -> dict:
    """In this process: seconds per pass and the process's peak memory."""
    import jax

    import m2n2_jax as mj
    from m2n2_jax.tasks import digits, methods

    train, test = digits.load_digits()
    template = digits.init_mlp(jax.random.key(0), hidden)
    d = mj.num_params(template)
    passes = [POPULATION * g for g in generations]
    budgets = [passes[0]] + passes  # the first call warms up (one-time costs) and is dropped
    # As experiments/from_scratch.py: M2N2 from two random seeds (one child per step),
    # the ES from one (sigma_0 = 0.01, a population of 20 per step); seeds cost S passes.
    num_seeds = 2 if method == "m2n2" else 1
    algorithm, params = methods.make_method(method, methods.Settings(population=POPULATION, template=template))
    seed_fn = lambda key: jax.vmap(lambda k: digits.init_mlp(k, hidden))(jax.random.split(key, num_seeds))
    steps_per_call = POPULATION if method == "m2n2" else 1  # the same compiled call for both budgets
    keys = jax.random.key(42)[None]
    walls = []
    for p in budgets:
        result = mj.run(algorithm, keys, digits.classification_scores, train, num_seeds + p, params=params,
                        seed_fn=seed_fn, test_data=test, steps_per_call=steps_per_call, progress=False)
        walls.append(result.wall_seconds)
    walls = walls[1:]
    seconds = (walls[1] - walls[0]) / (passes[1] - passes[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "hidden": hidden, "num_params": d, "seconds_per_pass": seconds,
            "peak_rss_bytes": peak, "walls": walls, "passes": passes}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        done = [r for r in rows if r["method"] == method and "seconds_per_pass" in r]
        if done:
            d = [r["num_params"] for r in done]
            axes[0].loglog(d, [r["seconds_per_pass"] for r in done], "o-", label=method)
            axes[1].loglog(d, [r["peak_rss_bytes"] / 2**30 for r in done], "o-", label=method)
    axes[0].set_ylabel("seconds per forward pass")
    axes[1].set_ylabel("peak process memory (GiB)")
    for ax in axes:
        ax.set_xlabel("parameters D")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--generations", type=int, nargs=2, default=[2, 4],
                   help="the two budgets, in generations of 20 passes, whose difference is timed")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per (method, width)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--one", nargs=2, metavar=("METHOD", "HIDDEN"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), tuple(args.generations))))
        return
    os.makedirs(args.out, exist_ok=True)
    rows, skip = [], set()
    for hidden in sorted(args.hidden):
        for method in args.methods:
            if method in skip:
                rows.append({"method": method, "hidden": hidden, "skipped": "a smaller width timed out"})
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--one", method, str(hidden),
                   "--generations", *map(str, args.generations)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                row = {"method": method, "hidden": hidden, "timed_out_seconds": args.timeout}
                skip.add(method)
            except subprocess.CalledProcessError as e:
                row = {"method": method, "hidden": hidden, "failed": e.stderr.strip().splitlines()[-1:]}
                skip.add(method)
            rows.append(row)
            shown = (f"{row['seconds_per_pass'] * 1e3:9.3f} ms/pass  {row['peak_rss_bytes'] / 2**30:6.2f} GiB"
                     if "seconds_per_pass" in row else json.dumps({k: v for k, v in row.items()
                                                                  if k not in ("method", "hidden")}))
            print(f"{method:<11} hidden {hidden:>4}  D {row.get('num_params', 75 * hidden + 10):>7}  {shown}",
                  flush=True)
            if "seconds_per_pass" in row:
                with open(os.path.join(args.out, "cost_scaling.json"), "w") as f:
                    json.dump({"rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "cost_scaling.json"), "w") as f:
        import jax
        json.dump({"rows": rows, "jax_version": jax.__version__, "cores": os.cpu_count()}, f, indent=1)
    plot(rows, os.path.join(args.out, "cost_scaling.png"))


if __name__ == "__main__":
    main()
