"""Spherical merging with a split point (SPEC.md, mechanism 3).

A model is a pytree; merging treats it as the flat vector that
`jax.flatten_util.ravel_pytree` would give (leaves in `jax.tree.leaves` order, each
raveled in C order) without ever building that vector: each leaf knows its global
offset, the slerp angle comes from per-leaf partial dot products and norms accumulated
in float32, and every leaf keeps its dtype.

Coordinate d of the child is
    sin((1 - w_d) Omega) / sin(Omega) * A_d + sin(w_d Omega) / sin(Omega) * B_d,
    w_d = w if d < k else 1 - w,
with Omega the angle between the whole parent vectors, and linear interpolation
(1 - w_d) A_d + w_d B_d where sin(Omega) < eps. w = 0 returns A.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

PyTree = object


def num_params(tree: PyTree) -> int:
    """D, the length of the flat vector of `tree`."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def slerp_coefficients(
    a: PyTree, b: PyTree, ratios: jax.Array, eps: float = 1e-6
) -> tuple[jax.Array, jax.Array]:
    """Coefficients (c_a, c_b) of A and B for each ratio in `ratios`.

    The angle Omega is computed once from the whole pytrees, accumulating per-leaf
    dot products and squared norms in float32. Where sin(Omega) < eps, or a parent is
    zero, the coefficients are the linear ones (1 - w, w).

    Args:
      a, b: parent pytrees of the same structure.
      ratios: float array of mixing ratios w, any shape.

    Returns:
      (c_a, c_b), float32 arrays of the shape of `ratios`.
    """
    parts = [
        (jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)),
         jnp.vdot(x.astype(jnp.float32), x.astype(jnp.float32)),
         jnp.vdot(y.astype(jnp.float32), y.astype(jnp.float32)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    ]
    dot, aa, bb = (sum(p[i] for p in parts) for i in range(3))
    norm = jnp.sqrt(aa) * jnp.sqrt(bb)
    cos = jnp.clip(dot / jnp.where(norm > 0, norm, 1.0), -1.0, 1.0)
    omega = jnp.arccos(cos)
    sin = jnp.sin(omega)
    linear = (sin < eps) | (norm == 0)
    safe_sin = jnp.where(linear, 1.0, sin)
    w = jnp.asarray(ratios, jnp.float32)
    c_a = jnp.where(linear, 1.0 - w, jnp.sin((1.0 - w) * omega) / safe_sin)
    c_b = jnp.where(linear, w, jnp.sin(w * omega) / safe_sin)
    return c_a, c_b


def split_point_slerp(
    a: PyTree, b: PyTree, ratio: jax.Array, split: jax.Array, eps: float = 1e-6
) -> PyTree:
    """Slerp with ratio w before flat index `split` and 1 - w from it on.

    Args:
      a, b: parent pytrees of the same structure and dtypes.
      ratio: w, float scalar in [0, 1].
      split: k, int scalar in [0, D]; k = D gives slerp(w), k = 0 gives slerp(1 - w).

    Returns:
      The child, a pytree like `a` (each leaf keeps its dtype).
    """
    ratio = jnp.asarray(ratio, jnp.float32)
    (ca_lo, ca_hi), (cb_lo, cb_hi) = slerp_coefficients(
        a, b, jnp.stack([ratio, 1.0 - ratio]), eps
    )
    leaves_a, treedef = jax.tree.flatten(a)
    leaves_b = jax.tree.leaves(b)
    out, offset = [], 0
    for x, y in zip(leaves_a, leaves_b):
        size = math.prod(x.shape)
        index = offset + jax.lax.iota(jnp.int32, size).reshape(x.shape)
        before = index < split
        c_a = jnp.where(before, ca_lo, ca_hi)
        c_b = jnp.where(before, cb_lo, cb_hi)
        out.append((c_a * x.astype(jnp.float32) + c_b * y.astype(jnp.float32)).astype(x.dtype))
        offset += size
    return jax.tree.unflatten(treedef, out)


def slerp(a: PyTree, b: PyTree, ratio: jax.Array, eps: float = 1e-6) -> PyTree:
    """Plain spherical interpolation with one ratio w for every coordinate."""
    ratio = jnp.asarray(ratio, jnp.float32)
    c_a, c_b = slerp_coefficients(a, b, ratio, eps)
    return jax.tree.map(
        lambda x, y: (c_a * x.astype(jnp.float32) + c_b * y.astype(jnp.float32)).astype(x.dtype),
        a, b,
    )
