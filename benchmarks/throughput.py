"""Forward passes per second: bare model evaluation vs the whole M2N2 loop, in one process.

    python -m benchmarks.throughput [--passes 5000] [--runs 10] [--alphas 8] [--out benchmarks/results]

Run it from the repository root (`-m`: it imports `experiments.harness` and
`benchmarks.naive_m2n2`). Each of (a) and (b) is measured on one CPU device and on one
device per core (`harness.use_cpu_devices`), and the fastest of each is compared.
(a) the fastest bare jitted forward of the digits MLP over the 1,437 training images
    for `runs` models (vmap and lax.map over models);
(a+noise) the same plus drawing the D = 19,210 mutation normals per pass with each
    `M2N2.mutation_rng` (threefry2x32, the default, and the other PRNGs); not a floor:
    the loop (b) has measured faster than this program (docs/throughput.md);
(b) `m2n2_jax.run`: the full loop, `runs` seeds in one compiled call (split over the
    mesh's "runs" axis, lax.map on each device), default logging (every 100 passes),
    from scratch (mutation, with each mutation RNG) and without mutation (pre-trained
    setting), all compiled first, then timed side by side in --rounds rounds (the best
    of each kept); and, for reference, `jit(vmap(mj.evolve))` over the seeds on one
    device (no logging);
(c) a naive per-step Python loop (benchmarks/naive_m2n2.py), one seed.
Then what the API's split into a static algorithm and traced `mj.M2N2Params` buys:
(d) compilation reuse: a second `mj.run` call with a new but equal `mj.M2N2(...)`
    value and the same score_fn, timed against the first (which compiles); the XLA
    compilations during each are counted;
(e) a sweep over `--alphas` values of alpha (0, 0.25, ...) as ONE
    `jit(vmap(mj.evolve))` over `mj.M2N2Params`, timed against the same runs one by one
    (`--alphas` calls of the jitted unbatched `mj.evolve`, and `--alphas` calls of
    `mj.run`), all on one device, compilation excluded (and reported apart).
Prints passes per second, (b)/(a) (for each mutation RNG), our speed-up over (c), (d)
and (e), and writes OUT/throughput.json (with `harness.machine()`).
"""

from __future__ import annotations

import argparse
import os
import time

if not __package__:  # run as a file: the imports below need the repository root on the path
    raise SystemExit("run from the repository root as a module: python -m benchmarks.throughput")

from experiments import harness

harness.use_cpu_devices()

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

import m2n2_jax as mj
from benchmarks.naive_m2n2 import naive_run
from m2n2_jax.mutation import MUTATION_RNGS
from m2n2_jax.tasks import digits

AXES = ("runs", "data")
score_fn = digits.classification_scores  # one object: equal algorithms then share compiled programs


