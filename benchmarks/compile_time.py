"""Compile time and memory of M2N2's step against the number of a model's leaves.

    python -m benchmarks.compile_time [--leaves 34 68 136 272] [--rounds 2]

A model of L float32 leaves of shape (64, 64) (SmolLM2-135M has 272 leaves, a
Llama-2-7B 291, a 70B 723); `runner.lower_step` compiles `run`'s step for it, as
`mj.memory_plan` does (M2N2, archive 6, split-point slerp, a score of one
multiply-add: the merge dominates) from shapes alone, so the process's peak resident
set is the compiler's. Two variants, in fresh processes, interleaved over --rounds:
  once    the library: the slerp angle's sums computed once (`merge.once`)
  fused   `merge.once` replaced by a plain call, as before: XLA:CPU copies the L-term
          sums into each of the L leaves' fusions
Reported: the median seconds to lower and compile, the peak resident set, and the
compiled program's instruction count. Writes OUT/compile_time.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

if not __package__:
    raise SystemExit("run from the repository root as a module: python -m benchmarks.compile_time")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = ("once", "fused")


def measure(variant: str, num_leaves: int) -> dict:
    """Compile the step once in this process: seconds, peak resident GB, instructions."""
    import jax
    import jax.numpy as jnp

    import m2n2_jax as mj
    from m2n2_jax import merge
    from m2n2_jax.layout import lay_out
    from m2n2_jax.runner import lower_step

    if variant == "fused":
        merge.once = lambda fn, *arrays: fn(*arrays)
    model = {f"w{i:04d}": jax.ShapeDtypeStruct((64, 64), jnp.float32) for i in range(num_leaves)}
    seeds = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2,) + x.shape, x.dtype), model)
    algorithm = mj.M2N2(archive_size=6, mutation=False)
    score_fn = lambda m, x: jnp.clip(x[:, 0] + 0.0 * m["w0000"][0, 0], 0.0, 1.0)
    data = jax.ShapeDtypeStruct((8, 3), jnp.float32)
    t = time.perf_counter()
    layout = lay_out(algorithm, score_fn, seeds, data, params=algorithm.default_params())
    compiled = lower_step(layout).compile()  # what mj.memory_plan compiles
    seconds = time.perf_counter() - t
    text = compiled.as_text()
    return {"seconds": seconds, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "instructions": sum(line.lstrip().startswith("%") for line in text.splitlines())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--leaves", type=int, nargs="+", default=[34, 68, 136, 272])
    p.add_argument("--rounds", type=int, default=2, help="processes per variant and size (median)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # a child process: VARIANT LEAVES
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return {}
    if args.rounds < 1 or min(args.leaves) < 1:
        p.error("--rounds and --leaves must be >= 1")
    runs = {(v, n): [] for n in args.leaves for v in VARIANTS}
    for _ in range(args.rounds):
        for n in args.leaves:
            for v in VARIANTS:
                out = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", "--one", v, str(n)], cwd=ROOT,
                                     capture_output=True, text=True, check=True).stdout
                runs[v, n].append(json.loads(out.strip().splitlines()[-1]))
                print(v, n, runs[v, n][-1], flush=True)
    import jax

    rows = [{"variant": v, "leaves": n, **{k: float(np.median([r[k] for r in runs[v, n]]))
                                            for k in ("seconds", "peak_gb", "instructions")}}
            for (v, n) in runs]
    record = {"benchmark": "compile_time", "rows": rows, "rounds": args.rounds,
              "command": "python -m benchmarks.compile_time " + " ".join(argv or sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
              "jax": jax.__version__}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compile_time.json"), "w") as f:
        json.dump(record, f, indent=1)
    lines = [f"M2N2 step compile (median of {args.rounds} processes), {record['machine']}, jax {jax.__version__}",
             f"{'leaves':>6} {'variant':>7} {'seconds':>8} {'peak GB':>8} {'instructions':>12}"]
    lines += [f"{r['leaves']:>6} {r['variant']:>7} {r['seconds']:>8.1f} {r['peak_gb']:>8.2f} {r['instructions']:>12.0f}"
              for r in rows]
    with open(os.path.join(args.out, "compile_time.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
