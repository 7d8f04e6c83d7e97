"""Competition for limited resources and attraction (docs/algorithm.md#fitness and #selection, in
the paper's general form).

Scores are maximised: S[i, j] is model i's score on datapoint j, 0/1 or continuous in
[0, 1]. The general fitness (the paper's equations 3-5) is

    f_i = sum_j c_j S'[i, j] / (z_j^alpha + eps),   z_j = sum_k S'[k, j],
    g(A, B) = sum_j c_j / (z_j^alpha + eps) max(0, S'[B, j] - S'[A, j]),

over the models that compete at that moment, with S' = S, or S - min_k S[k, j] with
worst subtraction. The digits code is c = 1, eps = 0, no subtraction, and z_j = 1 where
nobody scores (no division by zero): the defaults.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CAPACITY_RULES = ("fixed", "max")


def resource_fitness(
    scores: jax.Array,
    alpha: float | jax.Array = 1.0,
    capacity: jax.Array | None = None,
    *,
    eps: float | jax.Array = 0.0,
    competing: jax.Array | None = None,
    capacity_rule: str = "fixed",
    subtract_worst: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Resource-normalised fitness F[i, j] = c_j S'[i, j] / (z_j^alpha + eps).

    Args:
      scores: S, shape (N, M), values in [0, 1].
      alpha: competition strength (may be traced); 0 gives the plain summed score.
      capacity: c, shape (M,), the supply of each resource (`capacity_rule="fixed"`);
        ones if None.
      eps: added to the normaliser z_j^alpha (the paper's epsilon); 0 keeps only the
        zero guard (z_j = 1 where nobody scores), exactly the digits code.
      competing: bool (N,), the rows that compete now (occupied slots, plus the
        candidate when inserting); the others enter neither z, nor the min, nor the
        max, and get F = 0. None: all rows.
      capacity_rule: "fixed" uses `capacity`; "max" sets c_j = max_i S'[i, j] over the
        competing rows (the paper's rule for continuous scores), recomputed here, times
        `capacity` when given (a weight per datapoint, e.g. one per task so that tasks
        of unequal sizes supply equal resources).
      subtract_worst: first subtract each datapoint's lowest competing score,
        S'[i, j] = S[i, j] - min_k S[k, j] (the paper's image-generation fitness).

    Returns:
      (F, f): per-datapoint fitness (N, M) and total fitness f = F.sum(1), (N,).
    """
    if capacity_rule not in CAPACITY_RULES:
        raise ValueError(f"capacity_rule must be one of {CAPACITY_RULES}, got {capacity_rule!r}")
    scores = jnp.asarray(scores)
    if competing is not None:
        rows = jnp.asarray(competing)[:, None]
        if subtract_worst:
            worst = jnp.min(jnp.where(rows, scores, jnp.inf), axis=0)
            scores = scores - jnp.where(jnp.isfinite(worst), worst, 0.0)
        scores = jnp.where(rows, scores, 0.0)
    elif subtract_worst:
        scores = scores - scores.min(axis=0)
    total = scores.sum(axis=0)
    safe = jnp.where(total > 0, total, 1.0)
    # alpha may be traced: alpha = 1 and 0 are exact, not exp(alpha * log(total)).
    z = jnp.where(alpha == 1, safe, jnp.where(alpha == 0, 1.0, jnp.power(safe, alpha))) + eps
    if capacity_rule == "max":
        capacity = scores.max(axis=0) if capacity is None else capacity * scores.max(axis=0)
    weight = 1.0 / z if capacity is None else capacity / z
    per_point = scores * weight
    return per_point, per_point.sum(axis=1)


def attraction(per_point: jax.Array, a: jax.Array) -> jax.Array:
    """Complementarity of every model to parent `a`.

    g(A, B) = sum_j max(0, F[B, j] - F[A, j]) = sum_j c_j / (z_j^alpha + eps)
    max(0, S'[B, j] - S'[A, j]): B is attractive where it gathers resources that A
    does not, each datapoint weighed as in the fitness. g(A, A) = 0.

    Args:
      per_point: F, shape (N, M), from `resource_fitness`.
      a: index of parent A, int scalar.

    Returns:
      g, shape (N,), non-negative.
    """
    per_point = jnp.asarray(per_point)
    return jnp.maximum(per_point - per_point[a], 0.0).sum(axis=1)
