"""Peak memory and time of one split-point slerp merge of two 1e8-parameter models.

    python benchmarks/merge_memory.py [--params 100000000] [--leaves 24] [--repeats 5]

Each variant runs in its own subprocess on one device with two float32 parent pytrees
of --params parameters in --leaves leaves of mixed shapes:
  split_point_slerp   m2n2_jax.split_point_slerp (leaf-wise, the library's merge)
  elementwise         a * x + b * y over the same pytrees (the floor: read 2, write 1)
  flat_ravel          the same merge on ravel_pytree vectors, unraveled back (what a
                      concatenated-vector implementation does)
Peak memory is sampled from the process's resident set every millisecond during the
merge calls; "extra" is the peak above the resident set just before the first call
(the parents, compiled code and runtime already counted), so
    peak multiple = (2 parents + extra) / one model's size.
XLA's own accounting of the compiled merge (arguments + outputs + temporaries, from
`compiled.memory_analysis()`) is reported beside it. Time per merge is the median of
--repeats calls after a warm-up.

Then the archive: XLA's accounting of one jitted M2N2 step (ask + tell, scores given,
the state donated so the archive is updated in place) on an archive of 20 models of
--archive-params parameters, as multiples of one model: the state itself is
20 models + scores, everything above it is the step's working memory.
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

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("split_point_slerp", "elementwise", "flat_ravel")


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


def measure(variant: str, total: int, leaves: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.flatten_util import ravel_pytree

    import m2n2_jax as mj

    def make(key):
        keys = jax.random.split(key, leaves)
        return {f"leaf_{i:02d}": jax.jit(jax.random.normal, static_argnums=1)(k, s)
                for i, (k, s) in enumerate(zip(keys, shapes(total, leaves)))}

    a = make(jax.random.key(0))
    b = make(jax.random.key(1))
    jax.block_until_ready((a, b))
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(a))
    ratio, split = jnp.float32(0.3), jnp.int32(total // 3)

    if variant == "split_point_slerp":
        fn = jax.jit(mj.split_point_slerp)
        args = (a, b, ratio, split)
    elif variant == "elementwise":
        fn = jax.jit(lambda a, b, w, k: jax.tree.map(lambda x, y: (1 - w) * x + w * y, a, b))
        args = (a, b, ratio, split)
    else:
        def flat(a, b, w, k):
            va, unravel = ravel_pytree(a)
            vb, _ = ravel_pytree(b)
            child = mj.split_point_slerp({"v": va}, {"v": vb}, w, k)["v"]
            return unravel(child)
        fn = jax.jit(flat)
        args = (a, b, ratio, split)

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
        params=jax.tree.map(lambda t: jnp.zeros((archive_size,) + t.shape, t.dtype), template),
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=100_000_000)
    p.add_argument("--leaves", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--archive-params", type=int, default=10_000_000)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("RESULT" + json.dumps(measure(args.one, args.params, args.leaves, args.repeats)))
        return {}
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--one", variant, "--params", str(args.params),
               "--leaves", str(args.leaves), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][6:]))
        print(f"{variant}: {rows[-1]['peak_multiple']:.2f}x model, {rows[-1]['seconds_per_merge']:.3f} s", flush=True)
    by = {r["variant"]: r for r in rows}
    import jax
    step = archive_step(args.archive_params)
    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
        "jax_version": jax.__version__,
        "rows": rows,
        "archive_step": step,
        "time_ratio_vs_elementwise": by["split_point_slerp"]["seconds_per_merge"] / by["elementwise"]["seconds_per_merge"],
        "flat_time_ratio_vs_elementwise": by["flat_ravel"]["seconds_per_merge"] / by["elementwise"]["seconds_per_merge"],
    }
    lines = [f"{args.params:,} float32 parameters in {args.leaves} leaves ({rows[0]['model_bytes'] / 2**20:.0f} MiB "
             f"per model); {record['machine']}, jax {jax.__version__}",
             f"{'variant':<20}{'peak (x model)':>16}{'XLA (x model)':>15}{'s / merge':>11}"]
    for r in rows:
        xla = "-" if r["xla_multiple"] is None else f"{r['xla_multiple']:.2f}"
        lines.append(f"{r['variant']:<20}{r['peak_multiple']:>16.2f}{xla:>15}{r['seconds_per_merge']:>11.3f}")
    lines.append(f"time ratio split_point_slerp / elementwise: {record['time_ratio_vs_elementwise']:.2f} "
                 f"(flat_ravel / elementwise: {record['flat_time_ratio_vs_elementwise']:.2f})")
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
