"""Merging two language-model specialists: the paper's LLM experiment at CPU scale.

    python experiments/lm_skills.py --runs 4 --forward-passes 1000 --out experiments/results/lm_skills

A tiny character transformer is pre-trained briefly on copying and on the short
forms of two skills, then fine-tuned into an addition specialist ("123+456=" -> "579",
specialist_a) and a string-reversal specialist ("r:abcdef=" -> "fedcba",
specialist_b), each on its own skill plus replay of the base's mixture; see
experiments/lm_models.py (trained once, cached with orbax). `--skills shift reversal`
picks another pair. A question scores 1 if
greedy decoding reproduces its whole answer (`exact_match_scores`).

- M2N2 (`m2n2_jax.run`): archive started from the two specialists, no mutation,
  fitness = exact match on the training questions of both skills.
- m2n2_seeded: the same, with the archive also started from the merge of the
  operator that scores best on the training questions (M2N2 refining a merge).
- Baselines (`m2n2_jax.merge_ops`): linear, slerp, task arithmetic, TIES and DARE,
  each with the coefficients of its grid (GRIDS) that score best on the same
  training questions. DARE draws its drop masks from each run's key, so its values
  differ between runs; the other operators are deterministic (same value every run).

Reports test exact match per skill for base, both specialists, every operator and
M2N2: a table on stdout, OUT/lm_skills.png and OUT/lm_skills.json with
`test_exact_match[method][skill]` (mean over runs) and `test_exact_match_runs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_devices import use_all_cores  # noqa: E402

use_all_cores()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import m2n2_jax as mj  # noqa: E402
from common import device_name, run_keys, write_json  # noqa: E402
from lm_models import CACHE, Training, load_or_train, make_model  # noqa: E402
from m2n2_jax import merge_ops  # noqa: E402
from m2n2_jax.data import skills  # noqa: E402
from m2n2_jax.models.transformer import exact_match_scores  # noqa: E402

METHODS = ("base", "specialist_a", "specialist_b", "linear", "slerp", "task_arithmetic", "ties", "dare", "m2n2",
           "m2n2_seeded")
BASELINES = ("linear", "slerp", "task_arithmetic", "ties", "dare")
SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
GRIDS = {  # coefficient name -> values; every combination is one forward pass on the training questions
    "linear": {"weight": np.linspace(0, 1, 11)},
    "slerp": {"weight": np.linspace(0, 1, 11)},
    "task_arithmetic": {"scale": np.linspace(0.3, 1.5, 13)},
    "ties": {"density": (0.1, 0.2, 0.4, 0.7, 1.0), "scale": SCALES},
    "dare": {"drop_rate": (0.1, 0.3, 0.5, 0.7, 0.9), "scale": SCALES},
}


def merge(name: str, models: dict, coeffs: dict, key):
    """The merge of the two specialists by operator `name` with coefficients `coeffs`."""
    base, a, b = models["base"], models["specialist_a"], models["specialist_b"]
    if name in ("linear", "slerp"):
        return getattr(merge_ops, name)(a, b, coeffs["weight"])
    if name == "task_arithmetic":
        return merge_ops.task_arithmetic(base, a, b, coeffs["scale"])
    if name == "ties":
        return merge_ops.ties(base, a, b, coeffs["density"], coeffs["scale"])
    return merge_ops.dare(key, base, a, b, coeffs["drop_rate"], coeffs["scale"])


def grid(name: str) -> dict[str, np.ndarray]:
    """Every combination of the operator's coefficients, as arrays of one length."""
    names = list(GRIDS[name])
    combos = list(itertools.product(*(GRIDS[name][n] for n in names)))
    return {n: np.asarray([c[i] for c in combos], np.float32) for i, n in enumerate(names)}


