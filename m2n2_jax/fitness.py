"""Competition for limited resources and attraction (SPEC.md, mechanisms 1 and 2).

Scores are maximised: S[i, j] in [0, 1] is model i's score on datapoint j.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resource_fitness(
    scores: jax.Array, alpha: float | jax.Array = 1.0, capacity: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Resource-normalised fitness.

    z_j = (sum_i S[i, j])**alpha (z_j = 1 where nobody scores), F = c_j S / z_j.

    Args:
      scores: S, shape (N, M), values in [0, 1].
      alpha: competition strength (may be traced); 0 gives the plain summed score.
      capacity: c, shape (M,), the supply of each resource; ones if None.

    Returns:
      (F, f): per-datapoint fitness (N, M) and total fitness f = F.sum(1), (N,).
    """
    scores = jnp.asarray(scores)
    total = scores.sum(axis=0)
    safe = jnp.where(total > 0, total, 1.0)
    # alpha may be traced: alpha = 1 and 0 are exact, not exp(alpha * log(total)).
    z = jnp.where(alpha == 1, safe, jnp.where(alpha == 0, 1.0, jnp.power(safe, alpha)))
    weight = 1.0 / z if capacity is None else capacity / z
    per_point = scores * weight
    return per_point, per_point.sum(axis=1)


def attraction(per_point: jax.Array, a: jax.Array) -> jax.Array:
    """Complementarity of every model to parent `a`.

    g(A, B) = sum_j max(0, F[B, j] - F[A, j]): B is attractive where it gathers
    resources that A does not. g(A, A) = 0.

    Args:
      per_point: F, shape (N, M).
      a: index of parent A, int scalar.

    Returns:
      g, shape (N,), non-negative.
    """
    per_point = jnp.asarray(per_point)
    return jnp.maximum(per_point - per_point[a], 0.0).sum(axis=1)
