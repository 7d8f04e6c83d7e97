"""The paper's LLM protocol on one specialist pair (docs/algorithm.md#llm), for
experiments/lm_skills.py.

Two skills, one scored 0/1 per question (addition, exact match, as GSM8K) and one with
a continuous reward (reversal, partial credit, as WebShop), unequal small training
sets and larger test sets. Every evolutionary method gets `forward_passes`
evaluations per run on the training questions (the seeds included), no mutation:

- m2n2, m2n2-no-attraction, m2n2-no-splitpoint, ga: archive `archive_size` (paper 15)
  started from the two specialists, a warm-up of `warmup` random merges (paper <= 50),
  capacity "max" (the paper's rule for continuous scores; 1 on 0/1 questions);
- map-elites: a 4 x 4 grid over the two skills' training scores;
- cma-es-slerp: CMA-ES over one slerp ratio per layer unit between the specialists
  (the paper's baseline; population `population`);
- cma-es-task-arithmetic: CMA-ES over one task-arithmetic weight per specialist and
  layer unit on the base (mergekit-evolve's recipe);
- m2n2-task-vectors: our extension, M2N2 on the task vectors with a per-unit
  log-normal magnitude (`magnitude_std`), outside the paper's comparison;
- linear, slerp, task_arithmetic, ties, dare: the static operators with the grid point
  that scores best on the training questions (a reference outside the comparison).

The skills count equally, whatever their number of training questions, in every
method's objective: M2N2's capacities (`question_weights`), the CMA-ES fitness
(`skill_weighted`) and the model returned. MAP-Elites ranks a cell's models by the
mean over its questions (its cells already separate the skills).

A method's score is the mean over runs of the mean of the two skills' test scores of
the model it returns: for the evolutionary ones, the model with the best mean of the
two skills' training scores (`returned_model`; the skills count equally, whatever
their number of questions), as for the static operators' grids.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import m2n2_jax as mj
from experiments import harness, lm_analysis, lm_operators, methods
from experiments.lm_models import load_or_train, make_model
from m2n2_jax.tasks import skills
from m2n2_jax.tasks.transformer import mixed_scores, per_skill_batch

PAPER = ("m2n2", "m2n2-no-attraction", "m2n2-no-splitpoint", "ga", "map-elites", "cma-es-slerp")
EVOLUTIONARY = PAPER + ("cma-es-task-arithmetic", "m2n2-task-vectors")
OPERATORS = tuple(lm_operators.BASELINES)
SEEDS = ("base", "specialist_a", "specialist_b")
METHODS = EVOLUTIONARY + OPERATORS


def algorithm(name: str, models: dict, skill_of_point, spec):
    """(algorithm, params, seed models) of an evolutionary method, from the experiments'
    menu (`methods.make_method`) with this protocol's settings."""
    pair = [models["specialist_a"], models["specialist_b"]]
    settings = methods.Settings(
        m2n2=methods.M2N2Settings(mutation_std=0.0, archive_size=spec.archive_size, capacity_rule="max",
                                  warmup=spec.warmup, capacity=question_weights(skill_of_point),
                                  archive=spec.archive, max_children=spec.forward_passes),
        task_vectors=methods.TaskVectorSettings(base=models["base"], groups=lm_analysis.transformer_unit,
                                                magnitude_std=spec.magnitude_std,
                                                task_vector_norm=spec.task_vector_norm),
        map_elites=methods.MapElitesSettings(descriptor=mj.label_descriptor(skill_of_point), bins=(4, 4),
                                             mutation_std=0.0),
        merge_es=methods.MergeESSettings(template=models["base"], groups=lm_analysis.transformer_unit, num_models=2,
                                         population=spec.population, std_init=spec.std_init))
    algo, params = methods.make_method(name, settings)
    return algo, params, [models["base"], *pair] if name == "cma-es-task-arithmetic" else pair


def skill_counts(skill_of_point: np.ndarray) -> np.ndarray:
    """(K,) the questions of each skill 0..K-1 (K: the largest index + 1); a skill with
    none, whose mean would be undefined, is refused by index."""
    skill_of_point = np.asarray(skill_of_point)
    if skill_of_point.ndim != 1 or not len(skill_of_point) or skill_of_point.min() < 0:
        raise ValueError(f"skill_of_point must be a non-empty (M,) array of skill indices >= 0, got {skill_of_point}")
    counts = np.bincount(skill_of_point)
    if not counts.all():
        empty = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"skills {empty} have no question (skills 0..{len(counts) - 1})")
    return counts