def best_merges(name, models, score_fn, train, keys):
    """For each key: (merged params, chosen coefficients, mean training score of every
    grid point) of operator `name` (the key only matters to DARE); one compilation for all keys."""
    coeffs = grid(name)
    # The models are arguments, not constants, so XLA does not constant-fold the merge.
    search = jax.jit(lambda m, c, k: jax.lax.map(lambda ci: score_fn(merge(name, m, ci, k), train).mean(), c))
    found = []
    for key in keys:
        scores = np.asarray(search(models, coeffs, key))
        i = int(np.argmax(scores))  # first on ties
        chosen = {n: round(float(v[i]), 4) for n, v in coeffs.items()}
        found.append((merge(name, models, {n: v[i] for n, v in coeffs.items()}, key), chosen, scores))
    return found


def mixture_arg(text: str) -> tuple:
    """"copy:0.6,addition:0.4" -> (("copy", 0.6), ("addition", 0.4)); "" -> ()."""
    try:
        pairs = tuple((k, float(w)) for k, w in (item.split(":") for item in text.split(",") if item))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not skill:weight,skill:weight,...") from None
    for k, w in pairs:
        skills.sample_question(k, np.random.default_rng(0))  # raises on an unknown skill
        if w < 0:
            raise argparse.ArgumentTypeError(f"negative weight in {text!r}")
    return pairs


def skill_data(names, questions_per_skill: int, rng, exclude=frozenset()):
    """{skill: (prompts, answers)} for each skill in `names`, distinct questions avoiding `exclude`."""
    return {s: tuple(map(jnp.asarray, skills.tokenize(skills.questions(s, questions_per_skill, rng, exclude))))
            for s in names}


def concat(data: dict):
    return tuple(jnp.concatenate(parts) for parts in zip(*data.values()))


