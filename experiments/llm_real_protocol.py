"""The paper's LLM protocol on two real fine-tunes of SmolLM2-135M-Instruct
(experiments/llm_real.py; docs/llm_real.md).

Seeds: the arithmetic specialist (specialist-a) and the word-reversal specialist
(specialist-b), each the base plus its LoRA delta (llm_real_train), as whole float32
models. Every evolutionary method gets `forward_passes` evaluations per run, the two
seeds included, on the fitness questions (GSM8K training problems 0..1,318, the same
number per skill), no mutation:

- m2n2, m2n2-no-attraction, m2n2-no-splitpoint: archive `archive_size` (paper 15),
  whole parameter vectors merged (one group, no base, no task vectors), the first
  `warmup` children merged from random archive members; 0/1 scores, so c_j = 1;
- cma-es-slerp: CMA-ES over one slerp ratio per layer unit (embedding, 30 layers,
  head: 32 coefficients, as the paper's 32 for Llama-2-7B);
- task_arithmetic: base + scale (tau_a + tau_b) at the scale of its grid (0.3 .. 1.5,
  13 points, one evaluation each) that scores best on the fitness questions;
  deterministic, so one run;
- m2n2-task-vectors: our extension, M2N2 over the task vectors with a per-unit
  log-normal magnitude (outside the paper's comparison).

Each run runs alone (one `mj.run` per key): an archive of 15 float32 models is 8 GB,
two at once would not fit in 24 GB beside the rest. A method's score is the mean over
runs of the mean of the two skills' test accuracy (GSM8K test problems) of the model
it returns: the archive member (the algorithm's best for CMA-ES) with the best mean
of the skills on the fitness questions. Finished runs are kept in
`<out>/llm_real.partial.json`, and a run in progress whose state is small (a recipe
archive, CMA-ES) is checkpointed every CHECKPOINT_EVERY evaluations in
`<out>/checkpoints/<method>-run<r>` (removed once the run is kept), so an interrupted
protocol resumes where it stopped.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import time

import jax
import numpy as np

import m2n2_jax as mj
from experiments import harness, llm_real_data, lm_analysis, lm_operators, lm_protocol, methods
from m2n2_jax import host_memory
from m2n2_jax.llm import decode

PAPER = ("m2n2", "m2n2-no-attraction", "m2n2-no-splitpoint", "cma-es-slerp")
METHODS = PAPER + ("task_arithmetic", "m2n2-task-vectors")
SEEDS = ("base", "specialist-a", "specialist-b")
CHECKPOINT_EVERY = 50  # evaluations; a recipe archive's checkpoint is 10 kB here, CMA-ES's state as small


def llama_unit(path: str) -> str:
    """The layer unit of a `llama.Llama` leaf path: "embedding", "layers_NN" or "head"
    (final norm and lm_head)."""
    top = path.split("/")[1] if path.startswith("params/") else path.split("/")[0]
    if top == "embed_tokens":
        return "embedding"
    if re.fullmatch(r"layers_\d+", top):
        return top
    if top in ("norm", "lm_head"):
        return "head"
    raise ValueError(f"leaf {path!r} belongs to no unit (embedding, layers_NN, head)")


def release_host_memory(programs: bool = False) -> None:
    """Give the freed heap back to the system, and with `programs` drop the compiled
    programs too (after a method): glibc keeps freed memory, 9.7 GB stayed resident
    after one run here, and the next run's peak came on top (docs/llm_real.md)."""
    if programs:
        jax.clear_caches()
    gc.collect()
    host_memory.release()


def questions(tokenizer, count: int, source: str, seed: int) -> tuple[list, list, np.ndarray]:
    """(prompt ids, answer ids, (M,) skill index) of `count` questions per skill of `source`."""
    prompts, answers, skill = [], [], []
    for i, name in enumerate(llm_real_data.SKILLS):
        p, a = llm_real_data.encode(tokenizer, llm_real_data.questions(name, source, count, seed))
        prompts += p
        answers += a
        skill += [i] * len(p)
    return prompts, answers, np.asarray(skill)


def batches(tokenizer, count: int, source: str, seed: int) -> tuple[tuple, np.ndarray]:
    """(`decode.forced_batch` of `questions`, (M,) skill index), for `score_fn`."""
    prompts, answers, skill = questions(tokenizer, count, source, seed)
    return decode.forced_batch(prompts, answers, stop_tokens=[2], pad_id=2), skill  # 2: <|im_end|>


