"""The paper's image-generation merge in miniature (docs/algorithm.md#image-generation), for
experiments/diffusion.py: the problem, the methods and the evaluation.

Only the denoisers are merged; every merged model reads its captions with the JA
model's text encoder (as the paper keeps JSDXL's). The fitness of a denoiser is, per
JA training caption, the normalised similarity (`diffusion.caption_scores`) of the
image generated from the caption and fixed noise to the caption's real image.

- m2n2, m2n2-no-attraction, m2n2-no-splitpoint, ga: archive `archive_size` started
  from the four seed denoisers, a warm-up of `warmup` random merges, no mutation,
  worst subtraction, capacity "max", and two parameter groups merged independently
  (the FiLM conditioning layers, the cross-attention analog, and the rest);
- m2n2-one-group: m2n2 merging the whole denoiser as one vector;
- cma-es: the paper's baseline, CMA-ES over per-layer task-arithmetic weights of the
  JA, en-long and en-thick denoisers on en-base (`MergeES`), minimising the Fréchet
  distance of the training captions' generated images to their real images (the FID
  analog), told as the score 1 / (1 + FD);
- the seeds themselves, each with its own text encoder (the EN ones cannot read JA);
- linear, slerp, task_arithmetic, ties, dare: static merges of the four denoisers
  with the coefficient that scores best on the training captions.

A method's model: the archive's best mean training score (M2N2 family), the ES's best
genome (cma-es), or the chosen merge. It is evaluated on the held-out images
(`evaluator`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import m2n2_jax as mj
from experiments import diffusion_models, harness, methods
from m2n2_jax import merge_ops
from m2n2_jax.sharding import AXES, runs_axis_size
from m2n2_jax.tasks import captions, digits
from m2n2_jax.tasks import diffusion as df

EVOLUTIONARY = ("m2n2", "m2n2-no-attraction", "m2n2-no-splitpoint", "m2n2-one-group", "ga", "cma-es")
SEEDS = tuple(f"seed-{s}" for s in diffusion_models.SEEDS)
WEIGHTS = np.linspace(0, 1, 11)
SCALES = (0.5, 0.75, 1.0, 1.25)
GRIDS = {  # the static merges (`static_merge`): operator -> coefficient name -> the values tried
    "linear": {"weight": WEIGHTS},
    "slerp": {"weight": WEIGHTS},
    "task_arithmetic": {"scale": np.linspace(0.25, 1.5, 6)},
    "ties": {"density": (0.2, 0.5, 0.8), "scale": SCALES},
    "dare": {"density": (0.2, 0.5, 0.8), "scale": SCALES},
}
if set(GRIDS) - set(merge_ops.OPERATORS):
    raise ValueError(f"grids for {sorted(set(GRIDS) - set(merge_ops.OPERATORS))}, not merge operators")
OPERATORS = tuple(name for name in merge_ops.OPERATORS if name in GRIDS)  # the registry's order
METHODS = EVOLUTIONARY + OPERATORS
METRICS = ("test_ncs", "fid", "digit_accuracy", "en_test_ncs", "en_fid", "en_digit_accuracy", "cross_lingual")


@dataclasses.dataclass(frozen=True)
class Problem:
    """The trained models, the captions and the scorers every method sees."""

    models: dict  # diffusion_models.load_or_train
    training: diffusion_models.Training
    train_batch: tuple  # (JA tokens (M, L), noise (M, 64), real features (M, F))
    test: dict  # "ja", "en" tokens (T, L), "noise" (T, 64), "features" (T, F), "labels" (T,)
    score_fn: Callable  # denoiser params, batch -> (M,) normalised similarities (JA encoder)
    train_mean: Callable  # denoiser params -> the mean of score_fn over the training captions (jitted)
    steps: int

    @property
    def seeds(self) -> list:
        """The seed denoisers in M2N2's order: ja, en-base, en-long, en-thick."""
        return [self.models["denoisers"][s] for s in diffusion_models.SEEDS]


