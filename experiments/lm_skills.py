"""Merging two language-model specialists: the paper's LLM experiment at CPU scale,
run as the paper runs it (issue 13), on two specialist pairs.

    python experiments/lm_skills.py --runs 4 --out experiments/results/lm_skills

A tiny character transformer is pre-trained on copying and on the short forms of two
skills, then fine-tuned into an addition specialist ("123+456=" -> "579",
specialist_a, scored 0/1 per question like GSM8K) and a string-reversal specialist
("r:abcdef=" -> "fedcba", specialist_b, scored by partial credit, the share of
characters right, a continuous reward like WebShop's); experiments/lm_models.py trains
them once and caches them with orbax. Two pairs (`--pairs`):
- a: today's recipe, set by the model flags below (dense, overlapping task vectors);
- b: `lm_models.PAIRS["b"]`, fine-tuned to resemble large-model fine-tunes
  (docs/lm_pairs.md).
Per pair, before any method: the task vectors' statistics and what is reachable from
the pair alone (lm_analysis.task_vector_stats, lm_analysis.reachability). Then every
method of experiments/lm_protocol.py: the paper's comparison (m2n2, its two ablations,
ga, map-elites, cma-es-slerp), the CMA-ES task-arithmetic merge, our M2N2 task-vector
mode, and the static operators tuned on the training questions.

Writes OUT/lm_skills.json: `pairs` -> pair -> `test_skill_mean` -> method -> the mean
over runs of the two skills' mean test score, and beside it per-skill means, standard
errors, per-run values, training scores, curves, wall times, the reachability grid and
the task-vector statistics; OUT/lm_skills_<pair>.png (test scores per skill) and
OUT/lm_skills_<pair>_curves.png (training and test curves of the evolutionary methods). Every value is checked before
any work; a refused or failed run writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

# Run as a file, sys.path[0] is experiments/: the repository root replaces it, so that each module here has
# one name, experiments.NAME (a bare `import harness` fails instead of loading a second copy).
if not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from experiments import harness

harness.use_cpu_devices(single_threaded_ops=True)

import jax
import numpy as np

from experiments import lm_analysis, lm_protocol
from experiments.harness import AT_LEAST_2, NON_NEGATIVE, POSITIVE, flag
from experiments.lm_models import CACHE, PAIRS, Training
from experiments.lm_protocol import METHODS
from experiments.methods import method_name
from m2n2_jax.tasks import skills

MIN_FORWARD_PASSES = 28  # CMA-ES over task-arithmetic weights: 3 seeds and a generation of 25


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

    runs: int = flag(4, "independent runs (seeds) of every evolutionary method and of DARE", POSITIVE)
    forward_passes: int = flag(1000, "evaluations per run of each evolutionary method, seeds included (paper: 1,000)",
                               POSITIVE)
    seed: int = flag(42, "first seed; runs use seed .. seed+runs-1")
    out: str = flag("experiments/results/lm_skills", "output directory", result=False)
    pairs: tuple[str, ...] = flag(("a", "b"), "specialist pairs to run (a: the model flags below; b: lm_models.PAIRS)",
                                  nargs="+")
    methods: tuple[str, ...] = flag(METHODS, "methods to run (default: all)", nargs="+", type=method_name)
    skills: tuple[str, str] = flag(Training.specialists, "skills of specialist_a and specialist_b",
                                   choices=skills.SKILLS[:-1], nargs=2)
    archive_size: int = flag(15, "M2N2 archive size (paper: 15)", AT_LEAST_2)
    archive: str = flag("models", "M2N2's archive: whole models, or recipes over the two seeds (docs/recipes.md)",
                        choices=("models", "recipes"))
    warmup: int = flag(50, "M2N2's first steps that merge random archive members (paper: at most 50)", NON_NEGATIVE)
    population: int = flag(25, "CMA-ES population (paper: 25)", AT_LEAST_2)
    std_init: float = flag(0.2, "CMA-ES initial step size over the merge coefficients", POSITIVE)
    magnitude_std: float = flag(0.05, "m2n2-task-vectors: std of the log of each child's per-unit magnitude",
                                NON_NEGATIVE)
    task_vector_norm: str = flag("union", "m2n2-task-vectors: the norm of each child's task vector per unit before "
                                          "its magnitude (M2N2.task_vector_norm)", choices=("merge", "union"))
    train_questions: tuple[int, ...] = flag((120, 40), "training questions per skill: one number, or one per skill "
                                                       "(paper: 1,319 GSM8K, 100 WebShop)", nargs="+")
    test_questions: int = flag(500, "test questions per skill", POSITIVE)
    log_every: int = flag(100, "log the curves every this many passes", POSITIVE)
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
        unknown = sorted(set(self.methods) - set(METHODS)) + sorted(set(self.pairs) - set(PAIRS) - {"a"})
        if unknown:
            raise ValueError(f"unknown --methods / --pairs {unknown}; methods: {', '.join(METHODS)}; "
                             f"pairs: a, {', '.join(sorted(set(PAIRS) - {'a'}))}")
        self.training()  # Training refuses what it cannot train
        if self.d_model % self.num_heads:
            raise ValueError(f"--d-model ({self.d_model}) must be a multiple of --num-heads ({self.num_heads})")
        if len(self.train_questions) == 1:
            object.__setattr__(self, "train_questions", self.train_questions * 2)
        if len(self.train_questions) != 2 or min(self.train_questions) < 1:
            raise ValueError(f"--train-questions must be one or two numbers > 0, got {self.train_questions}")
        if self.archive == "recipes" and "m2n2-task-vectors" in self.methods:
            raise ValueError("--archive recipes: m2n2-task-vectors cannot keep its archive as recipes (its "
                             "magnitudes leave the seeds' span; docs/recipes.md): leave it out of --methods")
        if len(set(self.pairs)) != len(self.pairs) or len(set(self.methods)) != len(self.methods):
            raise ValueError("--pairs and --methods must not repeat a name")
        if self.forward_passes < 3 + self.population:
            raise ValueError(f"--forward-passes must be >= 3 seeds + --population ({3 + self.population}), "
                             f"got {self.forward_passes}")
        for name in ("out", "cache"):
            path = getattr(self, name)
            if os.path.exists(path) and not os.path.isdir(path):
                raise ValueError(f"--{name} {path} exists and is not a directory")

    def training(self) -> dict:
        """{pair: the models' settings (their cache key)}: pair a from the model flags,
        the others from lm_models.PAIRS, all with these skills and data seed."""
        flags = harness.settings_of(Training, self, seed=self.data_seed, specialists=self.skills)
        return {p: flags if p == "a" else dataclasses.replace(PAIRS[p], seed=self.data_seed, specialists=self.skills)
                for p in self.pairs}


def main(argv=None) -> dict:
    spec = harness.parse(Spec, __doc__, argv)
    t_start = time.perf_counter()
    pairs = {p: lm_protocol.run_pair(p, training, spec) for p, training in spec.training().items()}
    record = {
        "experiment": "lm_skills",
        "skills": list(spec.skills),
        "methods": list(spec.methods),
        "paper_comparison": [m for m in lm_protocol.PAPER if m in spec.methods],
        "pairs": pairs,
        "runs": spec.runs,
        "seeds": list(range(spec.seed, spec.seed + spec.runs)),
        "forward_passes": spec.forward_passes,
        "archive_size": spec.archive_size,
        "warmup": spec.warmup,
        "settings": harness.result_fields(spec),
        "wall_seconds": {"total": time.perf_counter() - t_start},
        "jax_version": jax.__version__,
        "device": harness.device(),
    }
    for p, r in pairs.items():
        reported = list(r["test_skill_mean"])
        means = {m: {**r["test_score"][m], "mean": r["test_skill_mean"][m]} for m in reported}
        stderr = {m: {**r["test_score_stderr"][m], "mean": r["test_skill_mean_stderr"][m]} for m in reported}
        lm_analysis.plot(os.path.join(spec.out, f"lm_skills_{p}.png"), reported, spec.skills, means, stderr,
                         f"Pair ({p}): test scores, addition exact match and reversal partial credit "
                         f"(mean ± stderr over {spec.runs} runs)")
        if r["curves"]:
            lm_analysis.plot_curves(os.path.join(spec.out, f"lm_skills_{p}_curves.png"), r["curves"],
                                    f"Pair ({p}): the returned model's mean of the skills (mean over {spec.runs} runs)")
    harness.write_json(os.path.join(spec.out, "lm_skills.json"), record)
    for p, r in pairs.items():
        print(f"\npair {p}: {'method':<24} {spec.skills[0]:>9} {spec.skills[1]:>9} {'mean':>7}   "
              f"(test %, {spec.runs} runs)")
        for m, mean in r["test_skill_mean"].items():
            print(f"        {m:<24} " + " ".join(f"{100 * r['test_score'][m][s]:>9.1f}" for s in spec.skills)
                  + f" {100 * mean:>7.1f}")
    print(f"{time.perf_counter() - t_start:.0f} s -> {spec.out}")
    return record


if __name__ == "__main__":
    main()