def plot(path: str, names, means: dict, stderr: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    x = np.arange(len(METHODS))
    for j, skill in enumerate(tuple(names) + ("mean",)):
        ax.bar(x + (j - 1) * 0.27, [100 * means[m][skill] for m in METHODS], 0.27, label=skill,
               yerr=[100 * stderr[m][skill] for m in METHODS], capsize=2)
    ax.set_xticks(x, METHODS, rotation=20)
    ax.set_ylabel("test exact match (%)")
    ax.set_ylim(0, 115)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(ncol=3, loc="upper center")
    ax.set_title(f"Merging the {names[0]} and the {names[1]} specialists (mean over runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=4, help="independent runs (seeds) of M2N2 and DARE")
    p.add_argument("--forward-passes", type=int, default=1000, help="M2N2 budget per run, seeds included")
    p.add_argument("--seed", type=int, default=42, help="first seed; runs use seed .. seed+runs-1")
    p.add_argument("--out", default="experiments/results/lm_skills", help="output directory")
    p.add_argument("--skills", nargs=2, default=Training.specialists, choices=skills.SKILLS[:-1],
                   metavar="SKILL", help="skills of specialist_a and specialist_b")
    p.add_argument("--archive-size", type=int, default=20)
    p.add_argument("--train-questions", type=int, default=200, help="fitness questions per skill")
    p.add_argument("--test-questions", type=int, default=500, help="test questions per skill")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the questions and of training")
    p.add_argument("--cache", default=CACHE, help="where the trained models are kept (orbax)")
    p.add_argument("--no-progress", action="store_true")
    for f in dataclasses.fields(Training):
        if f.type in ("int", "float") and f.name != "seed":
            p.add_argument(f"--{f.name.replace('_', '-')}", type={"int": int, "float": float}[f.type],
                           default=f.default, help="model / training (experiments/lm_models.py)")
    for name in ("base_mixture", "finetune_replay"):
        p.add_argument(f"--{name.replace('_', '-')}", type=mixture_arg, default=getattr(Training, name),
                       help="skill:weight,... (\"\" for none), e.g. copy:0.6,addition:0.4")
    args = p.parse_args(argv)
    if args.runs < 1 or args.forward_passes < 2:
        raise SystemExit("error: --runs must be >= 1 and --forward-passes >= 2")
    t_start = time.perf_counter()
    try:
        training = Training(seed=args.data_seed, specialists=tuple(args.skills),
                            **{f.name: getattr(args, f.name) for f in dataclasses.fields(Training)
                               if f.name not in ("seed", "specialists") and hasattr(args, f.name)})
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    names = training.specialists
    rng = np.random.default_rng(args.data_seed)
    test = skill_data(names, args.test_questions, rng)
    test_prompts = {skills.decode(q) for prompts, _ in test.values() for q in np.asarray(prompts)}
    train = skill_data(names, args.train_questions, rng, test_prompts)
    train_all, test_all = concat(train), concat(test)
    trained = load_or_train(training, test_prompts, args.cache)
    models = {"base": trained["base"], "specialist_a": trained[names[0]], "specialist_b": trained[names[1]]}
    t_trained = time.perf_counter()
    model = make_model(training)
    score_fn = exact_match_scores(model)
    evaluate = jax.jit(lambda params, data: score_fn(params, data).mean())
    keys = run_keys(args.seed, args.runs)

    def test_scores(params) -> dict:
        return {s: float(evaluate(params, test[s])) for s in names}

    per_run, coefficients, train_score, grid_scores, merged = {}, {}, {}, {}, {}
    for name, params in models.items():
        per_run[name] = [test_scores(params)] * args.runs
        train_score[name] = float(evaluate(params, train_all))
    for name in BASELINES:
        merge_keys = [jax.random.fold_in(k, 1) for k in (keys if name == "dare" else keys[:1])]
        found = best_merges(name, models, score_fn, train_all, merge_keys)
        merged[name] = found[0][0]
        per_run[name] = [test_scores(f[0]) for f in found] * (args.runs // len(found))
        coefficients[name] = [f[1] for f in found]
        train_score[name] = float(np.mean([f[2].max() for f in found]))
        grid_scores[name] = [np.round(f[2], 4).tolist() for f in found]
        print(f"{name}: coefficients {coefficients[name][0]}, train {train_score[name]:.3f}, test {per_run[name][0]}")
    # Why merges fail or succeed: each skill along the straight line from specialist_a to specialist_b.
    path = {f"{w:.1f}": test_scores(merge_ops.linear(models["specialist_a"], models["specialist_b"], w))
            for w in GRIDS["linear"]["weight"]}
    tau_a, tau_b = (jax.tree.map(jnp.subtract, models[s], models["base"]) for s in ("specialist_a", "specialist_b"))
    norm = lambda tree: float(optax.tree_utils.tree_norm(tree))
    task_vectors = {"cosine": float(optax.tree_utils.tree_vdot(tau_a, tau_b)) / (norm(tau_a) * norm(tau_b)),
                    "norm_over_base_norm": {s: norm(t) / norm(models["base"]) for s, t in zip(names, (tau_a, tau_b))}}
    t_baselines = time.perf_counter()

    config = mj.Config(archive_size=args.archive_size, mutation_std=0.0)

    def m2n2(name, seed_models):
        result = mj.run(keys, seed_models, score_fn, train_all, args.forward_passes, config, test_data=test_all,
                        log_every=args.log_every, progress=not args.no_progress)
        per_run[name] = [test_scores(jax.tree.map(lambda x: x[r], result.best_params)) for r in range(args.runs)]
        train_score[name] = float(result.final_train_accuracy.mean())
        return {"forward_passes": result.passes.tolist(),
                "test_exact_match_mean": result.test_accuracy.mean(0).tolist(),
                "train_exact_match_mean": result.train_accuracy.mean(0).tolist()}

    curves = {"m2n2": m2n2("m2n2", [models["specialist_a"], models["specialist_b"]])}
    t_m2n2 = time.perf_counter()
    # M2N2 refining an operator's merge: the archive also starts from the merge of the
    # operator that scores best on the training questions (its first run's merge for DARE).
    seed_operator = max(BASELINES, key=lambda m: train_score[m])
    curves["m2n2_seeded"] = m2n2("m2n2_seeded",
                                 [models["specialist_a"], models["specialist_b"], merged[seed_operator]])
    t_end = time.perf_counter()

    runs = {m: {s: [r[s] for r in per_run[m]] for s in names} for m in METHODS}
    for m in METHODS:
        runs[m]["mean"] = [float(np.mean([r[s] for s in names])) for r in per_run[m]]
    means = {m: {s: float(np.mean(v)) for s, v in runs[m].items()} for m in METHODS}
    stderr = {m: {s: float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0 for s, v in runs[m].items()}
              for m in METHODS}
    best_baseline = max(BASELINES, key=lambda m: means[m]["mean"])  # best on test: the strictest comparison
    retention = {m: {s: means[m][s] / max(means[spec][s], 1e-9) for s, spec in zip(names, ("specialist_a", "specialist_b"))}
                 for m in ("m2n2", "m2n2_seeded")}
    record = {
        "experiment": "lm_skills",
        "skills": list(names),
        "methods": list(METHODS),
        "test_exact_match": {m: {s: means[m][s] for s in names} for m in METHODS},
        "test_exact_match_mean_of_skills": {m: means[m]["mean"] for m in METHODS},
        "test_exact_match_stderr": stderr,
        "test_exact_match_runs": runs,
        "train_exact_match": train_score,
        "coefficients": coefficients,
        "coefficient_grids": {m: {n: [round(float(x), 4) for x in v] for n, v in grid(m).items()} for m in GRIDS},
        "grid_train_exact_match": grid_scores,
        "linear_path_test_exact_match": path,
        "task_vectors": task_vectors,
        "best_baseline": best_baseline,
        "m2n2_minus_best_baseline": means["m2n2"]["mean"] - means[best_baseline]["mean"],
        "m2n2_seeded_minus_best_baseline": means["m2n2_seeded"]["mean"] - means[best_baseline]["mean"],
        "m2n2_retention_of_specialist_own_skill": retention["m2n2"],
        "m2n2_seeded_retention_of_specialist_own_skill": retention["m2n2_seeded"],
        "m2n2_seeded_operator": seed_operator,
        "m2n2_curve": curves["m2n2"],
        "m2n2_seeded_curve": curves["m2n2_seeded"],
        "runs": args.runs,
        "seeds": list(range(args.seed, args.seed + args.runs)),
        "forward_passes": args.forward_passes,
        "archive_size": args.archive_size,
        "train_questions_per_skill": args.train_questions,
        "test_questions_per_skill": args.test_questions,
        "training": {**dataclasses.asdict(training), "cache": training.tag()},
        "num_params": mj.num_params(models["base"]),
        "wall_seconds": {"training_or_cache": t_trained - t_start, "baselines": t_baselines - t_trained,
                         "m2n2": t_m2n2 - t_baselines, "m2n2_seeded": t_end - t_m2n2, "total": t_end - t_start},
        "jax_version": jax.__version__,
        "device": device_name(),
    }
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "lm_skills.json"), record)
    plot(os.path.join(args.out, "lm_skills.png"), names, means, stderr)
    print(f"\n{'method':<16} {names[0]:>9} {names[1]:>9} {'mean':>7}   (test exact match %, {args.runs} runs)")
    for m in METHODS:
        print(f"{m:<16} " + " ".join(f"{100 * means[m][s]:>9.1f}" for s in names)
              + f" {100 * means[m]['mean']:>7.1f}")
    for m in ("m2n2", "m2n2_seeded"):
        print(f"{m} keeps {100 * retention[m][names[0]]:.0f} % / {100 * retention[m][names[1]]:.0f} % of the "
              f"specialists' own-skill accuracy; {m} - best baseline ({best_baseline}) = "
              f"{100 * record[m + '_minus_best_baseline']:+.1f} points")
    print(f"{t_end - t_start:.0f} s -> {args.out}")
    return record


if __name__ == "__main__":
    main()