def prepare(spec, log=print) -> Problem:
    """Load (or train) the models and build the training and test captions."""
    (x_train, y_train), (x_test, y_test) = (tuple(map(np.asarray, split)) for split in digits.load_digits())
    thresholds = captions.fit_thresholds(x_train, y_train)
    a_train, a_test = captions.attributes(x_train, y_train, thresholds), captions.attributes(x_test, y_test, thresholds)
    t = spec.training()
    models = diffusion_models.load_or_train(t, x_train, y_train, a_train, spec.cache, log)
    encoder, denoiser, classifier = diffusion_models.modules(t)
    features = jax.jit(lambda x: classifier.apply(models["classifier"], df.to_unit(x), features=True))
    rng = np.random.default_rng(spec.data_seed)
    chosen = rng.permutation(len(x_train))[: spec.train_captions]
    k_train, k_test = jax.random.split(jax.random.key(spec.data_seed))
    train_batch = (jnp.asarray(captions.tokens(a_train[chosen], "ja")),
                   jax.random.normal(k_train, (len(chosen), df.PIXELS)), features(x_train[chosen]))
    test = {"ja": jnp.asarray(captions.tokens(a_test, "ja")), "en": jnp.asarray(captions.tokens(a_test, "en")),
            "noise": jax.random.normal(k_test, (len(x_test), df.PIXELS)), "features": features(x_test),
            "labels": jnp.asarray(y_test)}
    score_fn = df.caption_scores(denoiser, encoder, models["encoders"]["ja"], classifier, models["classifier"],
                                 spec.sampling_steps)
    train_mean = jax.jit(lambda d: score_fn(d, train_batch).mean())
    return Problem(models, t, train_batch, test, score_fn, train_mean, spec.sampling_steps)


def generator(p: Problem) -> Callable:
    """images(denoiser params, encoder params, tokens, noise) -> (B, 64), jitted once."""
    encoder, denoiser, _ = diffusion_models.modules(p.training)
    return jax.jit(lambda d, e, tokens, noise: df.generate(denoiser, encoder, e, d, tokens, noise, p.steps))


def evaluator(p: Problem) -> Callable:
    """evaluate(denoiser params, encoder params) -> {metric: float} on the test images,
    both languages read by the same encoder and generated from the same noise."""
    _, _, classifier = diffusion_models.modules(p.training)
    images = generator(p)
    c = p.models["classifier"]

    @jax.jit
    def metrics(denoiser_params, encoder_params):
        out = {}
        feats = {}
        for lang, prefix in (("ja", ""), ("en", "en_")):
            x = images(denoiser_params, encoder_params, p.test[lang], p.test["noise"])
            feats[lang] = classifier.apply(c, x, features=True)
            out[prefix + "test_ncs"] = df.similarity(feats[lang], p.test["features"]).mean()
            out[prefix + "fid"] = df.frechet_distance(feats[lang], p.test["features"])
            out[prefix + "digit_accuracy"] = (classifier.apply(c, x).argmax(-1) == p.test["labels"]).mean()
        out["cross_lingual"] = df.similarity(feats["ja"], feats["en"]).mean()
        return out

    return lambda d, e: {k: float(v) for k, v in metrics(d, e).items()}


def fid_scores(p: Problem) -> Callable:
    """score_fn of the CMA-ES baseline: 1 / (1 + FD) of the training captions' generated
    images to their real images, the same for every caption (its mean ranks as -FD)."""
    encoder, denoiser, classifier = diffusion_models.modules(p.training)
    ja, c = p.models["encoders"]["ja"], p.models["classifier"]

    def score_fn(denoiser_params, batch):
        tokens, noise, real = batch
        x = df.generate(denoiser, encoder, ja, denoiser_params, tokens, noise, p.steps)
        fd = df.frechet_distance(classifier.apply(c, x, features=True), real)
        return jnp.full(tokens.shape[:1], 1.0 / (1.0 + fd))

    return score_fn


