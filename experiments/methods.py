"""The methods of the paper's experiments by name: each an (algorithm, params) pair.

Built here once and used by every protocol (digits, the LM merge, the diffusion merge):
a protocol states its `Settings` (the real-model options of M2N2 among them) and asks
for methods by name. M2N2's ablations are static switches of `M2N2` plus, for the GA,
alpha = 0 in its params; the baselines are values of the same contract, so every
method runs through `m2n2_jax.run`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from m2n2_jax.algorithms import M2N2, MapElites, SlerpGrid

M2N2_VARIANTS = {  # name -> (static switches, alpha)
    "m2n2": ({}, 1.0),
    "m2n2-no-crossover": ({"crossover": False}, 1.0),
    "m2n2-no-splitpoint": ({"split_point": False}, 1.0),
    "m2n2-no-attraction": ({"attraction": False}, 1.0),
    "ga": ({"attraction": False}, 0.0),
    "ga-no-crossover": ({"attraction": False, "crossover": False}, 0.0),
}
ES = {"cma-es": "CMA_ES", "sep-cma-es": "Sep_CMA_ES"}  # evosax class names
MERGE_ES = {  # CMA-ES over merge coefficients per group: name -> recipe
    "slerp-cma-es": "slerp", "ta-cma-es": "task_arithmetic", "ties-cma-es": "ties", "dare-cma-es": "dare"}
TASK_VECTORS = "m2n2-task-vectors"  # our extension: M2N2 over task vectors on Settings.base
METHODS = tuple(M2N2_VARIANTS) + (TASK_VECTORS, "map-elites", "brute-force") + tuple(ES) + tuple(MERGE_ES)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the methods need beyond their name.

    Attributes:
      mutation_std: 0.01 from scratch; 0 merges pre-trained models without mutation.
      archive_size: N of the M2N2 family.
      descriptor: (2, M) MAP-Elites descriptor matrix (`group_descriptor`).
      bins: MAP-Elites cells per axis.
      num_ratios: brute-force grid size (the budget).
      population: ES population size.
      std_init: ES initial step size.
      template: a model (or its ShapeDtypeStructs) for the ES.
      groups: leaf path -> group label: one merge coefficient per group for the
        merge-coefficient ES (`MergeES`); None: one group.
      num_models: K, the models merged on top of the base by the task-vector ES
        (seeds: the base, then K models).
      density: kept fraction of the task vectors (TIES, DARE).
      warmup, capacity_rule, capacity, subtract_worst: M2N2's real-model options
        (`M2N2Params.warmup`, `M2N2.capacity_rule`, `M2N2Params.capacity`,
        `M2N2.subtract_worst`).
      m2n2_groups: M2N2's own parameter groups (a leaf-path labelling function).
      base, magnitude_std, task_vector_norm: the task-vector M2N2 (its groups are
        `groups`, as the merge-coefficient ES's).
    """

    mutation_std: float = 0.01
    archive_size: int = 20
    descriptor: object = None
    bins: int = 10
    num_ratios: int = 10_000
    population: int = 20
    std_init: float = 0.01
    template: object = None
    groups: object = None
    num_models: int = 2
    density: float = 0.5
    warmup: int = 0
    capacity_rule: str = "fixed"
    capacity: object = None
    subtract_worst: bool = False
    m2n2_groups: object = None
    base: object = None
    magnitude_std: float = 0.0
    task_vector_norm: str = "merge"


def make_method(name: str, settings: Settings = Settings()):
    """(algorithm, params) of the method called `name` (one of METHODS)."""
    mutation = settings.mutation_std > 0
    std = jnp.float32(settings.mutation_std)
    if name in M2N2_VARIANTS or name == TASK_VECTORS:
        switches, alpha = M2N2_VARIANTS.get(name, ({}, 1.0))
        options = dict(capacity_rule=settings.capacity_rule, subtract_worst=settings.subtract_worst,
                       groups=settings.m2n2_groups)
        if name == TASK_VECTORS:
            if settings.base is None:
                raise ValueError(f"{name} needs Settings.base, the common base model")
            options.update(task_vectors=True, groups=settings.groups, task_vector_norm=settings.task_vector_norm)
        algorithm = M2N2(archive_size=settings.archive_size, mutation=mutation, **options, **switches)
        params = algorithm.default_params().replace(alpha=jnp.float32(alpha), mutation_std=std,
                                                    warmup=jnp.int32(settings.warmup))
        if settings.capacity is not None:
            params = params.replace(capacity=settings.capacity)
        if name == TASK_VECTORS:
            params = params.replace(base=settings.base, magnitude_std=jnp.float32(settings.magnitude_std))
        return algorithm, params
    if name == "map-elites":
        if settings.descriptor is None:
            raise ValueError("map-elites needs a descriptor matrix (2, M)")
        algorithm = MapElites(bins=settings.bins, mutation=mutation)
        params = algorithm.default_params().replace(descriptor=jnp.asarray(settings.descriptor, jnp.float32),
                                                    mutation_std=std)
        return algorithm, params
    if name == "brute-force":
        return SlerpGrid(num_ratios=settings.num_ratios), None
    if name in ES:
        from evosax import algorithms  # the experiments extra

        from m2n2_jax.algorithms import EvosaxES

        if settings.template is None:
            raise ValueError(f"{name} needs a model template")
        algorithm = EvosaxES.for_model(getattr(algorithms, ES[name]), settings.template, settings.population)
        return algorithm, algorithm.default_params().replace(std_init=jnp.float32(settings.std_init))
    if name in MERGE_ES:
        from evosax import algorithms

        from m2n2_jax.algorithms import MergeES

        if settings.template is None:
            raise ValueError(f"{name} needs a model template")
        recipe = MERGE_ES[name]
        algorithm = MergeES.for_model(algorithms.CMA_ES, recipe, settings.template, settings.groups,
                                      1 if recipe == "slerp" else settings.num_models, settings.population)
        params = algorithm.default_params()
        return algorithm, params.replace(es=params.es.replace(std_init=jnp.float32(settings.std_init)),
                                         density=jnp.float32(settings.density))
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
