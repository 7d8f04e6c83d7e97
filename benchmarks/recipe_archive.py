"""The recipe archive against the model archive: memory, speed and checkpoints on the
real SmolLM2 pair, and memory plans of the paper's Llama-2-7B pair.

    python -m benchmarks.recipe_archive smollm2 [--evaluations 20] [--rounds 1] [--questions 100]
    python -m benchmarks.recipe_archive plans
    python -m benchmarks.recipe_archive step
    python -m benchmarks.recipe_archive glibc [--evaluations 15] [--rounds 1] [--questions 100]

smollm2: M2N2 as the LLM protocol runs it (experiments/llm_real.py: archive 15,
warm-up 13, no mutation, --questions fitness questions per skill, exact match scored
without decoding) on the
arithmetic and word-reversal specialists of SmolLM2-135M-Instruct (float32), once with
`archive="models"` and once with `archive="recipes"`, each in a fresh process,
interleaved over --rounds. Per process: the peak resident set, the median seconds of a
step after the first (one evaluation: ask, score, tell; one step per compiled call),
the seconds of `ask` alone (parents, merge, the child built) and of scoring alone, and
the bytes of a checkpoint of the final state (orbax, as `run` saves it: a recipe
archive's seeds left out). Peak resident set: at the end of the run
(the figure reported), and after loading, the checkpoint and the timings (`_by_phase`). One
CPU device, as the protocol runs. The seeds are donated to the run (`donate_seeds`):
it holds their only copy.
`make smollm2` first.

plans: `mj.memory_plan` of one step for Llama-2-7B (benchmarks/fixtures), archive 15,
bfloat16, one device, no model axis, no host archive: recipes and models.

step: the SmolLM2 step program alone, compiled from shapes (`mj.lower_step`, as
`mj.memory_plan` does) in a fresh process per variant: each archive kind with a score
that reads every weight once ("weights") and with the teacher-forced exact-match
scorer at 100 questions per skill ("forced"). Per variant: seconds to compile, XLA's
temporaries, and the resident set that the compiled program keeps (after compiling,
less before, once `malloc_trim(0)` has returned the freed heap on glibc).

glibc: the smollm2 recipe process twice, interleaved over --rounds, without and with
glibc told to return freed memory to the system (GLIBC_THRESHOLDS in the child's
environment: freed blocks of 128 kB and more are unmapped, and the heap's free top is
trimmed), for the peak resident set and the seconds per evaluation side by side. The
library and the experiments set neither.

Each writes its section of OUT/recipe_archive.json (default benchmarks/results),
keeping the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

if not __package__:
    raise SystemExit("run from the repository root as a module: python -m benchmarks.recipe_archive")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ARCHIVES = ("models", "recipes")
ARCHIVE_SIZE, WARMUP = 15, 13


def m2n2(archive: str, max_children: int):
    """(algorithm, params): M2N2 as the LLM protocol runs it, with `archive`."""
    from experiments import methods

    settings = methods.Settings(m2n2=methods.M2N2Settings(
        mutation_std=0.0, archive_size=ARCHIVE_SIZE, warmup=WARMUP, archive=archive, max_children=max_children))
    return methods.make_method("m2n2", settings)


def in_fresh_process(*argv: str, env: dict | None = None) -> tuple[dict, int]:
    """(the last JSON line printed, exit code) of `python -m benchmarks.recipe_archive ARGV`,
    with `env` added to this process's environment."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.recipe_archive", *argv], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, **(env or {})})
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{' '.join(argv)}: exit {out.returncode}: {out.stderr[-2000:]}")
    return json.loads(lines[-1]), out.returncode


def median_of(rows: list[dict], field: str, value: str, key: str) -> float | None:
    """The median of `key` over the processes whose `field` is `value`; None where none
    got that far (e.g. killed for memory: see `processes`)."""
    values = [r[key] for r in rows if r[field] == value and key in r]
    return float(np.median(values)) if values else None


