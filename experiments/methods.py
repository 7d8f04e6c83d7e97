"""The methods of the paper's experiments by name: each an (algorithm, params) pair.

Built here once and used by every protocol (digits, the LM merge, the diffusion merge):
a protocol states its `Settings`, one small dataclass per family of methods (M2N2's
real-model options among them), and asks for methods by name; a method reads only its
own family's settings. M2N2's ablations are static switches of `M2N2` plus, for the GA,
alpha = 0 in its params; the baselines are values of the same contract, so every
method runs through `m2n2_jax.run`.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax.numpy as jnp

from m2n2_jax import merge_ops
from m2n2_jax.algorithms import M2N2, MapElites, SlerpGrid

M2N2_VARIANTS = {  # name -> (static switches, alpha)
    "m2n2": ({}, 1.0),
    "m2n2-no-crossover": ({"crossover": False}, 1.0),
    "m2n2-no-splitpoint": ({"split_point": False}, 1.0),
    "m2n2-no-attraction": ({"attraction": False}, 1.0),
    "ga": ({"attraction": False}, 0.0),
    "ga-no-crossover": ({"attraction": False, "crossover": False}, 0.0),
}
TASK_VECTORS = "m2n2-task-vectors"  # our extension: M2N2 over task vectors on a common base
ES = {"cma-es": "CMA_ES", "sep-cma-es": "Sep_CMA_ES"}  # evosax class names
# CMA-ES over merge coefficients per group (`MergeES`), one method per operator of the
# registry: "cma-es-slerp", "cma-es-task-arithmetic", "cma-es-ties", "cma-es-dare". Not
# linear: on a base it is task arithmetic's sum written otherwise (the same models up to
# rounding).
MERGE_ES = {"cma-es-" + op.replace("_", "-"): op for op in merge_ops.OPERATORS if op != "linear"}
METHODS = tuple(M2N2_VARIANTS) + (TASK_VECTORS, "map-elites", "slerp-grid") + tuple(ES) + tuple(MERGE_ES)
RENAMED = {  # an earlier name -> today's, only to answer a command line that uses the old one
    "brute-force": "slerp-grid", "slerp-cma-es": "cma-es-slerp", "ta-cma-es": "cma-es-task-arithmetic",
    "ties-cma-es": "cma-es-ties", "dare-cma-es": "cma-es-dare"}


@dataclasses.dataclass(frozen=True)
class M2N2Settings:
    """m2n2, its ablations, ga and ga-no-crossover (and m2n2-task-vectors, with
    `TaskVectorSettings`).

    Attributes:
      mutation_std: 0.01 from scratch; 0 merges pre-trained models without mutation.
      archive_size: N.
      warmup, capacity_rule, capacity, subtract_worst: the real-model options
        (`M2N2Params.warmup`, `M2N2.capacity_rule`, `M2N2Params.capacity`,
        `M2N2.subtract_worst`).
      groups: M2N2's parameter groups (a leaf-path labelling function); None: one group.
      archive, max_children: `M2N2.archive` ("models" or "recipes") and, for recipes,
        `M2N2.max_children` (the children a run may ask for).
    """

    mutation_std: float = 0.01
    archive_size: int = 20
    warmup: int = 0
    capacity_rule: str = "fixed"
    capacity: object = None
    subtract_worst: bool = False
    groups: object = None
    archive: str = "models"
    max_children: int | None = None


@dataclasses.dataclass(frozen=True)
class TaskVectorSettings:
    """m2n2-task-vectors: M2N2 (with `M2N2Settings`) over task vectors on `base`.

    Attributes:
      base: the common base model (required).
      groups: its parameter groups, in place of `M2N2Settings.groups`.
      magnitude_std, task_vector_norm: `M2N2Params.magnitude_std`, `M2N2.task_vector_norm`.
    """

    base: object = None
    groups: object = None
    magnitude_std: float = 0.0
    task_vector_norm: str = "merge"


@dataclasses.dataclass(frozen=True)
class MapElitesSettings:
    """map-elites. descriptor: the (2, M) descriptor matrix (`label_descriptor`, required);
    bins: cells per axis; mutation_std: as M2N2's."""

    descriptor: object = None
    bins: int = 10
    mutation_std: float = 0.01


@dataclasses.dataclass(frozen=True)
class SlerpGridSettings:
    """slerp-grid. num_ratios: the grid's size (the budget)."""

    num_ratios: int = 10_000


@dataclasses.dataclass(frozen=True)
class ESSettings:
    """cma-es and sep-cma-es over the model's parameters. template: a model (or its
    ShapeDtypeStructs, required); population: P; std_init: sigma_0."""

    template: object = None
    population: int = 20
    std_init: float = 0.01


