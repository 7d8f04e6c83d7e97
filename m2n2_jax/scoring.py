"""Per-datapoint scores: the evaluation that the budget counts.

A `score_fn(model, batch) -> scores` maps a model and a batch of datapoints (a pytree
whose leaves share a leading axis M) to scores in [0, 1] of shape (M,).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def num_points(data, what: str = "data") -> int:
    """M >= 1, the shared leading dimension of the leaves of `data` (ValueError naming `what` otherwise)."""
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(data)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"{what} leaves must share one leading axis (datapoints), got sizes {sorted(map(str, sizes))}")
    m = sizes.pop()
    if m == 0:
        raise ValueError(f"{what} holds no datapoints (its leading axis is 0)")
    return m


def evaluate(score_fn: Callable, model, data, chunk_size: int | None = None) -> jax.Array:
    """Scores of one model on all M datapoints, shape (M,), float32.

    With `chunk_size`, the data are cut into chunks of that many datapoints (the last
    one padded) evaluated one after another with `lax.map`, so memory does not grow
    with M.
    """
    m = num_points(data)
    if chunk_size is None or chunk_size >= m:
        return score_fn(model, data).astype(jnp.float32)
    num_chunks = -(-m // chunk_size)
    pad = num_chunks * chunk_size - m
    chunks = jax.tree.map(
        lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape((num_chunks, chunk_size) + x.shape[1:]),
        data,
    )
    scores = jax.lax.map(lambda batch: score_fn(model, batch).astype(jnp.float32), chunks)
    return scores.reshape(-1)[:m]
