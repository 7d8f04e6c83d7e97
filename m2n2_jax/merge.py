"""Spherical merging with a split point (SPEC.md, mechanism 3), optionally per
parameter group (SPEC.md, "For real models").

A model is a pytree; merging treats it as the flat vector that
`jax.flatten_util.ravel_pytree` would give (leaves in `jax.tree.leaves` order, each
raveled in C order) without ever building that vector: each leaf knows its global
offset, the slerp angle comes from per-leaf partial dot products and norms accumulated
in float32, and every leaf keeps its dtype.

Coordinate d of the child is
    sin((1 - w_d) Omega) / sin(Omega) * A_d + sin(w_d Omega) / sin(Omega) * B_d,
    w_d = w if d < k else 1 - w,
with Omega the angle between the whole parent vectors, and linear interpolation
(1 - w_d) A_d + w_d B_d where sin(Omega) < eps or |cos(Omega)| > dot_threshold. w = 0
returns A.

With parameter groups (a partition of the leaves, `leaf_groups`), each group g is
merged as its own vector: its own ratio w_g, its own split point k_g (in the group's
own ravel order: its leaves in `jax.tree.leaves` order) and its own angle Omega_g.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable

import jax
import jax.numpy as jnp

PyTree = object
GroupFn = Callable[[str], Hashable]


def num_params(tree: PyTree) -> int:
    """D, the length of the flat vector of `tree`."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def leaf_path(path) -> str:
    """A leaf's key path as a string, its keys joined by "/" (e.g. "layers/0/attn/kernel")."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


@dataclasses.dataclass(frozen=True)
class PathPrefix:
    """A group function: a leaf's first `depth` path keys, e.g. depth 2 on a flax model
    groups by "params/layer_3" (one group per layer; embeddings and head their own).
    A value (hashable, equal for equal depths), so algorithms using it share compiled
    code."""

    depth: int

    def __call__(self, path: str) -> str:
        return "/".join(path.split("/")[: self.depth])


def leaf_groups(tree: PyTree, group_fn: GroupFn | None) -> tuple[int, ...]:
    """The group index of each leaf (in `jax.tree.leaves` order), from labels to indices.

    `group_fn(path)` labels a leaf by its path string (`leaf_path`) with any hashable
    value; labels become indices 0, 1, ... in order of first appearance (what
    `split_point_slerp(groups=)` and `group_sizes` take). None: one group.
    """
    paths = [leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if group_fn is None:
        return (0,) * len(paths)
    index: dict = {}
    for p in paths:
        label = group_fn(p)
        try:
            index.setdefault(label, len(index))
        except TypeError:
            raise ValueError(f"group labels must be hashable (a str, an int, a tuple): the group function "
                             f"gave {label!r} for leaf {p!r}") from None
    return tuple(index[group_fn(p)] for p in paths)


def group_sizes(tree: PyTree, groups: tuple[int, ...]) -> tuple[int, ...]:
    """D_g, the number of parameters of each group, shape (G,) as a tuple."""
    sizes = [0] * (max(groups) + 1)
    for g, leaf in zip(groups, jax.tree.leaves(tree)):
        sizes[g] += math.prod(leaf.shape)
    return tuple(sizes)


def slerp_coefficients(
    a: PyTree, b: PyTree, ratios: jax.Array, eps: float = 1e-6, dot_threshold: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Coefficients (c_a, c_b) of A and B for each ratio in `ratios`.

    The angle Omega is computed once from the whole pytrees, accumulating per-leaf
    dot products and squared norms in float32. Where sin(Omega) < eps, a parent is
    zero, or |cos(Omega)| > dot_threshold, the coefficients are the linear ones
    (1 - w, w). dot_threshold = 1 (default) is the paper's rule: near-antiparallel
    parents give coefficients up to ~1 / sin(Omega); mergekit uses 0.9995.

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
    return coefficients_from_reductions(dot, aa, bb, ratios, eps, dot_threshold)


def coefficients_from_reductions(dot, aa, bb, ratios, eps: float = 1e-6, dot_threshold: float = 1.0):
    """`slerp_coefficients` given the parents' float32 reductions <A, B>, |A|^2 and
    |B|^2 (scalars), however they were computed (benchmarks/merge_memory.py compares
    ways of reducing)."""
    norm = jnp.sqrt(aa) * jnp.sqrt(bb)
    cos = jnp.clip(dot / jnp.where(norm > 0, norm, 1.0), -1.0, 1.0)
    omega = jnp.arccos(cos)
    sin = jnp.sin(omega)
    linear = (sin < eps) | (norm == 0) | (jnp.abs(cos) > dot_threshold)
    safe_sin = jnp.where(linear, 1.0, sin)
    w = jnp.asarray(ratios, jnp.float32)
    c_a = jnp.where(linear, 1.0 - w, jnp.sin((1.0 - w) * omega) / safe_sin)
    c_b = jnp.where(linear, w, jnp.sin(w * omega) / safe_sin)
    return c_a, c_b


def split_point_slerp(
    a: PyTree,
    b: PyTree,
    ratio: jax.Array,
    split: jax.Array,
    eps: float = 1e-6,
    dot_threshold: float = 1.0,
    groups: tuple[int, ...] | None = None,
) -> PyTree:
    """Slerp with ratio w before flat index `split` and 1 - w from it on.

    Args:
      a, b: parent pytrees of the same structure and dtypes.
      ratio: w, float scalar in [0, 1]; shape (G,) with groups.
      split: k, int scalar in [0, D]; k = D gives slerp(w), k = 0 gives slerp(1 - w).
        Shape (G,) with groups, k_g in [0, D_g]. (M2N2 draws k uniformly in [0, D),
        SPEC.md; every value of [0, D] is a valid merge.)
      groups: the group index 0 .. G - 1 of each leaf, a tuple of ints in
        `jax.tree.leaves` order: what `leaf_groups(model, fn)` returns for M2N2's
        `groups=fn` (a function labelling leaf paths). None is one group, and one
        group is exactly the ungrouped merge.

    Returns:
      The child, a pytree like `a` (each leaf keeps its dtype).
    """
    leaves_a, treedef = jax.tree.flatten(a)
    leaves_b = jax.tree.leaves(b)
    groups = (0,) * len(leaves_a) if groups is None else tuple(groups)
    if len(groups) != len(leaves_a):
        raise ValueError(f"groups names {len(groups)} leaves, the model has {len(leaves_a)}")
    num_groups = max(groups) + 1
    ratio = jnp.asarray(ratio, jnp.float32).reshape(num_groups)
    split = jnp.asarray(split).reshape(num_groups)
    coefficients = []
    for g in range(num_groups):
        members = [i for i, gi in enumerate(groups) if gi == g]
        coefficients.append(slerp_coefficients(
            [leaves_a[i] for i in members], [leaves_b[i] for i in members],
            jnp.stack([ratio[g], 1.0 - ratio[g]]), eps, dot_threshold))
    out, offsets = [], [0] * num_groups
    for g, x, y in zip(groups, leaves_a, leaves_b):
        size = math.prod(x.shape)
        (ca_lo, ca_hi), (cb_lo, cb_hi) = coefficients[g]
        index = offsets[g] + jax.lax.iota(jnp.int32, size).reshape(x.shape)
        before = index < split[g]
        c_a = jnp.where(before, ca_lo, ca_hi)
        c_b = jnp.where(before, cb_lo, cb_hi)
        out.append((c_a * x.astype(jnp.float32) + c_b * y.astype(jnp.float32)).astype(x.dtype))
        offsets[g] += size
    return jax.tree.unflatten(treedef, out)


def slerp(
    a: PyTree,
    b: PyTree,
    ratio: jax.Array,
    eps: float = 1e-6,
    dot_threshold: float = 1.0,
    groups: tuple[int, ...] | None = None,
) -> PyTree:
    """Plain spherical interpolation with one ratio w for every coordinate (per group:
    ratio (G,), each group with its own angle)."""
    if groups is not None:
        return split_point_slerp(a, b, ratio, jnp.asarray(group_sizes(a, groups)), eps, dot_threshold, groups)
    ratio = jnp.asarray(ratio, jnp.float32)
    c_a, c_b = slerp_coefficients(a, b, ratio, eps, dot_threshold)
    return jax.tree.map(
        lambda x, y: (c_a * x.astype(jnp.float32) + c_b * y.astype(jnp.float32)).astype(x.dtype),
        a, b,
    )
