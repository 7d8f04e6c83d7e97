"""LLM evaluation at the speed of the hardware (issue 34), side by side in one run on
SmolLM2-135M-Instruct's weights (`make smollm2`) and the same prompts.

    python benchmarks/llm_eval.py [--repeats 3] [--children 8] [--new-tokens 64]
        [--transformers /tmp/refvenv/bin/python] [--out benchmarks/results/llm_eval.json]

1. One M2N2 evaluation of the real protocol (experiments/llm_real_protocol.py: the two
   specialists, `--questions` fitness questions per skill, archive 15, warm-up 13,
   whole models): `mj.run` over 2 seeds + `--children` children, once scoring by
   greedy decoding (`decode.exact_match_scores`, "before") and once without decoding
   (`decode.forced_exact_match_scores`, "after"), from the same key: the archive's
   scores must be equal. Seconds per evaluation: the median over the children of the
   wall time between logged steps (one child a call; the first call, which compiles,
   left out). Scoring alone: the median of `--repeats` calls of each jitted scorer on
   specialist-a, the scores of base and both specialists asserted equal. Near-ties:
   the smallest gap between the two largest logits at the answer positions that
   decide each score (up to the first wrong token), from unpadded full forward passes.
2. Greedy decoding of B = 1, 8 and 48 prompts (GSM8K test problems in SmolLM2's chat
   template, left-padded, no stop token, `--new-tokens` tokens): the project's
   `decode.greedy` (fused projections and, for comparison at B = 48, not fused)
   against transformers (torch, CPU, this file run by `--transformers`, a Python with
   torch and transformers: tests/fixtures/make_llama_fixtures.py's venv; neither is a
   dependency). Prefill: a call that generates 1 token; decode: (B (N - 1)) tokens over
   the time a call of N tokens takes beyond it. Medians of `--repeats`; the generated
   tokens compared row by row. Decode FLOP/s count 2 x the multiply-adds of every
   matmul (lm_head included) and attention over each row's real context.
3. The machine (`harness.machine`), the FP32 rate of one large XLA matmul (4096^3),
   the share of it that decoding reaches, and /proc/loadavg before and after (other
   work on the machine slows every number).

Writes OUT: `evaluation_seconds` -> {before, after, questions, ...}, `scoring_seconds`,
`decode` and `prefill` -> batch -> {project_tokens_per_s, transformers_tokens_per_s,
...}, `machine`, `loadavg`, `command`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from statistics import median

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHES = (1, 8, 48)
STOP = PAD = 2  # SmolLM2's <|im_end|>


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# --- transformers, run in its own venv (`--transformers-worker REQUEST OUT`) ----------------------------------------


def transformers_worker(request_path: str, out_path: str) -> None:
    """Prefill and greedy decoding times of transformers on the request's batches."""
    import torch
    from transformers import AutoModelForCausalLM

    with open(request_path) as f:
        request = json.load(f)
    torch.set_num_threads(request["threads"])
    folder, name = os.path.split(request["gguf"])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # no stop token: every row generates every token
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batches": {}}
    for batch, (ids, mask) in request["batches"].items():
        ids, mask = torch.tensor(ids), torch.tensor(mask)

        def generate(n):
            with torch.inference_mode():
                t = time.perf_counter()
                tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                        pad_token_id=PAD)
                return time.perf_counter() - t, tokens[:, ids.shape[1]:].tolist()

        generate(2)
        prefill = [generate(1)[0] for _ in range(request["repeats"])]
        runs = [generate(request["new_tokens"]) for _ in range(request["repeats"])]
        out["batches"][batch] = {"prefill_seconds": prefill, "total_seconds": [t for t, _ in runs],
                                 "tokens": runs[0][1]}
    with open(out_path, "w") as f:
        json.dump(out, f)


# --- the project ------------------------------------------------------------------------------------------------------


def timed(fn, *args, repeats: int) -> tuple[float, list[float], object]:
    """(compile + first call seconds, each later call's seconds, the output)."""
    import jax

    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return first, times, out


def scoring(model, models, tokenizer, questions: int, repeats: int) -> tuple[dict, tuple, tuple]:
    """Both scorers on the fitness questions: seconds, equal scores, near-ties."""
    import jax
    import numpy as np

    from experiments import llm_real_protocol
    from m2n2_jax.llm import decode

    prompts, answers, _ = llm_real_protocol.questions(tokenizer, questions, "fitness", 0)
    paths = {"before": (decode.exact_match_scores(model, [STOP], PAD), decode.answer_batch(prompts, answers, PAD)),
             "after": (decode.forced_exact_match_scores(model), decode.forced_batch(prompts, answers, [STOP], PAD))}
    record = {"questions": len(prompts)}
    for name, (score_fn, batch) in paths.items():
        fn = jax.jit(score_fn)
        first, times, _ = timed(fn, models["specialist-a"], batch, repeats=repeats)
        record[name] = {"seconds": median(times), "runs": times, "compile_and_first_seconds": first,
                        "scores": {k: np.asarray(fn(m, batch)).tolist() for k, m in models.items()}}
    for k in models:
        if record["before"]["scores"][k] != record["after"]["scores"][k]:
            raise AssertionError(f"{k}: the two scorers disagree: {record['before']['scores'][k]} against "
                                 f"{record['after']['scores'][k]}")
    record["near_ties"] = near_ties(model, models, prompts, answers)
    return record, paths["before"], paths["after"]


