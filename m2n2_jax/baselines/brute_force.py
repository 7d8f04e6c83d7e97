"""Brute-force baseline: the best single slerp ratio between two models.

Evaluates slerp(a, b, w) for `num_ratios` evenly spaced w in [0, 1] (each costs one
forward pass) and keeps the one with the best mean training score.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from m2n2_jax.merge import slerp
from m2n2_jax.scoring import evaluate


def slerp_ratio_search(
    a, b, score_fn: Callable, data, num_ratios: int = 10_000, chunk_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mean training score of every ratio, and the best ratio (first on ties).

    Args:
      a, b: the two models (pytrees of one structure).
      score_fn: (params, batch) -> scores (M,) in [0, 1].
      data: training datapoints.
      num_ratios: number of ratios, linspace(0, 1, num_ratios), >= 2.

    Returns:
      (ratios (num_ratios,), mean scores (num_ratios,)); ratios[argmax(scores)] is best.
    """
    if num_ratios < 2:
        raise ValueError(f"num_ratios must be >= 2, got {num_ratios}")
    ratios = jnp.linspace(0.0, 1.0, num_ratios)

    @jax.jit
    def search(a, b, data):
        return jax.lax.map(lambda w: evaluate(score_fn, slerp(a, b, w), data, chunk_size).mean(), ratios)

    return ratios, search(a, b, data)
