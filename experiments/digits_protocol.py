"""What the two digits experiments share: their settings, their data and one run of a method.

Both write OUT/METHOD.json (fields: `harness.run_record`, plus the settings that change
a result); a refused or failed run writes nothing. `--dataset mnist` swaps the paper's
8x8 digits for real MNIST (tasks.mnist, prepared by `make mnist`; docs/mnist.md) and
widens the MLP's input to 784.
"""

from __future__ import annotations

import dataclasses
import os

import jax

import m2n2_jax as mj
from experiments import harness, methods
from experiments.harness import AT_LEAST_2, NON_NEGATIVE, POSITIVE, flag
from experiments.mnist_data import DATA_DIR
from m2n2_jax.tasks import digits, mnist

INPUTS = {"digits": digits.INPUTS, "mnist": mnist.INPUTS}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The command line of experiments/from_scratch.py and experiments/pretrained.py (a contract)."""

    method: str = flag("m2n2", "the method (see --help's choices)", type=methods.method_name)
    runs: int = flag(10, "independent runs (seeds)", POSITIVE)
    forward_passes: int = flag(50_000, "budget per run, seeds included", POSITIVE)
    seed: int = flag(42, "first seed; runs use seed .. seed+runs-1")
    dataset: str = flag("digits", "scikit-learn's 8x8 digits (the paper's) or real MNIST 28x28 (`make mnist` first)",
                        choices=tuple(INPUTS))
    train_size: int | None = flag(None, "train on the first N training images only (default: all)", POSITIVE)
    data_dir: str = flag(DATA_DIR, "tensorflow-datasets folder of --dataset mnist", result=False)
    out: str = flag("experiments/results/from_scratch", "output directory", result=False)
    hidden: int = flag(256, "MLP hidden width (paper: 256)", POSITIVE)
    archive_size: int = flag(20, "archive size of the M2N2 family", AT_LEAST_2)
    archive: str = flag("models", "the M2N2 family's archive: whole models, or recipes over the seeds (no mutation; "
                                  "docs/recipes.md)", choices=("models", "recipes"))
    mutation_std: float = flag(0.01, "Gaussian mutation std (0: no mutation)", NON_NEGATIVE)
    log_every: int = flag(100, "log every this many passes", POSITIVE)
    population: int = flag(20, "ES population size", AT_LEAST_2)
    std_init: float = flag(0.01, "ES initial step size sigma_0", POSITIVE)
    no_progress: bool = flag(False, "no progress bar", result=False)
    time_limit: float | None = flag(None, "stop after the first compiled call that ends past this many seconds; "
                                          "the JSON then records the passes spent", POSITIVE, result=False)
    generations_per_call: int | None = flag(None, "steps (ES: generations) per compiled call", POSITIVE, result=False)
    checkpoint_every: int | None = flag(None, "save the whole run with orbax every this many passes",
                                        POSITIVE, result=False)
    checkpoint_dir: str | None = flag(None, "default: OUT/checkpoints/METHOD", result=False)
    resume: str | None = flag(None, "continue the run checkpointed in DIR (same settings); keeps checkpointing there",
                              result=False)


def load_data(spec: Protocol):
    """((x_train, y_train), (x_test, y_test)) of spec.dataset, training on its first
    spec.train_size images; exits with one line where that is impossible."""
    try:
        if spec.dataset == "mnist":
            return mnist.load_mnist(spec.data_dir, spec.train_size)
        train, test = digits.load_digits()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if spec.train_size is not None:
        if spec.train_size > len(train[1]):
            raise SystemExit(f"error: --train-size {spec.train_size}: digits has {len(train[1])} training images")
        train = tuple(a[: spec.train_size] for a in train)
    return train, test


def check_cma_es_memory(spec: Protocol) -> None:
    """Exit with one line, before any work, where full CMA-ES cannot hold its state: evosax's
    CMA_ES keeps the covariance C and its eigenvectors B (D x D float32 each) plus five
    D-vectors per run, and needs more D x D temporaries in every ask and tell."""
    if spec.method != "cma-es":
        return
    d = digits.num_params(digits.widths(spec.hidden, INPUTS[spec.dataset]))
    need = spec.runs * 4 * (2 * d * d + 5 * d)
    devices = jax.devices()
    if devices[0].platform == "cpu":
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "memory"
    else:
        have, where = sum((x.memory_stats() or {}).get("bytes_limit", 0) for x in devices), "accelerator memory"
    if need > have:
        raise SystemExit(f"error: cma-es at D = {d:,} needs {need / 2**30:,.1f} GiB for its state alone "
                         f"({spec.runs} run(s) x C and B, {d:,}^2 float32 each), more than the "
                         f"{have / 2**30:,.1f} GiB of {where} here; use sep-cma-es")


def checkpointing(spec: Protocol, experiment: str) -> mj.Checkpointing | None:
    """The run's `Checkpointing`; its metadata is the settings that change the result."""
    if spec.resume is None and spec.checkpoint_every is None:
        return None
    meta = {"experiment": experiment, **harness.result_fields(spec)}
    every = spec.checkpoint_every or 1000
    if spec.resume is not None:
        if not os.path.isdir(spec.resume):
            raise SystemExit(f"error: --resume {spec.resume}: no such checkpoint directory")
        return mj.Checkpointing(spec.resume, every, resume=True, meta=meta)
    return mj.Checkpointing(spec.checkpoint_dir or os.path.join(spec.out, "checkpoints", spec.method), every, meta=meta)


