"""M2N2 on two Hugging Face Llama checkpoints, scored on GSM8K as the paper scores it
(experiments/llm_real.py merge; docs/llm_real.md, "Two 7B checkpoints").

    python experiments/llm_real.py merge --model-a A_DIR --model-b B_DIR --prompt alpaca \\
        --mesh 1,1,8 --archive-memory pinned_host --dtype bfloat16 [--plan]

The paper's split: fitness on the first `--fitness-problems` GSM8K training problems
(1,319), the model returned (the archive's best on fitness) scored on the first
`--test-problems` test problems (1,319); chain-of-thought generation of up to
`--max-new-tokens`, the final number matched exactly (`m2n2_jax.llm.gsm8k`). M2N2
as in the paper's LLM experiment: archive 15, whole parameter vectors, no mutation,
`--warmup` random merges first.

Each run is one `m2n2-merge` (m2n2_jax.llm.merge_command, docs/llm_merge.md) of a
config made from these flags (`config`; the problems written to OUT/gsm8k.jsonl), so
each writes a complete model, its report.json and curves to OUT/merged
(OUT/merged-runN with several runs); OUT/gsm8k_merge.json gathers the test accuracies
and the fitness curves. Runs are made one after another (the mesh's runs count is 1).

`--plan` loads no weight: it reads A_DIR/config.json, compiles one step of the run
from abstract shapes on the mesh (`mj.memory_plan`), prints the per-device memory and
writes it to OUT/plan.json (prompts of --prompt-length columns; a run pads them to the
longest), so a user sees whether the run fits before loading 2 x 13 GB. Planning for 8 GPUs
on a CPU needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

import m2n2_jax as mj
from m2n2_jax.llm import decode, gsm8k, hf, llama

GIB = 2**30


def parse(argv):
    p = argparse.ArgumentParser(prog="llm_real.py merge", description=__doc__.split("\n")[0])
    p.add_argument("--model-a", required=True, help="Hugging Face Llama checkpoint directory (seed A)")
    p.add_argument("--model-b", help="the other checkpoint (seed B); not needed with --plan")
    p.add_argument("--prompt", default="alpaca", choices=("alpaca", "chatml"), help="how a problem is asked")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--forward-passes", type=int, default=1000, help="evaluations per run, seeds included (paper)")
    p.add_argument("--archive-size", type=int, default=15)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--fitness-problems", type=int, default=1319)
    p.add_argument("--test-problems", type=int, default=1319)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--prompt-length", type=int, default=320, help="prompt columns (longer prompts are refused)")
    p.add_argument("--chunk-size", type=int, default=64, help="problems generated at once")
    p.add_argument("--mesh", default="1,1,1", help="runs,data,model device counts")
    p.add_argument("--archive-memory", default="device", choices=("device", "pinned_host"))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--plan", action="store_true", help="print the per-device memory plan and exit")
    p.add_argument("--out", default="experiments/results/llm_real/merge")
    args = p.parse_args(argv)
    for name in ("runs", "forward_passes", "archive_size", "fitness_problems", "test_problems", "max_new_tokens",
                 "prompt_length", "chunk_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.forward_passes < 3:
        p.error("--forward-passes must be >= 3 (the two seeds and one child)")
    try:
        args.mesh = tuple(int(n) for n in args.mesh.split(","))
        assert len(args.mesh) == 3 and min(args.mesh) >= 1
    except (ValueError, AssertionError):
        p.error(f"--mesh must be three counts runs,data,model, got {args.mesh!r}")
    if not args.plan and not args.model_b:
        p.error("--model-b is needed to run (only --plan works from one config)")
    if not args.plan and args.mesh[0] != 1:
        p.error(f"--mesh: runs are made one after another (m2n2-merge): its runs count must be 1, got {args.mesh}")
    return args


def main(argv) -> dict:
    args = parse(argv)
    if args.plan:
        return plan(args)
    from m2n2_jax.llm import merge_command

    t0 = time.perf_counter()
    data = write_problems(args)
    reports = [merge_command.merge(merge_command.validate(config(args, data, run))) for run in range(args.runs)]
    record = {"experiment": "gsm8k_merge", "model_a": args.model_a, "model_b": args.model_b,
              "test_accuracy": {"model-a": reports[0]["seeds"][0]["test"], "model-b": reports[0]["seeds"][1]["test"],
                                "m2n2": [r["merged"]["test"] for r in reports]},
              "fitness_curve": {"forward_passes": reports[0]["curves"]["evaluations"],
                                "train_score": [r["curves"]["best_fitness"] for r in reports]},
              "models": [r["settings"]["output"] for r in reports],
              "seconds": time.perf_counter() - t0, "settings": {k: v for k, v in vars(args).items()}}
    with open(os.path.join(args.out, "gsm8k_merge.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record["test_accuracy"]))
    return record


def write_problems(args) -> str:
    """OUT/gsm8k.jsonl: the first --fitness-problems training problems, then the first
    --test-problems test problems (the command's fitness rows, then its test rows)."""
    from experiments import llm_real_data

    rows = (llm_real_data.problems("fitness")[:args.fitness_problems]
            + llm_real_data.problems("test")[:args.test_problems])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gsm8k.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows)
    return path