def time_call(fn, *args, repeats=5):
    """Best wall time of `repeats` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def wall(fn, *args):
    """(seconds, value) of one call, waited for (`mj.run` waits itself: its RunResult is returned as is)."""
    t = time.perf_counter()
    out = fn(*args)
    if not isinstance(out, mj.RunResult):
        out = jax.block_until_ready(out)
    return time.perf_counter() - t, out


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring's compile-duration event)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.count += 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=int, default=5000, help="passes per seed for the timed M2N2 runs, seeds included")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--naive-passes", type=int, default=1000)
    p.add_argument("--alphas", type=int, default=8, help="alpha values of the sweep (e)")
    p.add_argument("--hidden", type=int, default=256, help="MLP hidden width (D = 75 * hidden + 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each bare forward (a), best kept")
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each loop (b), side by side, best kept")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if min(args.runs, args.alphas, args.repeats, args.rounds) < 1 or args.passes < 3 or args.naive_passes < 3:
        raise SystemExit("error: --runs, --alphas, --repeats and --rounds must be >= 1, "
                         "--passes and --naive-passes >= 3")
    counter = CompileCounter()

    train, test = digits.load_digits()
    init = lambda key: digits.init_mlp(key, args.hidden)
    seed_fn = lambda key: jax.vmap(init)(jax.random.split(key, 2))  # two seeds of a run, stacked
    seeds = seed_fn(jax.random.key(0))
    models = jax.vmap(init)(jax.random.split(jax.random.key(1), args.runs))
    d = mj.num_params(jax.tree.map(lambda x: x[0], models))
    keys = harness.run_keys(42, args.runs)
    steps = args.passes - 2  # 2 seeds, then one child per step
    rows, notes = {}, []

    devices = jax.local_devices()
    device_sets = [("1 device", devices[:1])] + ([(f"{len(devices)} devices", devices)] if len(devices) > 1 else [])

    # (d) first, so that its first call really compiles: a new but equal algorithm value.
    first_algorithm, second_algorithm = mj.M2N2(mutation=True), mj.M2N2(mutation=True)
    assert first_algorithm == second_algorithm and first_algorithm is not second_algorithm
    reuse = {}
    for label, algorithm in (("first", first_algorithm), ("second", second_algorithm)):
        before = counter.count
        seconds, result = wall(lambda: mj.run(algorithm, keys, score_fn, train, args.passes, seed_fn=seed_fn,
                                              test_data=test, progress=False))
        reuse[label] = (seconds, counter.count - before, result)
    (t1, c1, r1), (t2, c2, r2) = reuse["first"], reuse["second"]
    compilation = {
        "first_wall_seconds": t1, "second_wall_seconds": t2, "ratio_second_over_first": t2 / t1,
        "first_run_wall_seconds": r1.wall_seconds, "second_run_wall_seconds": r2.wall_seconds,
        "first_compilations": c1, "second_compilations": c2,
        "same_result": bool(np.array_equal(r1.test_score, r2.test_score)
                            and np.array_equal(r1.train_score, r2.train_score)),
        "mesh": "default", "runs": args.runs, "passes": args.passes,
    }

    # (a) bare forward over the training set, `runs` models per call, `reps` calls in one
    # jitted loop; over several devices the models are split with shard_map.
    reps = 50

    def bare(batch, devs, noise):
        """noise: None, or the mutation RNG drawing the noise of every pass."""
        def per_device(models, data, key):
            def one(m, k, i):
                if noise:
                    m = mj.gaussian_mutation(k, m, 0.01, noise)
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
        if args.runs % len(devs):
            notes.append(f"(a) on {dev_label} skipped: --runs {args.runs} is not a multiple of {len(devs)}")
            continue
        for name, batch in batches.items():
            f = bare(batch, devs, noise=None)
            rows[f"(a) bare forward, {name} over models, {dev_label}"] = reps * args.runs / time_call(
                f, models, train, jax.random.key(2), repeats=args.repeats)
        for rng in MUTATION_RNGS:
            f = bare(jax.lax.map, devs, noise=rng)
            rows[f"(a+noise) bare forward + mutation noise ({rng}), lax.map, {dev_label}"] = (
                reps * args.runs / time_call(f, models, train, jax.random.key(2), repeats=args.repeats))

    # (b) the full loop through the public API (each compiled by a short run, then
    # timed side by side: every variant once per round, the best round kept).
    per_call = min(500, steps)
    loops = [("from scratch", mj.M2N2(mutation=True)), ("no mutation", mj.M2N2(mutation=False))] + [
        (f"from scratch ({rng})", mj.M2N2(mutation=True, mutation_rng=rng)) for rng in MUTATION_RNGS[1:]]
    for dev_label, devs in device_sets:
        mesh = jax.make_mesh((len(devs), 1), AXES, devices=devs)
        run = lambda algorithm, passes: mj.run(algorithm, keys, score_fn, train, passes, seed_fn=seed_fn,
                                               test_data=test, mesh=mesh, steps_per_call=per_call, progress=False)
        for _, algorithm in loops:
            run(algorithm, 2 + per_call)  # compiles the same program (per_call steps per call)
        for _ in range(args.rounds):
            for label, algorithm in loops:
                name = f"(b) m2n2_jax.run, {label}, lax.map over seeds, {dev_label}"
                rows[name] = max(rows.get(name, 0.0),
                                 args.runs * args.passes / run(algorithm, args.passes).wall_seconds)

    # (b) for reference: vmap over the seeds of one device, no logging, no validation.
    algorithm = mj.M2N2(mutation=True)
    params = algorithm.default_params()

    def one_seed(key, params):
        key_seeds, key_init, key_evolve = jax.random.split(key, 3)
        state, _ = mj.init_state(algorithm, score_fn, key_init, seed_fn(key_seeds), params, train)
        state = mj.evolve(algorithm, score_fn, state, key_evolve, params, train, steps)
        return algorithm.best(state, params)[1]

    over_seeds = jax.jit(jax.vmap(one_seed, in_axes=(0, None)))
    rows["(b) jit(vmap(mj.evolve)) over seeds, no logging, 1 device"] = (
        args.runs * args.passes / time_call(over_seeds, keys, params, repeats=1))

    # (c) naive per-step Python loop, one seed.
    naive_run(jax.random.key(0), seeds, score_fn, train, 50, algorithm, params)  # compile
    _, _, seconds = naive_run(jax.random.key(0), seeds, score_fn, train, args.naive_passes, algorithm, params)
    rows["(c) naive Python loop (1 seed, host sampling)"] = args.naive_passes / seconds

    # (e) alpha sweep: one vmap over Params vs one run per alpha, all on device 0.
    alphas = 0.25 * np.arange(args.alphas, dtype=np.float32)
    sweep_params = jax.tree.map(lambda x: jnp.broadcast_to(x, (args.alphas,)), params).replace(
        alpha=jnp.asarray(alphas))
    one_params = [params.replace(alpha=jnp.float32(a)) for a in alphas]
    key_init, key_evolve = jax.random.split(jax.random.key(3))

    def one_alpha(params):
        state, _ = mj.init_state(algorithm, score_fn, key_init, seeds, params, train)
        state = mj.evolve(algorithm, score_fn, state, key_evolve, params, train, steps)
        model, train_score = algorithm.best(state, params)
        return train_score, score_fn(model, test).mean()

    sweep, single = jax.jit(jax.vmap(one_alpha)), jax.jit(one_alpha)
    vmap_first, _ = wall(sweep, sweep_params)
    vmap_warm, (vmap_train, vmap_test) = wall(sweep, sweep_params)
    single_first, _ = wall(single, one_params[0])
    t = time.perf_counter()
    singles = jax.block_until_ready([single(q) for q in one_params])
    single_warm = time.perf_counter() - t
    one_device = jax.make_mesh((1, 1), AXES, devices=devices[:1])
    run_alpha = lambda q: mj.run(algorithm, key_evolve, score_fn, train, args.passes, params=q,
                                 seed_models=[jax.tree.map(lambda x: x[i], seeds) for i in range(2)],
                                 test_data=test, mesh=one_device, progress=False)
    run_first, _ = wall(run_alpha, one_params[0])
    t = time.perf_counter()
    for q in one_params:
        run_alpha(q)
    run_warm = time.perf_counter() - t
    single_train = np.array([float(s[0]) for s in singles])
    alpha_sweep = {
        "alphas": alphas.tolist(), "passes_per_alpha": args.passes, "device": str(devices[0]),
        "vmap_seconds": vmap_warm, "vmap_first_call_seconds": vmap_first,
        "separate_evolve_seconds": single_warm, "separate_evolve_first_call_seconds": single_first,
        "separate_run_seconds": run_warm, "separate_run_first_call_seconds": run_first,
        "speedup_vmap_over_separate_evolve": single_warm / vmap_warm,
        "speedup_vmap_over_separate_run": run_warm / vmap_warm,
        "vmap_train_accuracy": np.asarray(vmap_train).tolist(), "vmap_test_accuracy": np.asarray(vmap_test).tolist(),
        "separate_evolve_train_accuracy": single_train.tolist(),
        "max_train_accuracy_difference_vmap_vs_separate": float(np.abs(single_train - np.asarray(vmap_train)).max()),
    }
    rows[f"(e) alpha sweep, one jit(vmap(mj.evolve)) over {args.alphas} Params, 1 device"] = (
        args.alphas * args.passes / vmap_warm)
    rows[f"(e) alpha sweep, {args.alphas} separate jit(mj.evolve) calls, 1 device"] = (
        args.alphas * args.passes / single_warm)
    rows[f"(e) alpha sweep, {args.alphas} separate mj.run calls, 1 device"] = args.alphas * args.passes / run_warm

    best = lambda prefix: max(v for k, v in rows.items() if k.startswith(prefix))
    bare_best = best("(a) ")
    loop = best("(b) m2n2_jax.run, from scratch,")
    summary = {
        "ratio_loop_over_bare_forward": loop / bare_best,
        "ratio_loop_no_mutation_over_bare_forward": best("(b) m2n2_jax.run, no mutation") / bare_best,
        "ratio_loop_over_bare_forward_plus_noise":
            loop / best("(a+noise) bare forward + mutation noise (threefry2x32)"),
        **{f"ratio_loop_{rng}_over_bare_forward": best(f"(b) m2n2_jax.run, from scratch ({rng})") / bare_best
           for rng in MUTATION_RNGS[1:]},
        "ratio_loop_over_bare_forward_1_device": (best("(b) m2n2_jax.run, from scratch, lax.map over seeds, 1 device")
                                                  / best("(a) bare forward, lax.map over models, 1 device")),
        "speedup_over_naive_loop": loop / rows["(c) naive Python loop (1 seed, host sampling)"],
    }
    width = max(map(len, rows))
    m = harness.machine()
    print(f"device: {m['device']} ({m['processor']}, {m['cores']} cores), jax {jax.__version__}, D = {d}, "
          f"{args.runs} models/seeds, {args.passes} passes per seed")
    for name, value in rows.items():
        print(f"  {name:<{width}}  {value:8.0f} passes/s")
    for name, value in summary.items():
        print(f"  {name:<{width}}  {value:8.2f}")
    print(f"  (d) mj.run with an equal new M2N2: first call {t1:.2f} s ({c1} compilations), second {t2:.2f} s "
          f"({c2} compilations), second / first = {t2 / t1:.3f}, same result: {compilation['same_result']}")
    print(f"  (e) {args.alphas} alphas x {args.passes} passes: one vmap {vmap_warm:.2f} s (first call "
          f"{vmap_first:.2f} s), separate jit(evolve) {single_warm:.2f} s ({single_warm / vmap_warm:.2f}x), "
          f"separate mj.run {run_warm:.2f} s ({run_warm / vmap_warm:.2f}x); max |train acc vmap - separate| "
          f"{alpha_sweep['max_train_accuracy_difference_vmap_vs_separate']:.4f}")
    for note in notes:
        print(f"  note: {note}")
    record = {"passes_per_second": rows, **summary, "compilation_reuse": compilation, "alpha_sweep": alpha_sweep,
              "num_params": d, "hidden": args.hidden, "runs": args.runs, "passes": args.passes,
              "naive_passes": args.naive_passes, "notes": notes}
    harness.write_json(os.path.join(args.out, "throughput.json"), record)


if __name__ == "__main__":
    main()