def measure(archive: str, evaluations: int, questions: int) -> dict:
    """In this process: one M2N2 run of `evaluations` children on the SmolLM2 pair."""
    import jax
    import orbax.checkpoint as ocp

    import m2n2_jax as mj
    from experiments import llm_real, llm_real_protocol
    from m2n2_jax.archive import without_seeds
    from m2n2_jax.llm import decode

    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    phases = {}
    net, base, tokenizer = llm_real.base_model()
    models = llm_real.specialists(base, llm_real.SPECIALISTS)
    fitness, _ = llm_real_protocol.batches(tokenizer, questions, "fitness", 0)
    score_fn = decode.forced_exact_match_scores(net)
    algo, params = m2n2(archive, evaluations)
    seeds = [models["specialist-a"], models["specialist-b"]]
    del models, base
    phases["loaded"] = peak()
    result = mj.run(algo, jax.random.key(42), score_fn, fitness, 2 + evaluations, params=params, seed_models=seeds,
                    donate_seeds=True, log_every=1, steps_per_call=1, progress=False)
    phases["run"] = peak()
    del seeds
    steps = np.diff(result.log_wall_seconds[1:])  # each step's own call; the first one compiles
    record = {"archive": archive, "evaluations": evaluations, "seconds_per_evaluation": float(np.median(steps[1:])),
              "peak_rss_bytes": phases["run"], "peak_rss_bytes_by_phase": phases,
              "final_train_score": float(result.final_train_score[0]), "wall_seconds": result.wall_seconds}
    print(json.dumps(record), flush=True)  # each phase's record as it ends: a process killed later keeps these
    # Run 0 selected inside jit: outside, x[0] would copy the whole archive.
    ask = jax.jit(lambda states, k: algo.ask(k, jax.tree.map(lambda x: x[0], states), params)[0])
    score = jax.jit(score_fn)
    child = jax.tree.map(lambda x: x[0], ask(result.state, jax.random.key(0)))
    timed = {"ask": lambda i: ask(result.state, jax.random.key(i)), "score": lambda i: score(child, fitness)}
    for name, fn in timed.items():
        jax.block_until_ready(fn(0))
        times = []
        for i in range(3):
            t = time.perf_counter()
            jax.block_until_ready(fn(i + 1))
            times.append(time.perf_counter() - t)
        record[f"{name}_seconds"] = float(np.median(times))
    phases["timing"] = peak()
    print(json.dumps(record), flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # what a checkpoint of the run holds: its state, seeds aside
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, "state"), without_seeds(result.state))
        checkpointer.wait_until_finished()
        record["checkpoint_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
    phases["checkpoint"] = peak()
    return record


def compile_step(archive: str, score: str) -> dict:
    """In this process: compile the SmolLM2 step of `archive` with `score` from shapes."""
    import jax
    import jax.numpy as jnp

    from experiments import llm_real, llm_real_protocol
    from m2n2_jax import host_memory
    from m2n2_jax.layout import lay_out
    from m2n2_jax.llm import decode
    from m2n2_jax.runner import lower_step

    def resident() -> int:
        host_memory.release()
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    net, base, tokenizer = llm_real.base_model()
    fitness, _ = llm_real_protocol.batches(tokenizer, 100, "fitness", 0)
    score_fn = decode.forced_exact_match_scores(net) if score == "forced" else (
        lambda model, batch: sum(jnp.sum(x) for x in jax.tree.leaves(model)) * jnp.ones(batch[1].shape[0]))
    algo, params = m2n2(archive, 200)
    seeds = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2,) + x.shape, jnp.float32), base)
    layout = lay_out(algo, score_fn, seeds, fitness, params=params, num_runs=1)
    del base
    before, t = resident(), time.perf_counter()
    compiled = lower_step(layout, 1).compile()
    seconds = time.perf_counter() - t
    return {"archive": archive, "score": score, "compile_seconds": seconds,
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
            "program_resident_bytes": resident() - before}


def step(args) -> dict:
    rows = []
    for archive in ARCHIVES:
        for score in ("weights", "forced"):
            rows.append(in_fresh_process("--compile-one", archive, score)[0])
            print(rows[-1], flush=True)
    return {"variants": rows, "loadavg": os.getloadavg(), "command": "python -m benchmarks.recipe_archive step"}


