"""Parent sampling (docs/algorithm.md#selection).

Probabilities are proportional to non-negative weights restricted to occupied slots;
if every occupied weight is zero, sampling falls back to uniform over occupied slots
(the reference code divides by zero there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2n2_jax.fitness import attraction


def proportional(weights: jax.Array, occupied: jax.Array) -> jax.Array:
    """Probabilities proportional to `weights` over `occupied` slots, shape (N,).

    Empty slots get probability 0; all-zero weights give uniform over occupied slots.
    """
    w = jnp.where(jnp.asarray(occupied), jnp.asarray(weights, jnp.float32), 0.0)
    total = w.sum()
    fallback = occupied.astype(w.dtype)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), fallback / fallback.sum())


def sample(key: jax.Array, probs: jax.Array) -> jax.Array:
    """One index drawn from `probs` (N,), an int32 scalar."""
    return jax.random.choice(key, probs.shape[0], p=probs)


def sample_parents(
    key: jax.Array,
    per_point: jax.Array,
    fitness: jax.Array,
    occupied: jax.Array,
    use_attraction: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Draw parents A ~ f and B ~ g(A, .) (or B ~ f without attraction).

    Args:
      key: PRNG key.
      per_point: F, shape (N, M).
      fitness: f, shape (N,).
      occupied: bool (N,), False for empty slots, which are never parents.
      use_attraction: if False, A and B are independent draws from f (they may coincide).

    Returns:
      (a, b) int32 scalars. With attraction, b != a unless A has zero attraction to
      every other model, in which case b is drawn from f instead.
    """
    key_a, key_b = jax.random.split(key)
    p_f = proportional(fitness, occupied)
    a = sample(key_a, p_f)
    if not use_attraction:
        return a, sample(key_b, p_f)
    g = attraction_probs(per_point, a, occupied)
    p_b = jnp.where(g.sum() > 0, g, p_f)
    return a, sample(key_b, p_b)


def attraction_probs(per_point: jax.Array, a: jax.Array, occupied: jax.Array) -> jax.Array:
    """g(A, .) normalised over occupied slots, or all zeros if A dominates, shape (N,)."""
    g = jnp.where(occupied, attraction(per_point, a), 0.0)
    total = g.sum()
    return g / jnp.where(total > 0, total, 1.0)
