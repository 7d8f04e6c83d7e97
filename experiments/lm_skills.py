"""Merging two language-model specialists: the paper's LLM experiment at CPU scale.

    python experiments/lm_skills.py --runs 4 --forward-passes 1000 --out experiments/results/lm_skills

A tiny character transformer is pre-trained briefly on copying and on the short
forms of two skills, then fine-tuned into an addition specialist ("123+456=" -> "579",
specialist_a) and a string-reversal specialist ("r:abcdef=" -> "fedcba",
specialist_b), each on its own skill plus replay of the base's mixture; see
experiments/lm_models.py (trained once, cached with orbax). `--skills shift reversal`
picks another pair. A question scores 1 if greedy decoding reproduces its whole
answer (`exact_match_scores`).

- M2N2 (`m2n2_jax.run`): archive started from the two specialists, no mutation,
  fitness = exact match on the training questions of both skills.
- m2n2_seeded: the same, with the archive also started from the merge of the
  operator that scores best on the training questions (M2N2 refining a merge).
- Baselines (experiments/lm_operators.py): linear, slerp, task arithmetic, TIES and
  DARE, each with the coefficients of its grid that score best on the same training
  questions. DARE draws its drop masks from each run's key, so its values differ
  between runs; the other operators are deterministic (same value every run).

Reports test exact match per skill for base, both specialists, every operator and
M2N2: a table on stdout, OUT/lm_skills.png and OUT/lm_skills.json with
`test_exact_match[method][skill]` (mean over runs) and `test_exact_match_runs`
(analysis: experiments/lm_analysis.py). Every value is checked before any work; a
refused or failed run writes nothing.
"""

from __future__ import annotations

import harness

harness.use_cpu_devices()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lm_analysis  # noqa: E402
import lm_operators  # noqa: E402
import m2n2_jax as mj  # noqa: E402
from harness import AT_LEAST_2, NON_NEGATIVE, POSITIVE, flag  # noqa: E402
from lm_models import CACHE, Training, load_or_train, make_model  # noqa: E402
from lm_operators import BASELINES, GRIDS  # noqa: E402
from m2n2_jax.tasks import skills  # noqa: E402
from m2n2_jax.tasks.transformer import exact_match_scores  # noqa: E402

METHODS = ("base", "specialist_a", "specialist_b", *BASELINES, "m2n2", "m2n2_seeded")
MIN_FORWARD_PASSES = 4  # m2n2_seeded: 3 seed models, then one child per step


def mixture_arg(text: str) -> tuple:
    """"copy:0.6,addition:0.4" -> (("copy", 0.6), ("addition", 0.4)); "" -> ()."""
    try:
        pairs = tuple((k, float(w)) for k, w in (item.split(":") for item in text.split(",") if item))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not skill:weight,skill:weight,...") from None
    for k, w in pairs:
        try:
            skills.sample_question(k, np.random.default_rng(0))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
        if not (math.isfinite(w) and w >= 0):
            raise argparse.ArgumentTypeError(f"weight {w} of {k!r} in {text!r} is not a finite number >= 0")
    if len({k for k, _ in pairs}) != len(pairs):
        raise argparse.ArgumentTypeError(f"a skill appears twice in {text!r}")
    return pairs


MODEL = "model / training (experiments/lm_models.py)"
MIXTURE = "skill:weight,... (weights >= 0, summing to > 0), e.g. copy:0.6,addition_short:0.4"
REPLAY = 'skill:weight,... mixed into each specialist\'s data (weights summing to < 1; "" for none)'


