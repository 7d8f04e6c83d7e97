"""Seconds per forward pass and peak memory of M2N2 vs CMA-ES vs Sep-CMA-ES as D grows.

    python -m benchmarks.cost_scaling [--hidden 16 32 64 128 256 512] [--timeout 900]
    python -m benchmarks.cost_scaling --mnist      # the MNIST MLP's D = 203,530

D = 75 * hidden + 10 for the digits MLP (hidden 256: D = 19,210). --mnist instead
times the MNIST MLP 784 -> 256 -> 10 (`digits.init_mlp(..., inputs=784)`) on random inputs of the
digits' size (1,437 training and 360 test images of 784 uniform pixels, random labels:
the cost per pass does not depend on the data), M2N2 and Sep-CMA-ES only; for CMA-ES
it records the memory its state would need (C and B, two D x D float32 matrices)
instead of running it. Rows of other widths already in OUT/cost_scaling.json are kept
(a rerun replaces only the rows it measures). Each (method, width)
runs in its own subprocess, so its peak resident memory (ru_maxrss) is its own. The
time per pass excludes compilation: after a warm-up call, two budgets are run in the
same process and the difference is divided by the difference in passes (the seeds'
passes, 2 for M2N2 and 1 for the ES, cancel out). One run, ES population 20, the same
data, model and methods as experiments/from_scratch.py (experiments/methods.py), all
through `m2n2_jax.run`. A method whose child process exceeds --timeout is recorded as
such and larger widths of it are skipped. Run it from the repository root (`-m`: it
imports `experiments.methods`, and each child process is `python -m
benchmarks.cost_scaling --one ...` run there). Writes OUT/cost_scaling.json and
OUT/cost_scaling.png (log-log).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

if not __package__:  # run as a file: `experiments.methods` and the child processes need the repository root
    raise SystemExit("run from the repository root as a module: python -m benchmarks.cost_scaling")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the repository root: the child processes run there

METHODS = ("m2n2", "sep-cma-es", "cma-es")
POPULATION = 20  # ES models per generation


MNIST_SIZES = (784, 256, 10)


def mnist_like(key, hidden: int):
    """(train, test, init): random data of the digits' sizes with 784 inputs, and the
    MNIST MLP's seed initialiser (`init_mlp` with 784 inputs)."""
    import jax
    import jax.numpy as jnp

    from m2n2_jax.tasks import digits

    sizes = digits.widths(hidden, MNIST_SIZES[0])
    keys = jax.random.split(key, 4)
    data = [(jax.random.uniform(kx, (m, sizes[0]), jnp.float32), jax.random.randint(ky, (m,), 0, sizes[-1]))
            for m, kx, ky in ((1437, keys[0], keys[1]), (360, keys[2], keys[3]))]
    init = lambda k: digits.init_mlp(k, hidden, inputs=sizes[0])
    return data[0], data[1], init


def measure(method: str, hidden: int, generations: tuple[int, int], mnist: bool = False) -> dict:
    """In this process: seconds per pass and the process's peak memory."""
    import jax

    import m2n2_jax as mj
    from experiments import methods
    from m2n2_jax.tasks import digits

    if mnist:
        train, test, init = mnist_like(jax.random.key(1), hidden)
    else:
        train, test = digits.load_digits()
        init = lambda k: digits.init_mlp(k, hidden)
    template = init(jax.random.key(0))
    d = mj.num_params(template)
    passes = [POPULATION * g for g in generations]
    budgets = [passes[0]] + passes  # the first call warms up (one-time costs) and is dropped
    # As experiments/from_scratch.py: M2N2 from two random seeds (one child per step),
    # the ES from one (sigma_0 = 0.01, a population of 20 per step); seeds cost S passes.
    num_seeds = 2 if method == "m2n2" else 1
    settings = methods.Settings(es=methods.ESSettings(template=template, population=POPULATION))
    algorithm, params = methods.make_method(method, settings)
    seed_fn = lambda key: jax.vmap(init)(jax.random.split(key, num_seeds))
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
    return {"method": method, "inputs": MNIST_SIZES[0] if mnist else digits.INPUTS, "hidden": hidden,
            "num_params": d, "seconds_per_pass": seconds, "peak_rss_bytes": peak, "walls": walls, "passes": passes}


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
    p.add_argument("--mnist", action="store_true", help="the MNIST MLP 784 -> 256 -> 10 instead of --hidden")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "HIDDEN"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), tuple(args.generations), args.mnist)))
        return
    from m2n2_jax.tasks import digits

    os.makedirs(args.out, exist_ok=True)
    inputs = MNIST_SIZES[0] if args.mnist else digits.INPUTS
    rows, skip = [], set()
    for hidden in [MNIST_SIZES[1]] if args.mnist else sorted(args.hidden):
        d = digits.num_params(digits.widths(hidden, inputs))
        for method in args.methods:
            if method in skip:
                rows.append({"method": method, "inputs": inputs, "hidden": hidden,
                             "skipped": "a smaller width timed out"})
                continue
            if args.mnist and method == "cma-es":  # C and B: two D x D float32 matrices
                rows.append({"method": method, "inputs": inputs, "hidden": hidden, "num_params": d,
                             "not_run": "its state alone would not fit in memory",
                             "state_bytes_c_and_b": 2 * 4 * d * d})
                print(f"{method:<11} D {d:>7}  not run: C and B need {2 * 4 * d * d / 1e9:.0f} GB", flush=True)
                continue
            cmd = [sys.executable, "-m", "benchmarks.cost_scaling", "--one", method, str(hidden),
                   "--generations", *map(str, args.generations)] + (["--mnist"] if args.mnist else [])
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True, cwd=ROOT)
                row = json.loads(out.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                row = {"method": method, "inputs": inputs, "hidden": hidden, "timed_out_seconds": args.timeout}
                skip.add(method)
            except subprocess.CalledProcessError as e:
                row = {"method": method, "inputs": inputs, "hidden": hidden,
                       "failed": e.stderr.strip().splitlines()[-1:]}
                skip.add(method)
            rows.append(row)
            shown = (f"{row['seconds_per_pass'] * 1e3:9.3f} ms/pass  {row['peak_rss_bytes'] / 2**30:6.2f} GiB"
                     if "seconds_per_pass" in row else json.dumps({k: v for k, v in row.items()
                                                                  if k not in ("method", "inputs", "hidden")}))
            print(f"{method:<11} hidden {hidden:>4}  D {d:>7}  {shown}", flush=True)
            if "seconds_per_pass" in row:
                save(rows, args.out)
    save(rows, args.out, final=True)


def save(rows: list[dict], out: str, final: bool = False) -> None:
    """Write OUT/cost_scaling.json: the rows already there that `rows` does not measure
    again (same method, inputs and hidden width), then `rows`; plot them at the end."""
    from m2n2_jax.tasks import digits

    path = os.path.join(out, "cost_scaling.json")
    key = lambda r: (r["method"], r.get("inputs", digits.INPUTS), r["hidden"])  # rows before --mnist: digits
    old = json.load(open(path))["rows"] if os.path.exists(path) else []
    new = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new] + rows
    record = {"rows": merged}
    if final:
        import jax

        record.update(jax_version=jax.__version__, cores=os.cpu_count())
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    if final:
        plot(merged, os.path.join(out, "cost_scaling.png"))


if __name__ == "__main__":
    main()
