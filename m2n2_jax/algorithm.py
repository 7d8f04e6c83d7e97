"""M2N2 as init / ask / tell / best (Abrantes, Lange, Tang, GECCO 2025, arXiv 2508.16204).

All state is an `Archive` pytree and all hyperparameters are a static `Config`, so one
step is a pure function and a whole run is a `lax.scan` (see `runner.run`). Scores are
maximised.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from m2n2_jax import archive as archive_lib
from m2n2_jax.archive import Archive
from m2n2_jax.config import Config
from m2n2_jax.fitness import resource_fitness
from m2n2_jax.merge import num_params, slerp, split_point_slerp
from m2n2_jax.mutation import gaussian_mutation
from m2n2_jax.selection import proportional, sample, sample_parents

State = Archive


class Algorithm(NamedTuple):
    """Four pure functions that `runner.run` drives; configuration is bound in.

    init(key, seed_models, seed_scores) -> state   seed_models stacked (S, ...)
    ask(key, state) -> child                         a model pytree
    tell(state, child, child_scores) -> state        child_scores (M,)
    best(state) -> index                             slot of the best-train model
    """

    init: Callable[..., Any]
    ask: Callable[..., Any]
    tell: Callable[..., Any]
    best: Callable[..., Any]


def init(key: jax.Array, seed_models, seed_scores: jax.Array, config: Config,
         capacity: jax.Array | None = None) -> State:
    """An archive of `config.archive_size` slots with the seed models inserted in order.

    Args:
      key: unused by M2N2 (its init is deterministic); kept for a common signature.
      seed_models: pytree with leading axis S (1 <= S), the seed models stacked.
      seed_scores: float (S, M), each seed's per-datapoint scores in [0, 1].
      config: Config.
      capacity: optional per-datapoint capacity c (M,); stored in no state, pass it
        to `ask` and `tell` too (see `algorithm`).
    """
    del key
    num_seeds, num_points = seed_scores.shape
    template = jax.tree.map(lambda x: x[0], seed_models)
    state = archive_lib.empty(template, config.archive_size, num_points)
    for i in range(num_seeds):
        state = tell(state, jax.tree.map(lambda x: x[i], seed_models), seed_scores[i], config, capacity)
    return state


def ask(key: jax.Array, state: State, config: Config, capacity: jax.Array | None = None):
    """Sample parents, merge them, mutate: one child pytree (no evaluation)."""
    key_parents, key_ratio, key_split, key_noise = jax.random.split(key, 4)
    per_point, fitness = resource_fitness(state.scores, config.alpha, capacity)
    if config.crossover:
        a, b = sample_parents(key_parents, per_point, fitness, state.occupied, config.attraction)
        parent_a, parent_b = archive_lib.get(state, a), archive_lib.get(state, b)
        ratio = jax.random.uniform(key_ratio)
        if config.split_point:
            split = jax.random.randint(key_split, (), 0, num_params(parent_a))
            child = split_point_slerp(parent_a, parent_b, ratio, split, config.slerp_eps)
        else:
            child = slerp(parent_a, parent_b, ratio, config.slerp_eps)
    else:
        child = archive_lib.get(state, sample(key_parents, proportional(fitness, state.occupied)))
    if config.mutation_std > 0:
        child = gaussian_mutation(key_noise, child, config.mutation_std)
    return child


def tell(state: State, child, child_scores: jax.Array, config: Config,
         capacity: jax.Array | None = None) -> State:
    """N archive models and the child compete; the lowest fitness leaves."""
    scores = jnp.concatenate([state.scores, child_scores[None].astype(jnp.float32)])
    _, fitness = resource_fitness(scores, config.alpha, capacity)
    state, _ = archive_lib.insert_worst_leaves(state, child, child_scores, fitness)
    return state


def best(state: State) -> jax.Array:
    """Slot of the occupied model with the best plain training score (first on ties)."""
    return jnp.argmax(jnp.where(state.occupied, state.scores.mean(axis=1), -jnp.inf))


def m2n2(config: Config, capacity: jax.Array | None = None) -> Algorithm:
    """M2N2 with `config` (and an optional capacity vector) bound in."""
    return Algorithm(
        init=lambda key, models, scores: init(key, models, scores, config, capacity),
        ask=lambda key, state: ask(key, state, config, capacity),
        tell=lambda state, child, scores: tell(state, child, scores, config, capacity),
        best=best,
    )