@dataclasses.dataclass(frozen=True)
class Spec:
    """The command line of experiments/lm_skills.py (a contract)."""

    runs: int = flag(4, "independent runs (seeds) of M2N2 and DARE", POSITIVE)
    forward_passes: int = flag(1000, f"M2N2 budget per run, seeds included (>= {MIN_FORWARD_PASSES}: m2n2_seeded "
                                     "starts from 3 models)", (">=", MIN_FORWARD_PASSES))
    seed: int = flag(42, "first seed; runs use seed .. seed+runs-1")
    out: str = flag("experiments/results/lm_skills", "output directory", result=False)
    skills: tuple[str, str] = flag(Training.specialists, "skills of specialist_a and specialist_b",
                                   choices=skills.SKILLS[:-1], nargs=2)
    archive_size: int = flag(20, "M2N2 archive size", AT_LEAST_2)
    train_questions: int = flag(200, "fitness questions per skill", POSITIVE)
    test_questions: int = flag(500, "test questions per skill", POSITIVE)
    log_every: int = flag(100, "log the M2N2 curves every this many passes", POSITIVE)
    data_seed: int = flag(0, "seed of the questions and of training", NON_NEGATIVE)
    cache: str = flag(CACHE, "where the trained models are kept (orbax)", result=False)
    no_progress: bool = flag(False, "no progress bar", result=False)
    d_model: int = flag(Training.d_model, MODEL, POSITIVE)
    num_layers: int = flag(Training.num_layers, MODEL, POSITIVE)
    num_heads: int = flag(Training.num_heads, MODEL, POSITIVE)
    batch: int = flag(Training.batch, MODEL, POSITIVE)
    base_steps: int = flag(Training.base_steps, MODEL, POSITIVE)
    base_lr: float = flag(Training.base_lr, MODEL, POSITIVE)
    finetune_steps: int = flag(Training.finetune_steps, MODEL, POSITIVE)
    finetune_lr: float = flag(Training.finetune_lr, MODEL, POSITIVE)
    pool: int = flag(Training.pool, MODEL, POSITIVE)
    base_mixture: tuple = flag(Training.base_mixture, MIXTURE, type=mixture_arg)
    finetune_replay: tuple = flag(Training.finetune_replay, REPLAY, type=mixture_arg)

    def __post_init__(self):
        self.training()  # Training refuses what it cannot train
        if self.d_model % self.num_heads:
            raise ValueError(f"--d-model ({self.d_model}) must be a multiple of --num-heads ({self.num_heads})")
        for name in ("out", "cache"):
            path = getattr(self, name)
            if os.path.exists(path) and not os.path.isdir(path):
                raise ValueError(f"--{name} {path} exists and is not a directory")

    def training(self) -> Training:
        """The models' settings (their cache key)."""
        return Training(seed=self.data_seed, specialists=self.skills,
                        **{f.name: getattr(self, f.name) for f in dataclasses.fields(Training)
                           if f.name not in ("seed", "specialists")})


def skill_data(names, questions_per_skill: int, rng, exclude=frozenset()) -> dict:
    """{skill: (prompts, answers)} for each skill in `names`, distinct questions avoiding `exclude`."""
    return {s: tuple(map(jnp.asarray, skills.tokenize(skills.questions(s, questions_per_skill, rng, exclude))))
            for s in names}


def concat(data: dict):
    return tuple(jnp.concatenate(parts) for parts in zip(*data.values()))


