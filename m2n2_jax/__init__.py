"""m2n2_jax: Model Merging of Natural Niches (M2N2) in JAX.

The public API, re-exported from modules named by concept.
"""

from m2n2_jax.algorithm import Algorithm, State, ask, best, init, m2n2, tell
from m2n2_jax.archive import Archive
from m2n2_jax.checkpoint import Checkpointing
from m2n2_jax.checks import stack_models
from m2n2_jax.config import Config
from m2n2_jax.fitness import attraction, resource_fitness
from m2n2_jax import merge_ops, safetensors_io
from m2n2_jax.merge import num_params, slerp, slerp_coefficients, split_point_slerp
from m2n2_jax.methods import METHODS, make_method
from m2n2_jax.models.transformer import exact_match_scores
from m2n2_jax.mutation import gaussian_mutation
from m2n2_jax.runner import RunResult, run
from m2n2_jax.scoring import classification_scores, evaluate
from m2n2_jax.selection import proportional, sample_parents
from m2n2_jax.sharding import make_mesh

__all__ = [
    "Algorithm", "Archive", "Checkpointing", "Config", "METHODS", "RunResult", "State", "ask",
    "attraction", "best", "classification_scores", "evaluate", "exact_match_scores", "gaussian_mutation", "init",
    "m2n2", "make_mesh", "make_method", "merge_ops", "num_params", "proportional", "resource_fitness", "run", "safetensors_io", "sample_parents",
    "slerp", "slerp_coefficients", "split_point_slerp", "stack_models", "tell",
]
__version__ = "0.1.0"