def question_weights(skill_of_point: np.ndarray) -> jax.Array:
    """(M,) float32: M / (K n_k) for a question of skill k (n_k questions, K skills):
    mean 1, and each skill's questions weigh M / K in all. M2N2's `Params.capacity`
    (times the "max" rule), so that each skill supplies an equal share of the
    resources; the mean of scores times these weights is the mean of the skills' means."""
    counts = skill_counts(skill_of_point)
    return jnp.asarray(len(skill_of_point) / (len(counts) * counts[np.asarray(skill_of_point)]), jnp.float32)


def skill_weighted(score_fn, skill_of_point):
    """score_fn with each question's score times w_j / max(w) (`question_weights`), in
    [0, 1]: its mean over questions is the mean of the skills' means over max(w), the
    same ranking (for the CMA-ES baselines, whose fitness is the mean over questions)."""
    w = question_weights(skill_of_point)
    scale = w / w.max()
    return lambda params, batch: score_fn(params, batch) * scale


def skill_weights(skill_of_point: np.ndarray) -> jax.Array:
    """(M, K) float32: scores (.., M) @ weights = each of the K skills' mean score, so
    that skills count equally whatever their number of questions."""
    k = len(skill_counts(skill_of_point))
    onehot = (np.asarray(skill_of_point)[:, None] == np.arange(k)).astype(np.float32)
    return jnp.asarray(onehot / onehot.sum(0))


def returned_model(algo, state, params, score_fn, train, weights):
    """(model, mean of the skills' training scores) of the model a method returns: the
    algorithm's `best`. An archive's best ranks by the mean over questions, which
    weighs the skills by their numbers of questions (3 : 1 with 120 and 40), so it
    ranks an archive whose scores are weighted per question (`question_weights`, from
    `weights` (M, K)): there, the mean over questions is the mean of the skills."""
    if isinstance(state, mj.Archive):
        k = weights.shape[1]
        per_question = weights.sum(axis=1) * weights.shape[0] / k  # M / (K n_k), question_weights
        return algo.best(state.replace(scores=state.scores * per_question), params)
    model = algo.best(state, params)[0]
    return model, (score_fn(model, train) @ weights).mean()


def skill_metrics(algo, score_fn, train, weights, test_weights):
    """The runner's `metrics_fn`: the returned model's mean of skills, train and test."""

    def metrics_fn(state, params, test):
        model, train_mean = returned_model(algo, state, params, score_fn, train, weights)
        return {"train_skill_mean": train_mean, "test_skill_mean": (score_fn(model, test) @ test_weights).mean()}

    return metrics_fn


def skill_index(data: dict) -> np.ndarray:
    """(M,) int: the skill (its position in `data`) of each question of
    `per_skill_batch(data, ...)`."""
    return np.concatenate([np.full(len(prompts), i) for i, (prompts, _) in enumerate(data.values())])


@dataclasses.dataclass(frozen=True)
class Pair:
    """A trained pair with its questions and scorers, as every method sees it."""

    names: tuple
    models: dict  # "base", "specialist_a", "specialist_b"
    evaluate: Callable  # lm_analysis.skill_evaluator
    scorers: dict
    train_batch: tuple
    test_batch: tuple
    skill_of_point: np.ndarray
    weights: jax.Array  # skill_weights of the training questions
    test_weights: jax.Array
    score_fn: Callable


def prepare(training, spec, log=print) -> Pair:
    """Load (or train) the pair of `training` and build its questions (`spec`'s sizes)."""
    names = training.specialists
    train, test, test_prompts = lm_analysis.skill_sets(names, spec.train_questions, spec.test_questions,
                                                       spec.data_seed)
    trained = load_or_train(training, test_prompts, spec.cache, log=log)
    model = make_model(training)
    scorers = {s: skills.SCORERS[s] for s in names}
    skill_of_point = skill_index(train)
    return Pair(names=names,
                models={"base": trained["base"], "specialist_a": trained[names[0]], "specialist_b": trained[names[1]]},
                evaluate=lm_analysis.skill_evaluator(model, train, test), scorers=scorers,
                train_batch=per_skill_batch(train, scorers), test_batch=per_skill_batch(test, scorers),
                skill_of_point=skill_of_point, weights=skill_weights(skill_of_point),
                test_weights=skill_weights(skill_index(test)), score_fn=mixed_scores(model))