def main(argv=None) -> dict:
    spec = harness.parse(Spec, __doc__, argv)
    t_start = time.perf_counter()
    training = spec.training()
    names = training.specialists
    rng = np.random.default_rng(spec.data_seed)
    test = skill_data(names, spec.test_questions, rng)
    test_prompts = {skills.decode(q) for prompts, _ in test.values() for q in np.asarray(prompts)}
    train = skill_data(names, spec.train_questions, rng, test_prompts)
    train_all, test_all = concat(train), concat(test)
    trained = load_or_train(training, test_prompts, spec.cache)
    models = {"base": trained["base"], "specialist_a": trained[names[0]], "specialist_b": trained[names[1]]}
    t_trained = time.perf_counter()
    score_fn = exact_match_scores(make_model(training))
    evaluate = jax.jit(lambda params, data: score_fn(params, data).mean())
    keys = harness.run_keys(spec.seed, spec.runs)

    def test_scores(params) -> dict:
        return {s: float(evaluate(params, test[s])) for s in names}

    per_run, coefficients, train_score, grid_scores, merged = {}, {}, {}, {}, {}
    for name, params in models.items():
        per_run[name] = [test_scores(params)] * spec.runs
        train_score[name] = float(evaluate(params, train_all))
    for name in BASELINES:
        merge_keys = [jax.random.fold_in(k, 1) for k in (keys if name == "dare" else keys[:1])]
        found = lm_operators.best_merges(name, models, evaluate, train_all, merge_keys)
        merged[name] = found[0][0]
        per_run[name] = [test_scores(f[0]) for f in found] * (spec.runs // len(found))
        coefficients[name] = [f[1] for f in found]
        train_score[name] = float(np.mean([f[2].max() for f in found]))
        grid_scores[name] = [np.round(f[2], 4).tolist() for f in found]
        print(f"{name}: coefficients {coefficients[name][0]}, train {train_score[name]:.3f}, test {per_run[name][0]}")
    path = lm_analysis.linear_path(models, test_scores, GRIDS["linear"]["weight"])
    task_vectors = lm_analysis.task_vectors(models, names)
    t_baselines = time.perf_counter()

    algorithm = mj.M2N2(archive_size=spec.archive_size, mutation=False)

    def m2n2(name, seed_models) -> dict:
        result = mj.run(algorithm, keys, score_fn, train_all, spec.forward_passes, seed_models=seed_models,
                        test_data=test_all, log_every=spec.log_every, progress=not spec.no_progress)
        per_run[name] = [test_scores(jax.tree.map(lambda x: x[r], result.best_params)) for r in range(spec.runs)]
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

    runs, means, stderr = lm_analysis.summary(per_run, METHODS, names)
    best_baseline = max(BASELINES, key=lambda m: means[m]["mean"])  # best on test: the strictest comparison
    retention = lm_analysis.retention(means, names, ("m2n2", "m2n2_seeded"))
    machine = harness.machine()
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
        "coefficient_grids": {m: {n: [round(float(x), 4) for x in v] for n, v in lm_operators.grid(m).items()}
                              for m in GRIDS},
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
        "runs": spec.runs,
        "seeds": list(range(spec.seed, spec.seed + spec.runs)),
        "forward_passes": spec.forward_passes,
        "archive_size": spec.archive_size,
        "train_questions_per_skill": spec.train_questions,
        "test_questions_per_skill": spec.test_questions,
        "settings": harness.result_fields(spec),
        "training": {**dataclasses.asdict(training), "cache": training.tag()},
        "num_params": mj.num_params(models["base"]),
        "wall_seconds": {"training_or_cache": t_trained - t_start, "baselines": t_baselines - t_trained,
                         "m2n2": t_m2n2 - t_baselines, "m2n2_seeded": t_end - t_m2n2, "total": t_end - t_start},
        "jax_version": jax.__version__,
        "device": f"{machine['device']} ({machine['processor']}, {machine['cores']} cores)",
    }
    lm_analysis.plot(os.path.join(spec.out, "lm_skills.png"), METHODS, names, means, stderr)
    harness.write_json(os.path.join(spec.out, "lm_skills.json"), record)
    print(f"\n{'method':<16} {names[0]:>9} {names[1]:>9} {'mean':>7}   (test exact match %, {spec.runs} runs)")
    for m in METHODS:
        print(f"{m:<16} " + " ".join(f"{100 * means[m][s]:>9.1f}" for s in names)
              + f" {100 * means[m]['mean']:>7.1f}")
    for m in ("m2n2", "m2n2_seeded"):
        print(f"{m} keeps {100 * retention[m][names[0]]:.0f} % / {100 * retention[m][names[1]]:.0f} % of the "
              f"specialists' own-skill accuracy; {m} - best baseline ({best_baseline}) = "
              f"{100 * record[m + '_minus_best_baseline']:+.1f} points")
    print(f"{t_end - t_start:.0f} s -> {spec.out}")
    return record


if __name__ == "__main__":
    main()
