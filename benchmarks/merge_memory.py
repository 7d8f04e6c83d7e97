"""Peak memory and time of one split-point slerp merge of two 1e8-parameter models.

    python -m benchmarks.merge_memory [--params 100000000] [--leaves 24] [--cycles 30] [--rounds 3]

Every variant merges two float32 parent pytrees of --params parameters in --leaves
leaves of mixed shapes on one device:
  split_point_slerp   m2n2_jax.split_point_slerp (leaf-wise, the library's merge): a
                      leaf's (dot, |a|^2, |b|^2) in one pass (`merge.pair_reductions`:
                      rows of r coordinates along the leaf's LAST dimension, r the
                      largest divisor of it up to 128, one variadic `lax.reduce` over
                      the rows, then `jnp.sum` of the row sums), then the merge
  three_vdots         the same merge, per leaf three float32 `jnp.vdot`s (the
                      library's until issue 34, when an archive slot's angle read
                      the slot copied out, docs/scale.md)
  one_pass            the same merge, the three reductions of a leaf as ONE variadic
                      `lax.reduce` (one loop over the leaf in the compiled program;
                      on XLA:CPU a sequential float32 sum: see its reduction error)
  one_pass_blocked    one_pass on rows of 128 coordinates of the RAVELED leaf (one
                      variadic reduce over each row, then `jnp.sum` of the row sums, the
                      tail that fills no row by `jnp.vdot`): the same single loop, with
                      the sequential float32 sum cut to 128 terms
  norms_known         the same merge given |a|^2 and |b|^2 (as if the archive stored
                      each model's squared norm): only the dot product is reduced
  elementwise         a * x + b * y over the same pytrees (the floor: read 2, write 1)
  flat_ravel          the same merge on ravel_pytree vectors, unraveled back (what a
                      concatenated-vector implementation does)
Time: all variants are compiled in one process and called in --cycles cycles (each
cycle every variant once, in order), so a change of load on the machine hits them
alike; the ratio to the elementwise merge is taken within each cycle, and its median
and quartiles reported, with the median seconds per merge.
Memory: each variant then runs in its own process, --rounds times (interleaved), and
the median is reported. Peak memory is sampled from the process's resident set every
millisecond during --repeats merge calls; "extra" is the peak above the resident set
just before the first call (the parents, compiled code and runtime already counted), so
    peak multiple = (2 parents + extra) / one model's size;
glibc's mmap threshold is pinned at 1 MiB in these processes, so freed children leave
the resident set (their seconds per merge, kept in the JSON, then include mapping each
child anew, and are not the timing). XLA's own accounting of the compiled merge (arguments + outputs +
temporaries, from `compiled.memory_analysis()`) is reported beside it. Each variant's
child is checked against the library's (max |difference|), and the float32 reductions
of the library, three_vdots, one_pass and one_pass_blocked against float64
(relative errors).

Then the archive: XLA's accounting of one jitted M2N2 step (ask + tell, scores given,
the state donated so the archive is updated in place) on an archive of 20 models of
--archive-params parameters, as multiples of one model: the state itself is
20 models + scores, everything above it is the step's working memory.
Run it from the repository root (`-m`, as every benchmark; each child process is
`python -m benchmarks.merge_memory --one ...` or `--interleaved ...` run there).
Writes OUT/merge_memory.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np

if not __package__:  # run as a file: the child processes need the repository root
    raise SystemExit("run from the repository root as a module: python -m benchmarks.merge_memory")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the repository root: the child processes run there
VARIANTS = ("split_point_slerp", "three_vdots", "one_pass", "one_pass_blocked", "norms_known", "elementwise",
            "flat_ravel")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shapes(total: int, leaves: int) -> list[tuple[int, ...]]:
    """Leaf shapes of mixed ranks summing to `total` parameters."""
    out, left = [], total
    for i in range(leaves - 1):
        size = total // leaves
        if i % 3 == 0:
            out.append((size,))
        elif i % 3 == 1:
            out.append((size // 1000, 1000))
            size = (size // 1000) * 1000
        else:
            out.append((size // 4000, 40, 100))
            size = (size // 4000) * 4000
        left -= size
    return out + [(left,)]


def merge_with(reductions):
    """The library's split-point slerp (one group) with the angle from `reductions(a,
    b) -> (dot, |a|^2, |b|^2)`: the variants differ only in how they reduce."""
    import jax
    import jax.numpy as jnp

    from m2n2_jax.merge import coefficients_from_reductions

    def merge(a, b, w, k, *known):
        (ca_lo, ca_hi), (cb_lo, cb_hi) = coefficients_from_reductions(*reductions(a, b, *known),
                                                                      jnp.stack([w, 1.0 - w]))
        out, offset = {}, 0
        for name in a:
            x, y = a[name], b[name]
            index = offset + jax.lax.iota(jnp.int32, x.size).reshape(x.shape)
            before = index < k
            out[name] = jnp.where(before, ca_lo, ca_hi) * x + jnp.where(before, cb_lo, cb_hi) * y
            offset += x.size
        return out

    return merge


def one_pass_reductions(a, b):
    import jax
    import jax.numpy as jnp

    zero = jnp.float32(0)
    add3 = lambda p, q: (p[0] + q[0], p[1] + q[1], p[2] + q[2])
    parts = [jax.lax.reduce((x * y, x * x, y * y), (zero,) * 3, add3, tuple(range(x.ndim)))
             for x, y in zip(a.values(), b.values())]
    return tuple(sum(p[i] for p in parts) for i in range(3))


def one_pass_blocked_reductions(a, b, row: int = 128):
    """one_pass over rows of `row` coordinates, then the row sums summed by XLA's own
    reduction: the rows bound the sequential float32 sum (the tail of each leaf that
    does not fill a row is reduced the library's way)."""
    import jax
    import jax.numpy as jnp

    zero = jnp.float32(0)
    add3 = lambda p, q: (p[0] + q[0], p[1] + q[1], p[2] + q[2])
    totals = [jnp.float32(0)] * 3
    for x, y in zip(a.values(), b.values()):
        x, y = x.ravel(), y.ravel()
        body = (x.size // row) * row
        xs, ys = x[:body].reshape(-1, row), y[:body].reshape(-1, row)
        rows = jax.lax.reduce((xs * ys, xs * xs, ys * ys), (zero,) * 3, add3, (1,))
        tail = (x[body:], y[body:])
        parts = (jnp.sum(rows[0]) + jnp.vdot(*tail), jnp.sum(rows[1]) + jnp.vdot(tail[0], tail[0]),
                 jnp.sum(rows[2]) + jnp.vdot(tail[1], tail[1]))
        totals = [t + q for t, q in zip(totals, parts)]
    return tuple(totals)


def library_reductions(a, b):
    """What split_point_slerp reduces (`merge.pair_reductions` per leaf, summed over leaves)."""
    from m2n2_jax.merge import pair_reductions

    parts = [pair_reductions(x, y) for x, y in zip(a.values(), b.values())]
    return tuple(sum(p[i] for p in parts) for i in range(3))


def three_vdots_reductions(a, b):
    """Per leaf three float32 `jnp.vdot`s, summed over leaves."""
    import jax.numpy as jnp

    pairs = list(zip(a.values(), b.values()))
    return (sum(jnp.vdot(x, y) for x, y in pairs), sum(jnp.vdot(x, x) for x, _ in pairs),
            sum(jnp.vdot(y, y) for _, y in pairs))


def dot_only_reductions(a, b, aa, bb):
    import jax.numpy as jnp

    return sum(jnp.vdot(x, y) for x, y in zip(a.values(), b.values())), aa, bb


REDUCTIONS = {"split_point_slerp": library_reductions, "three_vdots": three_vdots_reductions,
              "one_pass": one_pass_reductions,
              "one_pass_blocked": one_pass_blocked_reductions}  # variants reducing (dot, |a|^2, |b|^2)


def parents(total: int, leaves: int):
    """Two float32 parent pytrees of `total` N(0, 1) parameters in `leaves` leaves."""
    import jax

    def make(key):
        keys = jax.random.split(key, leaves)
        return {f"leaf_{i:02d}": jax.jit(jax.random.normal, static_argnums=1)(k, s)
                for i, (k, s) in enumerate(zip(keys, shapes(total, leaves)))}

    a, b = make(jax.random.key(0)), make(jax.random.key(1))
    return jax.block_until_ready((a, b))


def build(variant: str, a, b, total: int):
    """(jitted merge, its arguments) of `variant` on the parents a and b."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import m2n2_jax as mj

    ratio, split = jnp.float32(0.3), jnp.int32(total // 3)
    if variant == "split_point_slerp":
        return jax.jit(mj.split_point_slerp), (a, b, ratio, split)
    if variant in ("three_vdots", "one_pass", "one_pass_blocked"):
        return jax.jit(merge_with(REDUCTIONS[variant])), (a, b, ratio, split)
    if variant == "norms_known":
        squared_norms = jax.jit(lambda t: sum(jnp.vdot(x, x) for x in t.values()))
        return jax.jit(merge_with(dot_only_reductions)), (a, b, ratio, split, squared_norms(a), squared_norms(b))
    if variant == "elementwise":
        return jax.jit(lambda a, b, w, k: jax.tree.map(lambda x, y: (1 - w) * x + w * y, a, b)), (a, b, ratio, split)

    def flat(a, b, w, k):
        va, unravel = ravel_pytree(a)
        vb, _ = ravel_pytree(b)
        return unravel(mj.split_point_slerp({"v": va}, {"v": vb}, w, k)["v"])
    return jax.jit(flat), (a, b, ratio, split)


def interleaved(variants, total: int, leaves: int, cycles: int) -> dict:
    """Seconds per merge of every variant, timed in one process in `cycles` cycles
    (each cycle calls every variant once, in order), so a change of load on the
    machine hits all variants alike; ratios are taken within each cycle."""
    import jax

    a, b = parents(total, leaves)
    compiled = {}
    for variant in variants:
        fn, args = build(variant, a, b, total)
        compiled[variant] = (fn.lower(*args).compile(), args)
        jax.block_until_ready(compiled[variant][0](*args))  # warm-up
    times = {variant: [] for variant in variants}
    for _ in range(cycles):
        for variant, (fn, args) in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[variant].append(time.perf_counter() - t)
    return times


def measure(variant: str, total: int, leaves: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import m2n2_jax as mj

    a, b = parents(total, leaves)
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(a))
    fn, args = build(variant, a, b, total)

    compiled = fn.lower(*args).compile()
    analysis = compiled.memory_analysis()
    xla_bytes = None if analysis is None else (
        analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes)

    base = rss()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    jax.block_until_ready(compiled(*args))  # warm-up (its child is freed right away)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        child = compiled(*args)
        jax.block_until_ready(child)
        times.append(time.perf_counter() - t)
        del child
    stop.set()
    sampler.join()
    extra = peak[0] - base
    library = jax.jit(mj.split_point_slerp)(*args[:4])  # (a, b, ratio, split) in every variant
    child = compiled(*args)
    difference = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(child), jax.tree.leaves(library)))
    del library, child
    reduction_error = None  # of (dot, |a|^2, |b|^2) against float64, where the variant reduces all three
    if variant in REDUCTIONS:
        got = np.array(jax.jit(REDUCTIONS[variant])(a, b), np.float64)
        exact = np.zeros(3)
        for x, y in zip(a.values(), b.values()):
            x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
            exact += (x @ y, x @ x, y @ y)
        reduction_error = (np.abs(got - exact) / np.abs(exact)).tolist()
    return {
        "variant": variant,
        "params": total,
        "leaves": leaves,
        "model_bytes": model_bytes,
        "extra_peak_bytes": extra,
        "peak_multiple": (2 * model_bytes + extra) / model_bytes,
        "xla_bytes": xla_bytes,
        "xla_multiple": None if xla_bytes is None else xla_bytes / model_bytes,
        "seconds_per_merge": float(np.median(times)),
        "times": times,
        "max_abs_difference_vs_library": difference,
        "reduction_relative_error": reduction_error,
    }


def archive_step(params: int, archive_size: int = 20, points: int = 1000) -> dict:
    """XLA memory accounting of one donated ask + tell on a full archive (M2N2 from
    scratch: split-point slerp and mutation)."""
    import jax
    import jax.numpy as jnp

    import m2n2_jax as mj

    algorithm = mj.M2N2(archive_size=archive_size, mutation=True)
    hyper = algorithm.default_params()
    template = {"w": jax.ShapeDtypeStruct((params // 1000, 1000), jnp.float32),
                "b": jax.ShapeDtypeStruct((params - (params // 1000) * 1000,), jnp.float32)}
    state = jax.eval_shape(lambda: mj.Archive(
        models=jax.tree.map(lambda t: jnp.zeros((archive_size,) + t.shape, t.dtype), template),
        scores=jnp.zeros((archive_size, points)), occupied=jnp.ones((archive_size,), bool)))

    def step(state, key, scores, hyper):
        key_ask, key_tell = jax.random.split(key)
        children, state = algorithm.ask(key_ask, state, hyper)
        return algorithm.tell(key_tell, state, children, scores[None], hyper)

    compiled = jax.jit(step, donate_argnums=0).lower(
        state, jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((points,), jnp.float32),
        hyper).compile()
    a = compiled.memory_analysis()
    model = 4 * params
    return {"archive_size": archive_size, "params": params, "points": points, "model_bytes": model,
            "argument_multiple": a.argument_size_in_bytes / model, "output_multiple": a.output_size_in_bytes / model,
            "alias_multiple": a.alias_size_in_bytes / model, "temp_multiple": a.temp_size_in_bytes / model}


def child(cmd: list[str], what: str, pin_mmap_threshold: bool = False):
    """The RESULT of `cmd` run in a fresh process. For the memory runs glibc's mmap
    threshold is pinned at 1 MiB: by default it grows after the first large free, and
    freed children then stay in the heap and inflate the sampled resident set. The
    timing leaves it alone: a pinned threshold maps (and page-faults) every child anew,
    which adds about 0.15 s per 381 MiB child here, a cost a loop that reuses its
    buffers does not pay."""
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(2**20)} if pin_mmap_threshold else {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-2000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT")][-1][6:])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=100_000_000)
    p.add_argument("--leaves", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5, help="timed merges per process (median kept)")
    p.add_argument("--rounds", type=int, default=3, help="processes per variant, interleaved")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--archive-params", type=int, default=10_000_000)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--cycles", type=int, default=30, help="cycles of the interleaved timing (one process)")
    p.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("RESULT" + json.dumps(measure(args.one, args.params, args.leaves, args.repeats)))
        return {}
    if args.interleaved:
        print("RESULT" + json.dumps(interleaved(args.variants, args.params, args.leaves, args.cycles)))
        return {}
    if "elementwise" not in args.variants:
        raise SystemExit("error: --variants must include elementwise (the ratios' denominator)")
    rounds = []
    cmd = [sys.executable, "-m", "benchmarks.merge_memory", "--interleaved", "--params", str(args.params),
           "--leaves", str(args.leaves), "--cycles", str(args.cycles), "--variants", *args.variants]
    cycle_times = child(cmd, "the interleaved timing")
    print(f"interleaved timing: {args.cycles} cycles done", flush=True)
    for r in range(args.rounds):
        rows = {}
        for variant in args.variants:
            cmd = [sys.executable, "-m", "benchmarks.merge_memory", "--one", variant, "--params", str(args.params),
                   "--leaves", str(args.leaves), "--repeats", str(args.repeats)]
            rows[variant] = child(cmd, variant, pin_mmap_threshold=True)
            print(f"round {r + 1}, {variant}: {rows[variant]['peak_multiple']:.2f}x model, "
                  f"{rows[variant]['seconds_per_merge']:.3f} s", flush=True)
        rounds.append(rows)
    summary = {}
    for variant in args.variants:
        ratios = [t / e for t, e in zip(cycle_times[variant], cycle_times["elementwise"])]
        pick = lambda key: float(np.median([rows[variant][key] for rows in rounds]))
        summary[variant] = {
            "seconds_per_merge": float(np.median(cycle_times[variant])), "peak_multiple": pick("peak_multiple"),
            "xla_multiple": rounds[0][variant]["xla_multiple"],
            "max_abs_difference_vs_library": max(rows[variant]["max_abs_difference_vs_library"] for rows in rounds),
            "reduction_relative_error": rounds[0][variant]["reduction_relative_error"],
            "time_ratio_vs_elementwise": float(np.median(ratios)),
            "time_ratio_quartiles": [float(q) for q in np.percentile(ratios, [25, 75])],
            "seconds_per_merge_per_process": [rows[variant]["seconds_per_merge"] for rows in rounds]}
    import jax
    step = archive_step(args.archive_params)
    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
        "jax_version": jax.__version__,
        "params": args.params, "leaves": args.leaves, "repeats": args.repeats, "rounds": args.rounds,
        "cycles": args.cycles, "cycle_times": cycle_times,
        "summary": summary,
        "rows": [row for rows in rounds for row in rows.values()],
        "archive_step": step,
    }
    model_mib = rounds[0]["elementwise"]["model_bytes"] / 2**20
    lines = [f"{args.params:,} float32 parameters in {args.leaves} leaves ({model_mib:.0f} MiB per model); "
             f"{record['machine']}, jax {jax.__version__}; memory: median of {args.rounds} processes per "
             f"variant; time: median of {args.cycles} interleaved cycles in one process (ratio quartiles)",
             f"{'variant':<20}{'peak (x model)':>16}{'XLA (x model)':>15}{'s / merge':>11}"
             f"{'/ elementwise':>15}{'quartiles':>14}{'max |diff|':>12}{'|a|^2 rel. error':>18}"]
    for variant, row in summary.items():
        xla = "-" if row["xla_multiple"] is None else f"{row['xla_multiple']:.2f}"
        spread = "{:.2f}-{:.2f}".format(*row["time_ratio_quartiles"])
        rel_error = ("-" if row["reduction_relative_error"] is None
                     else format(row["reduction_relative_error"][1], ".1e"))
        lines.append(f"{variant:<20}{row['peak_multiple']:>16.2f}{xla:>15}{row['seconds_per_merge']:>11.3f}"
                     f"{row['time_ratio_vs_elementwise']:>15.2f}{spread:>14}"
                     f"{row['max_abs_difference_vs_library']:>12.1e}"
                     f"{rel_error:>18}")
    lines.append(f"one donated M2N2 step (ask + tell) on an archive of {step['archive_size']} x "
                 f"{step['params']:,} params: arguments {step['argument_multiple']:.2f}x model, "
                 f"aliased (updated in place) {step['alias_multiple']:.2f}x, temporaries {step['temp_multiple']:.2f}x")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "merge_memory.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.out, "merge_memory.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