def run_evolutionary(name: str, algo, params, seeds, p: Pair, spec):
    """(RunResult, the returned model's evaluate() per run) of one evolutionary method."""
    fitness_scores = skill_weighted(p.score_fn, p.skill_of_point) if name.startswith("cma-es") else p.score_fn
    result = mj.run(algo, harness.run_keys(spec.seed, spec.runs), fitness_scores, p.train_batch, spec.forward_passes,
                    params=params, seed_models=seeds, test_data=p.test_batch, log_every=spec.log_every,
                    progress=not spec.no_progress, name=name,
                    metrics_fn=skill_metrics(algo, p.score_fn, p.train_batch, p.weights, p.test_weights))
    pick = jax.jit(lambda state: returned_model(algo, state, params, p.score_fn, p.train_batch, p.weights)[0])
    return result, [p.evaluate(pick(jax.tree.map(lambda x: x[r], result.state))) for r in range(spec.runs)]


def run_pair(pair: str, training, spec, log=print) -> dict:
    """Every method on one pair: the record of `pairs[pair]` in lm_skills.json."""
    t0 = time.perf_counter()
    p = prepare(training, spec, log)
    names, models, evaluate, scorers = p.names, p.models, p.evaluate, p.scorers
    keys = harness.run_keys(spec.seed, spec.runs)
    t_trained = time.perf_counter()

    per_run, train_scores, wall, curves, coefficients = {}, {}, {}, {}, {}
    for name in SEEDS:
        scores = evaluate(models[name])
        per_run[name], train_scores[name] = [scores["test"]] * spec.runs, scores["train"]
    own = lambda i: (lambda params: evaluate(params)["test"][names[i]])
    stats = lm_analysis.task_vector_stats(models["base"], models["specialist_a"], models["specialist_b"], own(0),
                                          own(1), unit=lm_analysis.transformer_unit)
    reach = lm_analysis.reachability(models["base"], models["specialist_a"], models["specialist_b"], evaluate)
    t_analysis = time.perf_counter()
    log(f"pair {pair}: task vectors {stats['norm_over_base_norm']}, cosine {stats['cosine']:.3f}; "
        f"reachable {lm_analysis.reachability_summary(reach)}")

    skill_mean = lambda params, _data: float(np.mean(list(evaluate(params, ("train",))["train"].values())))
    for name in spec.methods:
        t = time.perf_counter()
        if name in OPERATORS:
            merge_keys = [jax.random.fold_in(k, 1) for k in (keys if name == "dare" else keys[:1])]
            found = lm_operators.best_merges(name, models, skill_mean, None, merge_keys)
            found = found * (spec.runs // len(found))
            scores = [evaluate(f[0]) for f in found]
            coefficients[name] = [f[1] for f in found]
        else:
            result, scores = run_evolutionary(name, *algorithm(name, models, p.skill_of_point, spec), p, spec)
            curves[name] = {"forward_passes": result.passes.tolist(),
                            "test_score_mean": result.metrics["test_skill_mean"].mean(0).tolist(),
                            "train_score_mean": result.metrics["train_skill_mean"].mean(0).tolist()}
        per_run[name] = [s["test"] for s in scores]
        train_scores[name] = {k: float(np.mean([s["train"][k] for s in scores])) for k in names}
        wall[name] = time.perf_counter() - t
        mean = np.mean([np.mean(list(s["test"].values())) for s in scores])
        log(f"pair {pair} {name}: test mean of skills {100 * mean:.1f} % ({wall[name]:.0f} s)")

    reported = (*SEEDS, *spec.methods)
    runs, means, stderr = lm_analysis.summary(per_run, reported, names)
    return {
        "skills": list(names),
        "scorers": scorers,
        "test_skill_mean": {m: means[m]["mean"] for m in reported},
        "test_skill_mean_stderr": {m: stderr[m]["mean"] for m in reported},
        "test_score": {m: {s: means[m][s] for s in names} for m in reported},
        "test_score_stderr": {m: {s: stderr[m][s] for s in names} for m in reported},
        "test_score_runs": runs,
        "train_score": train_scores,
        "coefficients": coefficients,
        "curves": curves,
        "task_vectors": stats,
        "reachability": reach,
        "reachability_best": lm_analysis.reachability_summary(reach),
        "training": {"cache": training.tag(), **{k: v for k, v in vars(training).items()}},
        "num_params": mj.num_params(models["base"]),
        "train_questions": dict(zip(names, spec.train_questions)),
        "test_questions_per_skill": spec.test_questions,
        "wall_seconds": {"training_or_cache": t_trained - t0, "analysis": t_analysis - t_trained, **wall,
                         "total": time.perf_counter() - t0},
    }
