"""MAP-Elites baseline (Mouret & Clune, 2015) as used in the M2N2 paper.

A grid of `bins` x `bins` cells over a 2-D descriptor in [0, 1]^2 computed from a
model's per-datapoint scores (for digits: accuracy on odd and on even digits); the
quality is the plain training score. Both parents are drawn proportionally to quality
among filled cells, merged with the split-point slerp and mutated; the child takes its
cell if the cell is empty or it is strictly better.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from m2n2_jax import archive as archive_lib
from m2n2_jax.algorithm import Algorithm, best
from m2n2_jax.archive import Archive
from m2n2_jax.merge import num_params, split_point_slerp
from m2n2_jax.mutation import gaussian_mutation
from m2n2_jax.selection import proportional, sample


@dataclasses.dataclass(frozen=True)
class MapElitesConfig:
    """Hyperparameters of the MAP-Elites baseline.

    Attributes:
      descriptor_fn: scores (M,) -> (2,) descriptor in [0, 1] (a pure jnp function).
      bins: cells per descriptor axis; the archive has bins**2 slots.
      mutation_std: Gaussian mutation std (0 for pre-trained merging).
      slerp_eps: linear-interpolation threshold of the merge.
    """

    descriptor_fn: Callable[[jax.Array], jax.Array]
    bins: int = 10
    mutation_std: float = 0.01
    slerp_eps: float = 1e-6

    def __post_init__(self):
        if not isinstance(self.bins, int) or self.bins < 1:
            raise ValueError(f"bins must be an int >= 1, got {self.bins!r}")
        if not self.mutation_std >= 0:
            raise ValueError(f"mutation_std must be >= 0, got {self.mutation_std!r}")


def group_means(groups: jax.Array, num_groups: int = 2) -> Callable[[jax.Array], jax.Array]:
    """A descriptor_fn giving the mean score over each datapoint group.

    Args:
      groups: int (M,), group id in [0, num_groups) of each datapoint.
    """
    one_hot = jax.nn.one_hot(jnp.asarray(groups), num_groups, dtype=jnp.float32).T
    weights = one_hot / jnp.maximum(one_hot.sum(axis=1, keepdims=True), 1.0)
    return lambda scores: weights @ scores


def cell(descriptor: jax.Array, bins: int) -> jax.Array:
    """Flat cell index of a descriptor in [0, 1]^2 (1.0 falls in the last bin)."""
    ij = jnp.clip(jnp.floor(descriptor * bins).astype(jnp.int32), 0, bins - 1)
    return ij[0] * bins + ij[1]


def init(key, seed_models, seed_scores, config: MapElitesConfig) -> Archive:
    """An empty grid with the seed models inserted in order."""
    del key
    template = jax.tree.map(lambda x: x[0], seed_models)
    state = archive_lib.empty(template, config.bins**2, seed_scores.shape[1])
    for i in range(seed_scores.shape[0]):
        state = tell(state, jax.tree.map(lambda x: x[i], seed_models), seed_scores[i], config)
    return state


def ask(key, state: Archive, config: MapElitesConfig):
    """Two parents ~ quality, split-point slerp, mutation."""
    key_a, key_b, key_ratio, key_split, key_noise = jax.random.split(key, 5)
    probs = proportional(state.scores.mean(axis=1), state.occupied)
    parent_a = archive_lib.get(state, sample(key_a, probs))
    parent_b = archive_lib.get(state, sample(key_b, probs))
    split = jax.random.randint(key_split, (), 0, num_params(parent_a))
    child = split_point_slerp(parent_a, parent_b, jax.random.uniform(key_ratio), split, config.slerp_eps)
    if config.mutation_std > 0:
        child = gaussian_mutation(key_noise, child, config.mutation_std)
    return child


def tell(state: Archive, child, child_scores, config: MapElitesConfig) -> Archive:
    """The child takes its cell if empty or if its quality is strictly higher."""
    index = cell(config.descriptor_fn(child_scores), config.bins)
    better = child_scores.mean() > state.scores[index].mean()
    accept = ~state.occupied[index] | better
    return archive_lib.replace(state, index, child, child_scores.astype(jnp.float32), accept)


def map_elites(config: MapElitesConfig) -> Algorithm:
    """MAP-Elites with `config` bound in, for `runner.run`."""
    return Algorithm(
        init=lambda key, models, scores: init(key, models, scores, config),
        ask=lambda key, state: ask(key, state, config),
        tell=lambda state, child, scores: tell(state, child, scores, config),
        best=best,
    )