M2N2_METHODS = ("m2n2", "m2n2-no-attraction", "m2n2-no-splitpoint", methods.TASK_VECTORS)


def method_archive(name: str, archive: str) -> str:
    """The archive an M2N2 method keeps under `--archive`: m2n2-task-vectors keeps
    whole models (a task vector's magnitude scaling leaves the seeds' span)."""
    return "models" if name == methods.TASK_VECTORS else archive


def method_algorithm(spec, name: str, models: dict):
    """(algorithm, params) of evolutionary method `name` as the protocol runs it on
    `models` (base, specialist-a, specialist-b)."""
    settings = methods.Settings(
        m2n2=methods.M2N2Settings(mutation_std=0.0, archive_size=spec.archive_size, warmup=spec.warmup,
                                  archive=method_archive(name, spec.archive), max_children=spec.forward_passes - 2),
        task_vectors=methods.TaskVectorSettings(base=models["base"], groups=llama_unit,
                                                magnitude_std=spec.magnitude_std, task_vector_norm="union"),
        merge_es=methods.MergeESSettings(template=models["base"], groups=llama_unit, population=spec.population,
                                         std_init=spec.std_init))
    return methods.make_method(name, settings)


def evolve(spec, name: str, r: int, algo, params, seeds, score_fn, fitness, weights, checkpoint=None) -> mj.RunResult:
    """Run r of method `name` from the seeds (specialist-a, specialist-b), as the
    protocol runs it: the key of seed spec.seed + r, the returned model's fitness
    mean of the skills logged every spec.log_every evaluations."""

    def metrics_fn(state, params_, _test):
        return {"fitness_skill_mean": lm_protocol.returned_model(algo, state, params_, score_fn, fitness,
                                                                 weights)[1]}

    return mj.run(algo, harness.run_keys(spec.seed + r, 1), score_fn, fitness, spec.forward_passes, params=params,
                  seed_models=seeds, metrics_fn=metrics_fn, log_every=spec.log_every, checkpoint=checkpoint,
                  progress=not spec.no_progress, name=f"{name} run {r}")