@dataclasses.dataclass(frozen=True)
class MergeESSettings:
    """The merge-coefficient CMA-ES methods (`MERGE_ES`).

    Attributes:
      template: a model (or its ShapeDtypeStructs, required).
      groups: leaf path -> group label, one coefficient per group; None: one group.
      num_models: K, the models merged on top of the base (seeds: the base, then K
        models); slerp merges a pair (K = 1) whatever this says.
      population, std_init: the ES's P and sigma_0.
      density: the kept fraction of the task vectors (TIES, DARE).
    """

    template: object = None
    groups: object = None
    num_models: int = 2
    population: int = 20
    std_init: float = 0.01
    density: float = 0.5


@dataclasses.dataclass(frozen=True)
class Settings:
    """Each family's settings; a protocol fills in those of the methods it runs."""

    m2n2: M2N2Settings = M2N2Settings()
    task_vectors: TaskVectorSettings = TaskVectorSettings()
    map_elites: MapElitesSettings = MapElitesSettings()
    slerp_grid: SlerpGridSettings = SlerpGridSettings()
    es: ESSettings = ESSettings()
    merge_es: MergeESSettings = MergeESSettings()


def make_method(name: str, settings: Settings = Settings()):
    """(algorithm, params) of the method called `name` (one of METHODS)."""
    if name in M2N2_VARIANTS or name == TASK_VECTORS:
        return _m2n2(name, settings.m2n2, settings.task_vectors)
    if name == "map-elites":
        return _map_elites(settings.map_elites)
    if name == "slerp-grid":
        return SlerpGrid(num_ratios=settings.slerp_grid.num_ratios), None
    if name in ES:
        return _evosax_es(name, settings.es)
    if name in MERGE_ES:
        return _merge_es(name, settings.merge_es)
    if name in RENAMED:
        raise ValueError(f"method {name!r} is now called {RENAMED[name]!r}")
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")


def method_name(name: str) -> str:
    """A command line's method name (an argparse `type`): an earlier name is refused
    with one line naming today's."""
    if name in RENAMED:
        raise argparse.ArgumentTypeError(f"method {name!r} is now called {RENAMED[name]!r}")
    return name


def _m2n2(name: str, s: M2N2Settings, tv: TaskVectorSettings):
    switches, alpha = M2N2_VARIANTS.get(name, ({}, 1.0))
    options = dict(capacity_rule=s.capacity_rule, subtract_worst=s.subtract_worst, groups=s.groups,
                   archive=s.archive, max_children=s.max_children if s.archive == "recipes" else None)
    if name == TASK_VECTORS:
        if tv.base is None:
            raise ValueError(f"{name} needs TaskVectorSettings.base, the common base model")
        options.update(task_vectors=True, groups=tv.groups, task_vector_norm=tv.task_vector_norm)
    algorithm = M2N2(archive_size=s.archive_size, mutation=s.mutation_std > 0, **options, **switches)
    params = algorithm.default_params().replace(alpha=jnp.float32(alpha), mutation_std=jnp.float32(s.mutation_std),
                                                warmup=jnp.int32(s.warmup))
    if s.capacity is not None:
        params = params.replace(capacity=s.capacity)
    if name == TASK_VECTORS:
        params = params.replace(base=tv.base, magnitude_std=jnp.float32(tv.magnitude_std))
    return algorithm, params


def _map_elites(s: MapElitesSettings):
    if s.descriptor is None:
        raise ValueError("map-elites needs a descriptor matrix (2, M)")
    algorithm = MapElites(bins=s.bins, mutation=s.mutation_std > 0)
    params = algorithm.default_params().replace(descriptor=jnp.asarray(s.descriptor, jnp.float32),
                                                mutation_std=jnp.float32(s.mutation_std))
    return algorithm, params


def _evosax_es(name: str, s: ESSettings):
    from evosax import algorithms  # the experiments extra

    from m2n2_jax.algorithms import EvosaxES

    if s.template is None:
        raise ValueError(f"{name} needs a model template")
    algorithm = EvosaxES.for_model(getattr(algorithms, ES[name]), s.template, s.population)
    return algorithm, algorithm.default_params().replace(std_init=jnp.float32(s.std_init))


def _merge_es(name: str, s: MergeESSettings):
    from evosax import algorithms

    from m2n2_jax.algorithms import MergeES

    if s.template is None:
        raise ValueError(f"{name} needs a model template")
    operator = MERGE_ES[name]
    algorithm = MergeES.for_model(algorithms.CMA_ES, operator, s.template, s.groups,
                                  1 if operator == "slerp" else s.num_models, s.population)
    params = algorithm.default_params()
    return algorithm, params.replace(es=params.es.replace(std_init=jnp.float32(s.std_init)),
                                     density=jnp.float32(s.density))