def config(args, data: str, run: int) -> dict:
    """The `m2n2-merge` config of run `run` (seed --seed + run): M2N2 with an archive of
    whole models, into OUT/merged (OUT/merged-run{run} with several runs)."""
    from experiments import llm_real

    template = gsm8k.chat_prompt("{question}") if args.prompt == "chatml" else llm_real.PROMPTS[args.prompt]
    return {"models": [args.model_a, args.model_b], "method": "m2n2", "archive": "models",
            "task": {"kind": "gsm8k", "data": data, "fitness": args.fitness_problems, "test": args.test_problems,
                     "template": template},
            "evaluations": args.forward_passes, "archive_size": args.archive_size, "warmup": args.warmup,
            "seed": args.seed + run, "max_new_tokens": args.max_new_tokens, "batch_size": args.chunk_size,
            "mesh": list(args.mesh[1:]), "archive_memory": args.archive_memory, "dtype": args.dtype,
            "output": os.path.join(args.out, "merged" if args.runs == 1 else f"merged-run{run}")}


def plan(args) -> dict:
    """The per-device memory of one step from A_DIR/config.json alone (OUT/plan.json)."""
    dtype = jnp.dtype(args.dtype)
    mesh = jax.make_mesh(args.mesh, ("runs", "data", "model"))
    config = llama.LlamaConfig.from_json(args.model_a)
    model = llama.Llama(config, dtype=dtype)
    algorithm = mj.M2N2(archive_size=args.archive_size, mutation=False)
    params = algorithm.default_params().replace(warmup=jnp.int32(args.warmup))
    shapes = {"params": hf.from_hf_tensors(config, {n: jax.ShapeDtypeStruct(s, dtype) for n, s in
                                                        hf.expected_shapes(config).items()},
                                               dtype=None)["params"]}
    score_fn = _plan_score_fn(model, args.max_new_tokens)
    data = (jax.ShapeDtypeStruct((args.fitness_problems, args.prompt_length), jnp.int32),
            jax.ShapeDtypeStruct((args.fitness_problems, args.prompt_length), jnp.bool_),
            jax.ShapeDtypeStruct((args.fitness_problems,), jnp.int32))
    plan = mj.memory_plan(algorithm, score_fn, shapes, data, num_seeds=2, params=params, mesh=mesh,
                          archive_memory=args.archive_memory, chunk_size=args.chunk_size)
    record = {"config": args.model_a, "parameters": mj.num_params(shapes), "mesh": list(args.mesh),
              "archive_size": args.archive_size, "archive_memory": args.archive_memory, "dtype": args.dtype,
              "chunk_size": args.chunk_size, "prompt_length": args.prompt_length,
              "max_new_tokens": args.max_new_tokens, "fitness_problems": args.fitness_problems,
              "device_kind": jax.devices()[0].device_kind,
              **{k: int(v) for k, v in plan.items()}}
    print(f"per device: arguments {plan['argument_bytes'] / GIB:.2f} GiB, temporaries "
          f"{plan['temp_bytes'] / GIB:.2f} GiB, host {plan['host_bytes'] / GIB:.2f} GiB "
          f"({record['parameters']:,} parameters, archive {args.archive_size}, {args.dtype}, mesh {args.mesh})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "plan.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def _plan_score_fn(model, max_new_tokens: int):
    """The generation of `final_number_scores` with the host check left out (compiling
    for a plan needs no tokenizer): one 0/1 per problem from the generated tokens."""

    def score_fn(params, batch):
        prompts, mask, gold = batch
        out = decode.greedy(model, params, prompts, mask, max_new_tokens, (2,), 2)
        return (out[:, 0] == gold).astype(jnp.float32)

    return score_fn
