"""m2n2_jax: Model Merging of Natural Niches (M2N2) in JAX.

The public API, re-exported from modules named by concept. Tasks (data, models,
scores of the experiments) live in `m2n2_jax.tasks`, imported explicitly; safetensors
I/O in `m2n2_jax.safetensors_io` (needs the `safetensors` package).
"""

from m2n2_jax import merge_ops
from m2n2_jax.algorithm import M2N2, Params
from m2n2_jax.archive import Archive
from m2n2_jax.base import Algorithm
from m2n2_jax.baselines.brute_force import SlerpGrid
from m2n2_jax.baselines.evosax_es import EvosaxES
from m2n2_jax.baselines.map_elites import MapElites, group_descriptor
from m2n2_jax.baselines.merge_es import MergeES
from m2n2_jax.checkpoint import Checkpointing
from m2n2_jax.fitness import attraction, resource_fitness
from m2n2_jax.merge import PathPrefix, leaf_groups, leaf_path, num_params, slerp, slerp_coefficients, split_point_slerp
from m2n2_jax.mutation import MUTATION_RNGS, gaussian_mutation
from m2n2_jax.runner import RunResult, best_model_metrics, evolve, init_state, run, step
from m2n2_jax.scoring import evaluate
from m2n2_jax.selection import proportional, sample_parents

__all__ = [
    "Algorithm", "Archive", "Checkpointing", "EvosaxES", "M2N2", "MUTATION_RNGS", "MapElites", "MergeES", "Params",
    "PathPrefix", "RunResult", "SlerpGrid",
    "attraction", "best_model_metrics", "evaluate", "evolve", "gaussian_mutation", "group_descriptor", "init_state",
    "leaf_groups", "leaf_path", "merge_ops", "num_params", "proportional", "resource_fitness", "run", "sample_parents", "slerp",
    "slerp_coefficients", "split_point_slerp", "step",
]
__version__ = "0.2.0"
