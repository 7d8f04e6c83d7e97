"""The fine-tuning recipes tried for specialist pair (b) (docs/lm_pairs.md), measured.

    python experiments/explore_lm_skills_pair_b_attempts.py ATTEMPT [ATTEMPT ...] [--reach]

For each attempt (a name of ATTEMPTS; "a" is pair (a)'s recipe): trains the base and the
two specialists (or loads them from experiments/cache), then records in
experiments/results/lm_skills/explorations/pair_b_attempts.json, under the attempt's
name: its settings, the training log (with times; empty when the models came from the
cache), the base's and each specialist's test scores per skill (addition exact match,
reversal partial credit, and reversal exact match), and `lm_analysis.task_vector_stats`
(norms, cosine, DARE robustness on the own skill's test questions, 3 mask draws); with
--parts also `lm_analysis.dare_by_part` (DARE on one part of the model at a time); with
--reach also `lm_analysis.reachability` (200 addition and 50 reversal training
questions, 500 test questions per skill, as `lm_analysis.skill_sets` draws them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

# Run as a file, sys.path[0] is experiments/: the repository root replaces it, so that each module here has
# one name, experiments.NAME (a bare `import harness` fails instead of loading a second copy).
if not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from experiments import harness

harness.use_cpu_devices()

import jax

from experiments import lm_analysis, lm_models
from m2n2_jax.tasks import skills
from m2n2_jax.tasks.transformer import decoded_scores

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lm_skills", "explorations",
                   "pair_b_attempts.json")
NAMES = ("addition", "reversal")
ADD10 = (("copy", 0.35), ("addition_short", 0.25), ("reversal_short", 0.3), ("addition", 0.1))
ADD7 = (("copy", 0.38), ("addition_short", 0.25), ("reversal_short", 0.3), ("addition", 0.07))
BLOCKS = r"layer_|ln_out|params/out/"  # every parameter but the token and position embeddings
# name -> (Training keyword arguments, what the attempt tries)
ATTEMPTS = {
    "a": ({}, "pair (a) (lm_models.PAIRS['a']): full fine-tuning, 1000 steps at lr 3e-4, replay of copy and the "
              "short forms"),
    "lr1e-4": ({"finetune_lr": 1e-4}, "pair (a)'s base; full fine-tuning at lr 1e-4"),
    "mix5_lr1e-4": ({"base_mixture": (("copy", 0.4), ("addition_short", 0.25), ("reversal_short", 0.25),
                                       ("addition", 0.05), ("reversal", 0.05)), "finetune_lr": 1e-4},
                    "a base that has seen a little of the full skills (5 % each in pre-training); lr 1e-4"),
    "add10": ({"base_mixture": ADD10,
               "finetune_replay": (("copy", 0.175), ("addition_short", 0.125), ("reversal_short", 0.15),
                                   ("addition", 0.05)),
               "finetune_lr": 1e-4},
              "a base that has seen some 3-digit addition (10 % of pre-training), replayed at half its share; lr 1e-4"),
    "add10_short_replay": ({"base_mixture": ADD10, "finetune_lr": 1e-4},
                           "pair (b) (lm_models.PAIRS['b']): add10's base; replay of copy and the short forms only "
                           "(pair (a)'s replay), lr 1e-4"),
    "add7": ({"base_mixture": ADD7,
              "finetune_lr": 1e-4},
             "a base that has seen less 3-digit addition (7 % of pre-training); pair (a)'s replay, lr 1e-4"),
    "add10_replay2": ({"base_mixture": ADD10, "finetune_lr": 1e-4,
                       "finetune_replay": (("copy", 0.2), ("addition_short", 0.13), ("reversal_short", 0.15),
                                           ("addition", 0.02))},
                      "add10's base; pair (a)'s replay with 2 % of 3-digit addition in place of 2 % of the short "
                      "additions, lr 1e-4"),
    "add7_lr3e-4": ({"base_mixture": ADD7}, "add7's base, fine-tuned as pair (a) (lr 3e-4)"),
    "wd10": ({"finetune_weight_decay": 10.0}, "pair (a)'s recipe with AdamW decay 10 of the delta (toward the base)"),
    "lora4": ({"finetune_rank": 4, "finetune_lr": 1e-3},
              "pair (a)'s base; rank-4 deltas of the blocks' kernels, lr 1e-3"),
    "frozen_embeddings": ({"finetune_params": (BLOCKS, BLOCKS)},
                          "pair (a)'s recipe with the token and position embeddings frozen (no learned "
                          "positions change, as in a RoPE model)"),
    "mlp_vs_attn": ({"finetune_params": ("mlp", "attn")},
                    "pair (a)'s recipe, but the addition specialist fine-tunes only the MLPs, the reversal "
                    "specialist only the attention layers"),
}


assert lm_models.Training(**ATTEMPTS["a"][0]) == lm_models.PAIRS["a"]
assert lm_models.Training(**ATTEMPTS["add10_short_replay"][0]) == lm_models.PAIRS["b"]
BASE_FIELDS = ("d_model", "num_layers", "num_heads", "batch", "base_steps", "base_lr", "base_mixture", "pool", "seed")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("attempts", nargs="+", choices=list(ATTEMPTS))
    p.add_argument("--reach", action="store_true", help="also measure the reachable models")
    p.add_argument("--parts", action="store_true", help="also DARE each part of the model alone (dare_by_part)")
    p.add_argument("--train-sizes", type=int, nargs=2, default=(200, 50))
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--base-only", action="store_true", help="train and score the base only (screening a base)")
    args = p.parse_args(argv)
    train, test, exclude = lm_analysis.skill_sets(NAMES, tuple(args.train_sizes), args.test_size)
    for name in args.attempts:
        kwargs, note = ATTEMPTS[name]
        t = lm_models.Training(**kwargs)
        logs = []
        t0 = time.perf_counter()
        trained = lm_models.load_or_train(t, exclude, log=lambda m: (print(m, flush=True), logs.append(m)),
                                          base_only=args.base_only)
        t_train = time.perf_counter() - t0
        if args.base_only:
            model = lm_models.make_model(t)
            scores = lm_analysis.skill_evaluator(model, train, test)(trained["base"])["test"]
            print(name, "base", scores, flush=True)
            base_training = {**{f: getattr(t, f) for f in BASE_FIELDS}, "cache": t.base_tag()}
            save(name + " (base only)", {"note": f"the base of {name}", "base_training": base_training,
                                         "training_log": logs, "load_or_train_seconds": t_train,
                                         "test_scores": {"base": scores}, "test_size": args.test_size})
            continue
        models = {"base": trained["base"], "a": trained[NAMES[0]], "b": trained[NAMES[1]]}
        model = lm_models.make_model(t)
        evaluate = lm_analysis.skill_evaluator(model, train, test)
        exact = jax.jit(lambda params, data, f=decoded_scores(model, "exact_match"): f(params, data).mean())
        scores = {}
        for m, params in models.items():
            scores[m] = evaluate(params)["test"]
            scores[m]["reversal_exact_match"] = float(exact(params, test["reversal"]))
            print(name, m, {k: round(v, 4) for k, v in scores[m].items()}, flush=True)
        own_fns = {s: jax.jit(lambda params, data, f=decoded_scores(model, skills.SCORERS[s]): f(params, data).mean())
                   for s in NAMES}
        own = lambda skill: (lambda params: float(own_fns[skill](params, test[skill])))
        t1 = time.perf_counter()
        stats = lm_analysis.task_vector_stats(models["base"], models["a"], models["b"], own(NAMES[0]), own(NAMES[1]),
                                              key=jax.random.key(0), draws=args.draws,
                                              unit=lm_analysis.transformer_unit)
        print(name, json.dumps(stats), f"{time.perf_counter() - t1:.0f} s", flush=True)
        record = {"note": note, "training": {**dataclasses.asdict(t), "cache": t.tag()}, "training_log": logs,
                  "load_or_train_seconds": t_train, "test_scores": scores, "task_vector_stats": stats,
                  "train_sizes": list(args.train_sizes), "test_size": args.test_size}
        if args.parts:
            record["dare_by_part"] = {m: lm_analysis.dare_by_part(models["base"], models[m], own(skill),
                                                                  key=jax.random.key(0), draws=args.draws)
                                      for m, skill in (("a", NAMES[0]), ("b", NAMES[1]))}
            print(name, json.dumps(record["dare_by_part"]), flush=True)
        if args.reach:
            t1 = time.perf_counter()
            reach = lm_analysis.reachability(models["base"], models["a"], models["b"], evaluate)
            record["reachability"] = reach
            record["reachability_summary"] = lm_analysis.reachability_summary(reach)
            record["reachability_seconds"] = time.perf_counter() - t1
            print(name, json.dumps(record["reachability_summary"]), flush=True)
        save(name, record)


def save(name: str, record: dict) -> None:
    """Add or replace attempt `name` in pair_b_attempts.json."""
    attempts = json.load(open(OUT))["attempts"] if os.path.exists(OUT) else {}
    attempts[name] = record
    harness.write_json(OUT, {"experiment": "lm_pairs: fine-tuning recipes for specialist pair (b)",
                             "command": "python experiments/explore_lm_skills_pair_b_attempts.py "
                                        "ATTEMPT [--parts] [--reach] [--base-only]", "attempts": attempts})


if __name__ == "__main__":
    main()
