"""m2n2_jax: Model Merging of Natural Niches (M2N2) in JAX.

The public API, re-exported from modules named by concept (docs/api.md). Every method
lives in `m2n2_jax.algorithms` (one module each, and their registry `ALGORITHMS`).
Tasks (data, models, scores of the experiments) live in `m2n2_jax.tasks`, language
models (a Llama, its checkpoints, its scorers) in `m2n2_jax.llm`, both imported
explicitly; safetensors I/O in `m2n2_jax.safetensors_io` (needs `safetensors`).
"""

__version__ = "0.3.0"  # the one source: pyproject.toml reads it

from m2n2_jax import merge_ops, recipes
from m2n2_jax.algorithms import ALGORITHMS, M2N2, EvosaxES, MapElites, MergeES, RandomSearch, SlerpGrid
from m2n2_jax.algorithms.m2n2 import Params as M2N2Params
from m2n2_jax.algorithms.m2n2 import uniform_pair
from m2n2_jax.algorithms.map_elites import label_descriptor
from m2n2_jax.archive import Archive, insert_worst_leaves
from m2n2_jax.base import Algorithm
from m2n2_jax.checkpoint import Checkpointing
from m2n2_jax.checks import check_contract
from m2n2_jax.fitness import attraction, resource_fitness
from m2n2_jax.layout import Layout, lay_out
from m2n2_jax.memory_plan import memory_plan
from m2n2_jax.merge import (
    PathPrefix,
    group_sizes,
    leaf_groups,
    leaf_path,
    num_params,
    slerp,
    slerp_coefficients,
    split_point_slerp,
)
from m2n2_jax.mutation import MUTATION_RNGS, gaussian_mutation
from m2n2_jax.runner import (
    RunResult,
    Schedule,
    evolve,
    init_state,
    lower_step,
    run,
    schedule,
    step,
    test_score_metrics,
)
from m2n2_jax.scoring import evaluate
from m2n2_jax.selection import proportional, sample_parents
from m2n2_jax.sharding import model_specs

__all__ = [
    "ALGORITHMS", "Algorithm", "Archive", "Checkpointing", "EvosaxES", "Layout", "M2N2", "M2N2Params",
    "MUTATION_RNGS", "MapElites", "MergeES", "PathPrefix", "RandomSearch", "RunResult", "Schedule", "SlerpGrid",
    "attraction", "check_contract", "evaluate", "evolve", "gaussian_mutation", "group_sizes", "label_descriptor",
    "init_state", "insert_worst_leaves", "lay_out", "leaf_groups", "leaf_path", "lower_step", "memory_plan",
    "merge_ops", "num_params",
    "model_specs", "proportional", "recipes",
    "resource_fitness", "run", "sample_parents", "schedule", "slerp", "slerp_coefficients", "split_point_slerp",
    "step", "test_score_metrics", "uniform_pair",
]
