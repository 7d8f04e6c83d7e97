"""M2N2, Model Merging of Natural Niches (Abrantes, Lange, Tang, GECCO 2025, arXiv 2508.16204).

A steady-state evolution over an archive of N models (SPEC.md): parents are sampled by
resource-normalised fitness and attraction, merged with the split-point slerp, mutated
when evolving from scratch, and the child competes with the N archive models; the one
with the lowest fitness leaves. The switches that give the paper's ablations are static
fields of `M2N2`; the numbers are `Params`, traced.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from m2n2_jax import archive as archive_lib
from m2n2_jax.archive import Archive
from m2n2_jax.base import Algorithm
from m2n2_jax.fitness import resource_fitness
from m2n2_jax.merge import num_params, slerp, split_point_slerp
from m2n2_jax.mutation import gaussian_mutation
from m2n2_jax.selection import proportional, sample, sample_parents


@struct.dataclass
class Params:
    """Dynamic hyperparameters of M2N2 (traced; a sweep is a `vmap` over them).

    Attributes:
      alpha: exponent of the resource normaliser z_j = (sum_i S[i, j])**alpha; 0 turns
        competition off (plain summed score, an ordinary GA).
      mutation_std: std of the Gaussian noise added to every child coordinate (used
        when `M2N2.mutation` is on; the paper: 0.01 from scratch).
      slerp_eps: below this sin(Omega) the merge falls back to linear interpolation.
      capacity: c, shape (M,), the supply of each resource; None means all ones.
    """

    alpha: jax.Array = 1.0
    mutation_std: jax.Array = 0.01
    slerp_eps: jax.Array = 1e-6
    capacity: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class M2N2(Algorithm):
    """M2N2 and its ablations (static structure; hashable).

    Attributes:
      archive_size: N, the number of models kept (>= 2).
      attraction: sample parent B by complementarity to A (else B ~ f, like A).
      crossover: merge two parents; if False the child is a copy of parent A (then
        mutated): the "no crossover" ablations.
      split_point: use the split-point slerp; if False a plain slerp with one ratio.
      mutation: add N(0, mutation_std^2) noise to each child (off when merging
        pre-trained models).
    """

    archive_size: int = 20
    attraction: bool = True
    crossover: bool = True
    split_point: bool = True
    mutation: bool = True

    def __post_init__(self):
        if not isinstance(self.archive_size, int) or self.archive_size < 2:
            raise ValueError(f"archive_size must be an int >= 2, got {self.archive_size!r}")

    def default_params(self) -> Params:
        return Params(alpha=jnp.float32(1.0), mutation_std=jnp.float32(0.01), slerp_eps=jnp.float32(1e-6))

    def init(self, key, seed_models, seed_scores, params: Params) -> Archive:
        """An archive of `archive_size` slots with the seeds inserted in order by the tell rule."""
        template = jax.tree.map(lambda x: x[0], seed_models)
        state = archive_lib.empty(template, self.archive_size, seed_scores.shape[1])
        return self.tell(key, state, seed_models, seed_scores, params)

    def ask(self, key, state: Archive, params: Params):
        """Sample parents, merge them, mutate: one child, stacked (1, ...)."""
        key_parents, key_ratio, key_split, key_noise = jax.random.split(key, 4)
        per_point, fitness = resource_fitness(state.scores, params.alpha, params.capacity)
        if self.crossover:
            a, b = sample_parents(key_parents, per_point, fitness, state.occupied, self.attraction)
            parent_a, parent_b = archive_lib.get(state, a), archive_lib.get(state, b)
            ratio = jax.random.uniform(key_ratio)
            if self.split_point:
                split = jax.random.randint(key_split, (), 0, num_params(parent_a))
                child = split_point_slerp(parent_a, parent_b, ratio, split, params.slerp_eps)
            else:
                child = slerp(parent_a, parent_b, ratio, params.slerp_eps)
        else:
            child = archive_lib.get(state, sample(key_parents, proportional(fitness, state.occupied)))
        if self.mutation:
            child = gaussian_mutation(key_noise, child, params.mutation_std)
        return jax.tree.map(lambda x: x[None], child), state

    def tell(self, key, state: Archive, children, scores, params: Params) -> Archive:
        """Each child in turn competes with the N archive models; the lowest fitness leaves."""
        del key

        def insert(state, child, child_scores):
            _, fitness = resource_fitness(jnp.concatenate([state.scores, child_scores[None]]),
                                          params.alpha, params.capacity)
            return archive_lib.insert_worst_leaves(state, child, child_scores, fitness)[0]

        return archive_lib.insert_each(state, children, scores, insert)

    def best(self, state: Archive):
        """The occupied model with the best plain training score (first on ties)."""
        return archive_lib.best(state)