def evolve(spec: Protocol, experiment: str, train, test, *, seed_models=None, seed_fn=None, **extra) -> dict:
    """Run `spec.method` through `m2n2_jax.run`, write OUT/METHOD.json, return the record."""
    template = digits.init_mlp(jax.random.key(0), spec.hidden, inputs=train[0].shape[1])
    settings = methods.Settings(
        m2n2=methods.M2N2Settings(mutation_std=spec.mutation_std, archive_size=spec.archive_size,
                                  archive=spec.archive, max_children=spec.forward_passes),
        map_elites=methods.MapElitesSettings(descriptor=mj.label_descriptor(digits.parity_labels(train[1])),
                                             mutation_std=spec.mutation_std),
        slerp_grid=methods.SlerpGridSettings(num_ratios=spec.forward_passes),
        es=methods.ESSettings(template=template, population=spec.population, std_init=spec.std_init),
        merge_es=methods.MergeESSettings(template=template, groups=digits.layer_of, population=spec.population,
                                         std_init=spec.std_init))
    try:
        algorithm, params = methods.make_method(spec.method, settings)
        result = mj.run(algorithm, harness.run_keys(spec.seed, spec.runs), digits.classification_scores, train,
                        spec.forward_passes, params=params, seed_models=seed_models, seed_fn=seed_fn,
                        test_data=test, log_every=spec.log_every, steps_per_call=spec.generations_per_call,
                        checkpoint=checkpointing(spec, experiment), time_limit=spec.time_limit,
                        progress=not spec.no_progress, name=spec.method)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if isinstance(algorithm, mj.SlerpGrid):
        extra["best_ratio"] = float(result.state.best_ratio[0])
    record = harness.run_record(
        spec.method, list(range(spec.seed, spec.seed + spec.runs)), result, experiment=experiment,
        settings=harness.result_fields(spec), hidden=spec.hidden, num_params=mj.num_params(template),
        archive_size=spec.archive_size, mutation_std=spec.mutation_std, budget_forward_passes=spec.forward_passes,
        **extra)
    path = os.path.join(spec.out, f"{spec.method}.json")
    record = harness.write_json(path, record)
    print(f"{spec.method}: final test accuracy {record['final_test_accuracy_mean']:.4f} "
          f"± {record['final_test_accuracy_stderr']:.4f} (stderr, {spec.runs} runs), "
          f"{result.wall_seconds:.1f} s -> {path}")
    return record
