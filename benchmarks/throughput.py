"""Forward passes per second: bare model evaluation vs the whole M2N2 loop, in one process.

    python benchmarks/throughput.py [--passes 5000] [--runs 10] [--out benchmarks/results]

Each of (a) and (b) is measured on one CPU device and on one device per core (forced
host devices, see experiments/cpu_devices.py), and the fastest of each is compared.
(a) the fastest bare jitted forward of the digits MLP over the 1,437 training images
    for `runs` models (vmap and lax.map over models);
(a+noise) the same plus drawing the D = 19,210 mutation normals per pass, the floor
    of any from-scratch implementation that uses JAX's PRNG;
(b) `m2n2_jax.run`: the full loop, `runs` seeds in one compiled call, default logging
    (every 100 passes), from scratch (mutation) and without mutation (pre-trained
    setting), seeds over lax.map and over vmap;
(c) a naive per-step Python loop (benchmarks/naive_m2n2.py), one seed.
Prints (b)/(a) and our speed-up over (c), and writes OUT/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_devices import use_all_cores  # noqa: E402

use_all_cores()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec  # noqa: E402

import m2n2_jax as mj  # noqa: E402
from common import device_name, digits_problem, run_keys  # noqa: E402
from m2n2_jax.models.mlp import random_params  # noqa: E402
from naive_m2n2 import naive_run  # noqa: E402


def time_call(fn, *args, repeats=5):
    """Best wall time of `repeats` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=int, default=5000, help="passes per seed for the timed M2N2 runs")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--naive-passes", type=int, default=1000)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    model, score_fn, train, test, _ = digits_problem()
    if args.runs < 1 or args.passes < 2:
        raise SystemExit("error: --runs must be >= 1 and --passes >= 2")
    init = lambda key: jax.vmap(lambda k: random_params(k, model, 64))(jax.random.split(key, 2))
    params = init(jax.random.key(0))
    models = jax.vmap(lambda k: random_params(k, model, 64))(jax.random.split(jax.random.key(1), args.runs))
    d = mj.num_params(jax.tree.map(lambda x: x[0], models))
    rows = {}

    devices = jax.local_devices()
    device_sets = [("1 device", devices[:1])] + ([(f"{len(devices)} devices", devices)] if len(devices) > 1 else [])

    # (a) bare forward over the training set, `runs` models per call, `reps` calls in one
    # jitted loop; over several devices the models are split with shard_map.
    reps = 50

    def bare(batch, devs, noise):
        def per_device(models, data, key):
            def one(m, k, i):
                if noise:
                    m = mj.gaussian_mutation(k, m, 0.01)
                else:  # a different model every pass, so XLA cannot hoist the forward
                    m = jax.tree.map(lambda x: x + 1e-9 * i.astype(x.dtype), m)
                return score_fn(m, data).sum()

            def body(i, acc):
                ks = jax.random.split(jax.random.fold_in(key, i), jax.tree.leaves(models)[0].shape[0])
                return acc + batch(lambda a: one(*a, i), (models, ks)).sum()

            return jax.lax.fori_loop(0, reps, body, 0.0)[None]

        mesh = Mesh(np.array(devs), ("runs",))
        r, rep = PartitionSpec("runs"), PartitionSpec()
        return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(r, rep, rep), out_specs=r, check_vma=False))

    batches = {"vmap": lambda f, xs: jax.vmap(f)(xs), "lax.map": jax.lax.map}
    for dev_label, devs in device_sets:
        for name, batch in batches.items():
            f = bare(batch, devs, noise=False)
            rows[f"(a) bare forward, {name} over models, {dev_label}"] = reps * args.runs / time_call(
                f, models, train, jax.random.key(2))
        f = bare(jax.lax.map, devs, noise=True)
        rows[f"(a+noise) bare forward + mutation noise, lax.map, {dev_label}"] = reps * args.runs / time_call(
            f, models, train, jax.random.key(2))

    # (b) the full loop through the public API (compiled once, then timed).
    keys = run_keys(42, args.runs)
    for dev_label, devs in device_sets:
        for label, std in [("from scratch", 0.01), ("no mutation", 0.0)]:
            for vectorize in ("map", "vmap"):
                algo = mj.m2n2(mj.Config(mutation_std=std))
                run = lambda passes: mj.run(keys, init, score_fn, train, passes, algo, test_data=test,
                                            vectorize=vectorize, devices=devs, steps_per_call=500, progress=False)
                run(502)  # compiles the same program (500 steps per call)
                result = run(args.passes)
                rows[f"(b) m2n2_jax.run, {label}, {vectorize} over seeds, {dev_label}"] = (
                    args.runs * args.passes / result.wall_seconds)

    # (c) naive per-step Python loop, one seed.
    config = mj.Config()
    naive_run(jax.random.key(0), params, score_fn, train, 50, config)  # compile
    _, _, seconds = naive_run(jax.random.key(0), params, score_fn, train, args.naive_passes, config)
    rows["(c) naive Python loop (1 seed, host sampling)"] = args.naive_passes / seconds

    best = lambda prefix: max(v for k, v in rows.items() if k.startswith(prefix))
    bare_best = best("(a) ")
    summary = {
        "ratio_loop_over_bare_forward": best("(b) m2n2_jax.run, from scratch") / bare_best,
        "ratio_loop_no_mutation_over_bare_forward": best("(b) m2n2_jax.run, no mutation") / bare_best,
        "ratio_loop_over_bare_forward_plus_noise": best("(b) m2n2_jax.run, from scratch") / best("(a+noise)"),
        "ratio_loop_over_bare_forward_1_device": best("(b) m2n2_jax.run, from scratch") / best("(a) bare forward, lax.map over models, 1 device"),
        "speedup_over_naive_loop": best("(b) m2n2_jax.run, from scratch") / rows["(c) naive Python loop (1 seed, host sampling)"],
    }
    width = max(map(len, rows))
    print(f"device: {device_name()}, jax {jax.__version__}, D = {d}, {args.runs} models/seeds")
    for name, value in rows.items():
        print(f"  {name:<{width}}  {value:8.0f} passes/s")
    for name, value in summary.items():
        print(f"  {name:<{width}}  {value:8.2f}")
    os.makedirs(args.out, exist_ok=True)
    record = {"passes_per_second": rows, **summary, "device": device_name(), "machine": platform.platform(),
              "jax_version": jax.__version__, "num_params": d, "runs": args.runs, "passes": args.passes}
    with open(os.path.join(args.out, "throughput.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