def near_ties(model, models, prompts, answers) -> dict:
    """The smallest top-two logit gap over the answer positions that decide a score
    (each answer up to its first wrong token), from full forward passes of each row."""
    import jax
    import numpy as np

    forward = jax.jit(lambda m, ids: model.apply(m, ids)[0][0])
    gaps = []
    for m in models.values():
        for prompt, answer in zip(prompts, answers):
            logits = np.asarray(forward(m, np.asarray([prompt + answer[:-1]], np.int32)))[len(prompt) - 1:]
            top = np.sort(logits, axis=-1)[:, -2:]
            right = np.argmax(logits, axis=-1) == np.asarray(answer)
            deciding = len(answer) if right.all() else int(np.argmin(right)) + 1
            gaps += (top[:deciding, 1] - top[:deciding, 0]).tolist()
    gaps = np.asarray(gaps)
    return {"positions": int(gaps.size), "min_top2_gap": float(gaps.min()),
            "below_1e-3": int((gaps < 1e-3).sum()), "below_1e-4": int((gaps < 1e-4).sum())}


def evaluation(models, paths: dict, children: int) -> dict:
    """Seconds per M2N2 evaluation (merge, score, archive update) with each scorer."""
    import jax
    import numpy as np

    import m2n2_jax as mj
    from experiments import methods

    settings = methods.Settings(m2n2=methods.M2N2Settings(mutation_std=0.0, archive_size=15, warmup=13,
                                                          archive="models"))
    algo, params = methods.make_method("m2n2", settings)
    seeds = [models["specialist-a"], models["specialist-b"]]
    record, archives = {}, {}
    for name, (score_fn, batch) in paths.items():
        result = mj.run(algo, jax.random.key(0), score_fn, batch, 2 + children, params=params, seed_models=seeds,
                        log_every=1, steps_per_call=1, progress=False, name=name)
        steps = np.diff(result.log_wall_seconds)[1:]  # the first step compiles
        record[name] = median(steps.tolist())
        record[f"{name}_steps"] = steps.tolist()
        archives[name] = np.asarray(result.state.scores)
        del result
    if not np.array_equal(archives["before"], archives["after"]):
        raise AssertionError("the two scorers led M2N2 to different archives")
    record["children"] = children
    return record


def prompts_of(tokenizer, count: int) -> list[list[int]]:
    """GSM8K's first test problems in SmolLM2's chat template (its default system message)."""
    from experiments import llm_real_data
    from m2n2_jax.llm import gsm8k

    return [tokenizer.encode(gsm8k.chat_prompt(p["question"])).ids for p in llm_real_data.problems("test")[:count]]


def decoding(model, params, prompts, new_tokens: int, repeats: int) -> dict:
    """The project's prefill and decode seconds and tokens per batch size."""
    import jax
    import numpy as np

    from m2n2_jax.llm import decode

    out = {}
    for b in BATCHES:
        tokens, mask = decode.left_pad(prompts[:b], PAD)
        for fused in (True, False) if b == max(BATCHES) else (True,):
            make = lambda n, fused=fused: jax.jit(
                lambda p, t, m: decode.greedy(model, p, t, m, n, [-1], PAD, fused=fused))
            _, prefill, _ = timed(make(1), params, tokens, mask, repeats=repeats)
            _, total, generated = timed(make(new_tokens), params, tokens, mask, repeats=repeats)
            out[(b, fused)] = {"prefill_seconds": prefill, "total_seconds": total,
                               "tokens": np.asarray(generated).tolist(), "prompt_tokens": int(mask.sum()),
                               "context": mask.sum(axis=1).tolist()}
    return out


def transformers_side(python: str, prompts, new_tokens: int, repeats: int) -> dict:
    """transformers' prefill and decode on the same left-padded prompts (a subprocess)."""
    from m2n2_jax.llm import decode, gguf

    batches = {}
    for b in BATCHES:
        tokens, mask = decode.left_pad(prompts[:b], PAD)
        batches[str(b)] = (tokens.tolist(), mask.astype(int).tolist())
    with tempfile.TemporaryDirectory() as tmp:
        request, out = os.path.join(tmp, "request.json"), os.path.join(tmp, "out.json")
        with open(request, "w") as f:
            json.dump({"gguf": gguf.smollm2_gguf(), "threads": os.cpu_count(), "repeats": repeats,
                       "new_tokens": new_tokens, "batches": batches}, f)
        subprocess.run([python, os.path.abspath(__file__), "--transformers-worker", request, out], check=True)
        with open(out) as f:
            return json.load(f)