def run_protocol(spec, model, models: dict, tokenizer, log=print) -> dict:
    """Every method of `spec.methods` on the pair: the record of llm_real.json."""
    t_start = time.perf_counter()
    names = llm_real_data.SKILLS
    score_fn = decode.forced_exact_match_scores(model)  # greedy decoding's exact match, without decoding
    fitness, fitness_skill = batches(tokenizer, spec.fitness_questions, "fitness", spec.data_seed)
    test, test_skill = batches(tokenizer, spec.test_questions, "test", spec.data_seed)
    weights, test_weights = lm_protocol.skill_weights(fitness_skill), lm_protocol.skill_weights(test_skill)
    scores = jax.jit(score_fn)

    def per_skill(params, batch, w) -> dict:
        return dict(zip(names, np.asarray(scores(params, batch) @ w).tolist()))

    partial_path = os.path.join(spec.out, "llm_real.partial.json")
    settings = json.loads(json.dumps(harness.result_fields(spec)))  # as read back: tuples become lists
    done = {}
    if os.path.exists(partial_path):
        with open(partial_path) as f:
            saved = json.load(f)
        if saved["settings"] == settings:
            done = saved["done"]
            log(f"resuming: {len(done)} finished entries in {partial_path}")

    def keep(key: str, value: dict):
        done[key] = value
        os.makedirs(spec.out, exist_ok=True)
        with open(partial_path + ".tmp", "w") as f:
            json.dump({"settings": settings, "done": done}, f)
        os.replace(partial_path + ".tmp", partial_path)

    for name in SEEDS:
        if name not in done:
            t = time.perf_counter()
            keep(name, {"test": per_skill(models[name], test, test_weights),
                        "fitness": per_skill(models[name], fitness, weights), "seconds": time.perf_counter() - t})
        log(f"{name}: test {done[name]['test']}, fitness {done[name]['fitness']}")

    timing = []  # seconds of one evaluation on the fitness questions, compiled
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(scores(models["specialist-a"], fitness))
        timing.append(time.perf_counter() - t)

    pair = {"specialist_a": models["specialist-a"], "specialist_b": models["specialist-b"], "base": models["base"]}
    keys = harness.run_keys(spec.seed, spec.runs)
    fitness_data = jax.device_put(fitness)
    for name in spec.methods:
        if name == "task_arithmetic":
            if name not in done:
                t = time.perf_counter()
                mean_fitness = lambda params, data: float(np.mean(list(per_skill(params, data, weights).values())))
                merged, chosen, grid_scores = lm_operators.best_merges(name, pair, mean_fitness, fitness_data,
                                                                       keys[:1])[0]
                keep(name, {"runs": [{"test": per_skill(merged, test, test_weights),
                                      "fitness": per_skill(merged, fitness, weights), "coefficients": chosen,
                                      "grid_fitness": grid_scores.tolist(), "evaluations": len(grid_scores),
                                      "seconds": time.perf_counter() - t}]})
            log(f"{name}: {done[name]['runs'][0]}")
            continue
        archive = method_archive(name, spec.archive)
        algo, params = method_algorithm(spec, name, models)
        seeds = [pair["specialist_a"], pair["specialist_b"]]

        # The run's state has a leading run axis: taking run 0 inside the jitted pick
        # reads one model of the archive, where x[0] outside would copy the archive.
        pick = jax.jit(lambda states, params_, algo=algo: lm_protocol.returned_model(
            algo, jax.tree.map(lambda x: x[0], states), params_, score_fn, fitness, weights)[0])
        for r in range(spec.runs):
            key = f"{name}/{r}"
            if key not in done:
                t = time.perf_counter()
                folder = os.path.abspath(os.path.join(spec.out, "checkpoints", f"{name}-run{r}"))
                # A model archive's checkpoint would be 8 GB on disk and as much again in
                # memory while written, beside a run that already fills this machine.
                small = archive == "recipes" or name in methods.MERGE_ES
                result = evolve(spec, name, r, algo, params, seeds, score_fn, fitness, weights,
                                checkpoint=mj.Checkpointing(folder, every=CHECKPOINT_EVERY, resume=True,
                                                            meta=settings, keep=1) if small else None)
                chosen = pick(result.state, params)
                keep(key, {"test": per_skill(chosen, test, test_weights),
                           "fitness": per_skill(chosen, fitness, weights),
                           "curve": {"forward_passes": result.passes.tolist(),
                                     "fitness_skill_mean": result.metrics["fitness_skill_mean"][0].tolist()},
                           "evolution_seconds": result.wall_seconds, "seconds": time.perf_counter() - t,
                           "evaluations": int(result.passes[-1]), "archive": archive})
                del result, chosen
                shutil.rmtree(folder, ignore_errors=True)  # kept in the partial file now
                release_host_memory()
            log(f"{name} run {r}: test {done[key]['test']}, {done[key]['evolution_seconds']:.0f} s")
        release_host_memory(programs=True)

    per_run = {s: [done[s]["test"]] for s in SEEDS}
    for name in spec.methods:
        runs = done[name]["runs"] if name == "task_arithmetic" else [done[f"{name}/{r}"] for r in range(spec.runs)]
        per_run[name] = [r["test"] for r in runs]
    reported = (*SEEDS, *spec.methods)
    runs, means, stderr = lm_analysis.summary(per_run, reported, names)
    evolution = [done[f"{m}/{r}"] for m in spec.methods if m != "task_arithmetic" for r in range(spec.runs)]
    evaluations = sum(e["evaluations"] for e in evolution)
    return {
        "skills": list(names),
        "test_skill_mean": {m: {"mean": means[m]["mean"], "stderr": stderr[m]["mean"], "runs": runs[m]["mean"]}
                            for m in reported},
        "test_score": {m: {s: {"mean": means[m][s], "stderr": stderr[m][s], "runs": runs[m][s]} for s in names}
                       for m in reported},
        "fitness_score": {s: done[s]["fitness"] for s in SEEDS},
        "curves": {m: [done[f"{m}/{r}"]["curve"] for r in range(spec.runs)] for m in spec.methods
                   if m != "task_arithmetic"},
        "task_arithmetic": done.get("task_arithmetic", {}).get("runs"),
        "seconds_per_evaluation": float(np.median(timing)),
        "seconds_per_evaluation_in_runs": (sum(e["evolution_seconds"] for e in evolution) / evaluations
                                           if evaluations else None),
        "evaluations": evaluations,
        "archive": {m: method_archive(m, spec.archive) for m in spec.methods if m in M2N2_METHODS},
        "fitness_questions_per_skill": spec.fitness_questions,
        "test_questions_per_skill": spec.test_questions,
        "wall_seconds": time.perf_counter() - t_start,
        "means": means, "stderr": stderr,
    }