def algorithm(name: str, p: Problem, spec):
    """(algorithm, params, seed models, score_fn) of an evolutionary method, from the
    experiments' menu (`methods.make_method`) with this protocol's settings:
    "m2n2-one-group" is m2n2 without the conditioning groups, "cma-es" the menu's
    CMA-ES over task-arithmetic weights of the three EN models on en-base."""
    d = p.models["denoisers"]
    settings = methods.Settings(
        m2n2=methods.M2N2Settings(mutation_std=0.0, archive_size=spec.archive_size, capacity_rule="max",
                                  subtract_worst=True, warmup=spec.warmup,
                                  groups=None if name == "m2n2-one-group" else df.conditioning_group),
        merge_es=methods.MergeESSettings(template=d["en-base"], groups=mj.PathPrefix(2), num_models=3,
                                         population=spec.population, std_init=spec.std_init))
    if name == "cma-es":
        algo, params = methods.make_method("cma-es-task-arithmetic", settings)
        return algo, params, [d["en-base"], d["ja"], d["en-long"], d["en-thick"]], fid_scores(p)
    algo, params = methods.make_method("m2n2" if name == "m2n2-one-group" else name, settings)
    return algo, params, p.seeds, p.score_fn


def ncs_metrics(algo, p: Problem):
    """The runner's `metrics_fn`: the returned model's mean normalised similarity on the
    training and the test JA captions (every method's curve on one scale)."""

    def metrics_fn(state, params, test):
        model = algo.best(state, params)[0]
        return {"train_ncs": p.score_fn(model, p.train_batch).mean(), "test_ncs": p.score_fn(model, test).mean()}

    return metrics_fn


def single_data_mesh(runs: int) -> Mesh:
    """Runs over the devices, the datapoints never split (the Fréchet distance needs all
    of a model's images on one device)."""
    r = runs_axis_size(runs, len(jax.devices()))
    return Mesh(np.array(jax.devices()[:r]).reshape(r, 1, 1), AXES)


def run_evolutionary(name: str, p: Problem, spec):
    """(RunResult, the returned denoiser of each run)."""
    algo, params, seeds, score_fn = algorithm(name, p, spec)
    test_batch = (p.test["ja"], p.test["noise"], p.test["features"])
    result = mj.run(algo, harness.run_keys(spec.seed, spec.runs), score_fn, p.train_batch, spec.forward_passes,
                    params=params, seed_models=seeds, test_data=test_batch, log_every=spec.log_every,
                    progress=not spec.no_progress, name=name, metrics_fn=ncs_metrics(algo, p),
                    mesh=single_data_mesh(spec.runs) if name == "cma-es" else None)
    pick = jax.jit(lambda state: algo.best(state, params)[0])
    return result, [jax.device_get(pick(jax.tree.map(lambda x: x[r], result.state))) for r in range(spec.runs)]


# Static merges of the four seed denoisers, by their names in the registry
# (`merge_ops.OPERATORS`) -> coefficient grid. Task vectors are taken on en-base, the
# other three at weight 1; "linear" and "slerp" move from the JA denoiser (weight 0) to
# the mean of the three EN ones (weight 1).
def _en_mean(d):
    return merge_ops.linear([d["en-base"], d["en-long"], d["en-thick"]], jnp.ones(3))


def static_merge(name: str, d: dict, c: dict, key):
    """The merge of the seed denoisers `d` by operator `name` with coefficients `c`."""
    op = merge_ops.operator(name)
    if "weight" in c:
        return op(key, d["ja"], [_en_mean(d)], jnp.reshape(c["weight"], (1,)))
    return op(key, d["en-base"], [d["ja"], d["en-long"], d["en-thick"]], jnp.ones(3), **c)


def best_static(name: str, p: Problem, key) -> tuple:
    """(merged denoiser, chosen coefficients) of a static operator: the grid point with
    the best mean training score (the first on ties)."""
    grid = GRIDS[name]
    merge_fn = jax.jit(functools.partial(static_merge, name))
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    scores = [float(p.train_mean(merge_fn(p.models["denoisers"], {k: jnp.float32(v) for k, v in c.items()}, key)))
              for c in points]
    chosen = points[int(np.argmax(scores))]
    model = merge_fn(p.models["denoisers"], {k: jnp.float32(v) for k, v in chosen.items()}, key)
    return model, {k: float(v) for k, v in chosen.items()}
