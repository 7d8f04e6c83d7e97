"""Validation at the library's boundaries: clear ValueErrors instead of silent NaNs.

The runner stacks seed models with `stack_models`, which names the first leaf that differs."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def stack_models(models: Sequence) -> object:
    """Stack model pytrees along a new leading axis, checking they match.

    Raises:
      ValueError: no models, or models that differ in structure, shape or dtype
        (the message names the first leaf that differs).
    """
    if len(models) == 0:
        raise ValueError("need at least one seed model, got none")
    ref_leaves, ref_def = jax.tree.flatten_with_path(models[0])
    for i, model in enumerate(models[1:], start=1):
        leaves, treedef = jax.tree.flatten_with_path(model)
        if treedef != ref_def:
            raise ValueError(f"seed model {i} has a different pytree structure than model 0: {treedef} vs {ref_def}")
        for (path, x), (_, y) in zip(leaves, ref_leaves):
            if jnp.shape(x) != jnp.shape(y) or jnp.result_type(x) != jnp.result_type(y):
                raise ValueError(
                    f"seed model {i} leaf {jax.tree_util.keystr(path)} is {jnp.result_type(x)}{list(jnp.shape(x))}, "
                    f"model 0 has {jnp.result_type(y)}{list(jnp.shape(y))}; all seed models must match"
                )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *models)


def check_finite_params(tree, what: str) -> None:
    """Raise if any leaf of `tree` holds NaN or inf."""
    for path, leaf in jax.tree.flatten_with_path(tree)[0]:
        if not np.all(np.isfinite(np.asarray(leaf, np.float32))):
            raise ValueError(f"{what}: leaf {jax.tree_util.keystr(path)} has non-finite values")


def check_scores(scores, expected_points: int, what: str) -> None:
    """Raise unless `scores` is (..., M) with finite values in [0, 1]."""
    scores = np.asarray(scores)
    if scores.shape[-1:] != (expected_points,):
        raise ValueError(f"{what}: score_fn must return shape ({expected_points},), got {scores.shape[-1:]}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{what}: score_fn returned non-finite scores")
    if scores.min() < 0 or scores.max() > 1:
        raise ValueError(f"{what}: scores must lie in [0, 1], got range [{scores.min()}, {scores.max()}]")


def valid_children(children, scores: jax.Array) -> jax.Array:
    """On device: True iff every child's params are finite and all scores finite in [0, 1]."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(children)]))
    return finite & jnp.all((scores >= 0) & (scores <= 1))