def smollm2(args) -> dict:
    rows = []
    for _ in range(args.rounds):
        for archive in ARCHIVES:
            record, exit_code = in_fresh_process("--one", archive, str(args.evaluations), str(args.questions))
            rows.append({**record, "exit_code": exit_code})
            print(rows[-1], flush=True)
    keys = ("peak_rss_bytes", "seconds_per_evaluation", "checkpoint_bytes", "ask_seconds", "score_seconds")
    median = lambda archive, key: median_of(rows, "archive", archive, key)
    return {"archive_size": ARCHIVE_SIZE, "warmup": WARMUP, "fitness_questions_per_skill": args.questions,
            "evaluations": args.evaluations, "rounds": args.rounds,
            **{k: {a: median(a, k) for a in ARCHIVES} for k in keys},
            "recipes_over_models_seconds_per_evaluation": median("recipes", "seconds_per_evaluation")
            / median("models", "seconds_per_evaluation"), "processes": rows, "loadavg": os.getloadavg(),
            "command": "python -m benchmarks.recipe_archive smollm2 " + " ".join(
                f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("evaluations", "rounds", "questions"))}


GLIBC_THRESHOLDS = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def glibc(args) -> dict:
    rows = []
    for _ in range(args.rounds):
        for name, env in (("default", {}), ("thresholds", GLIBC_THRESHOLDS)):
            record, exit_code = in_fresh_process("--one", "recipes", str(args.evaluations), str(args.questions),
                                                 env=env)
            rows.append({**record, "glibc": name, "exit_code": exit_code})
            print(rows[-1], flush=True)
    return {"thresholds": GLIBC_THRESHOLDS, "evaluations": args.evaluations, "rounds": args.rounds,
            "fitness_questions_per_skill": args.questions,
            **{k: {n: median_of(rows, "glibc", n, k) for n in ("default", "thresholds")}
               for k in ("peak_rss_bytes", "seconds_per_evaluation")},
            "processes": rows, "loadavg": os.getloadavg(),
            "command": f"python -m benchmarks.recipe_archive glibc --evaluations {args.evaluations} "
                       f"--rounds {args.rounds} --questions {args.questions}"}


def plans(args) -> dict:
    from benchmarks import model_sharding

    config = json.load(open(model_sharding.LLAMA_2_7B))
    out = {}
    for name, recipes in (("llama-2-7b-archive-15-bf16-1x80GB", args.evaluations),
                          ("llama-2-7b-archive-15-bf16-1x80GB-models", None)):
        plan = model_sharding.llama_plan(config, archive=ARCHIVE_SIZE, dtype="bfloat16", mesh_shape=(1, 1, 1),
                                         archive_memory="device", capacity_gb=80, points=1319, seq_len=512, chunk=8,
                                         recipes=recipes)
        out[name] = {**plan, "devices": 1}
        print(model_sharding.show(name, plan), flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=("smollm2", "plans", "step", "glibc"))
    p.add_argument("--evaluations", type=int, default=20, help="children per run (plans: the recipes' max_children, "
                                                               "default 1,000)")
    p.add_argument("--rounds", type=int, default=1, help="processes per archive kind (median)")
    p.add_argument("--questions", type=int, default=100, help="smollm2: fitness questions per skill (the protocol's "
                                                              "at the paper's budget shape)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # a child process: ARCHIVE EVALUATIONS QUESTIONS
    p.add_argument("--compile-one", nargs=2, help=argparse.SUPPRESS)  # a child process: ARCHIVE SCORE
    args = p.parse_args(argv)
    if args.compile_one:
        print(json.dumps(compile_step(*args.compile_one)))
        return {}
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), int(args.one[2]))))
        return {}
    if args.what is None:
        p.error("say what to measure: smollm2, plans, step or glibc")
    if args.what == "plans" and "--evaluations" not in (argv or sys.argv):
        args.evaluations = 1000
    import jax

    from experiments import harness

    path = os.path.join(args.out, "recipe_archive.json")
    record = json.load(open(path)) if os.path.exists(path) else {}
    record[args.what] = {"smollm2": smollm2, "plans": plans, "step": step, "glibc": glibc}[args.what](args)
    record[args.what]["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                    f"{jax.devices()[0].platform}; jax {jax.__version__}")
    record[args.what]["commit"] = harness.commit()
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"-> {path}")
    return record


if __name__ == "__main__":
    main()