def decode_flops(config, context: list[int], new_tokens: int) -> float:
    """FLOPs of decoding `new_tokens` - 1 tokens after prompts of these real lengths:
    2 x every matmul's multiply-adds (lm_head included), attention over each row's
    real context (q.k and p.v: 4 x heads x head_dim per context token and layer)."""
    c = config
    per_layer = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim \
        + c.num_attention_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    matmuls = 2 * (c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size)
    attention = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
    return sum(matmuls + attention * (n + i) for n in context for i in range(1, new_tokens))


def matmul_rate() -> float:
    """FP32 GFLOP/s of one 4096^3 XLA matmul (best of 3)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((4096, 4096), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    best = min(timed(f, a, repeats=3)[1])
    return 2 * 4096 ** 3 / best / 1e9


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each measurement (the median kept)")
    parser.add_argument("--questions", type=int, default=24, help="fitness questions per skill (the protocol's)")
    parser.add_argument("--children", type=int, default=8, help="M2N2 children timed with each scorer")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens each prompt decodes")
    parser.add_argument("--transformers", default="/tmp/refvenv/bin/python",
                        help="a Python with torch and transformers ('' to skip)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "llm_eval.json"))
    args = parser.parse_args(argv)
    if min(args.repeats, args.questions, args.children) < 1 or args.new_tokens < 2:
        parser.error("--repeats, --questions and --children must be >= 1, --new-tokens >= 2")
    sys.path.insert(0, ROOT)
    from experiments import harness, llm_real

    load_before = loadavg()
    model, params, tokenizer = llm_real.base_model()
    models = llm_real.specialists(params, llm_real.SPECIALISTS)
    score, before, after = scoring(model, models, tokenizer, args.questions, args.repeats)
    print(f"scoring {score['questions']} questions: before {score['before']['seconds']:.3f} s, after "
          f"{score['after']['seconds']:.3f} s (same scores)", flush=True)
    evaluations = evaluation(models, {"before": before, "after": after}, args.children)
    print(f"one M2N2 evaluation: before {evaluations['before']:.3f} s, after {evaluations['after']:.3f} s", flush=True)
    del models
    prompts = prompts_of(tokenizer, max(BATCHES))
    ours = decoding(model, params, prompts, args.new_tokens, args.repeats)
    theirs = transformers_side(args.transformers, prompts, args.new_tokens, args.repeats) if args.transformers \
        else None
    rate = matmul_rate()
    record = {"command": "python benchmarks/llm_eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "evaluation_seconds": {"before": evaluations["before"], "after": evaluations["after"],
                                     "questions": score["questions"], "speedup": evaluations["before"]
                                     / evaluations["after"], **{k: v for k, v in evaluations.items()
                                                                if k not in ("before", "after")}},
              "scoring_seconds": {"before": score["before"]["seconds"], "after": score["after"]["seconds"],
                                  "speedup": score["before"]["seconds"] / score["after"]["seconds"],
                                  "questions": score["questions"], "near_ties": score["near_ties"],
                                  "details": {k: score[k] for k in ("before", "after")}},
              "prefill": {}, "decode": {}, "new_tokens": args.new_tokens,
              "transformers": None if theirs is None else {k: theirs[k] for k in ("torch", "threads")}}
    for (b, fused), mine in ours.items():
        key = str(b) if fused else f"{b}_not_fused"
        prefill, total = median(mine["prefill_seconds"]), median(mine["total_seconds"])
        decode_seconds = total - prefill
        flops = decode_flops(model.config, mine["context"], args.new_tokens)
        record["prefill"][key] = {"project_tokens_per_s": mine["prompt_tokens"] / prefill,
                                  "prompt_tokens": mine["prompt_tokens"]}
        record["decode"][key] = {"project_tokens_per_s": b * (args.new_tokens - 1) / decode_seconds,
                                 "project_gflop_per_s": flops / decode_seconds / 1e9,
                                 "project_share_of_matmul_rate": flops / decode_seconds / 1e9 / rate}
        if theirs is not None and fused:
            t = theirs["batches"][str(b)]
            t_prefill, t_total = median(t["prefill_seconds"]), median(t["total_seconds"])
            record["prefill"][key]["transformers_tokens_per_s"] = mine["prompt_tokens"] / t_prefill
            record["decode"][key]["transformers_tokens_per_s"] = b * (args.new_tokens - 1) / (t_total - t_prefill)
            record["decode"][key]["rows_with_identical_tokens"] = int(sum(
                a == c for a, c in zip(mine["tokens"], t["tokens"])))
    record.update(loadavg={"before": load_before, "after": loadavg()}, xla_matmul_4096_gflop_per_s=rate)
    record = harness.write_json(args.out, record)
    print(json.dumps({k: record[k] for k in ("evaluation_seconds", "prefill", "decode")}, indent=1, default=str))
    return record


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--transformers-worker":
        transformers_worker(sys.argv[2], sys.argv[3])
    else:
        main()
