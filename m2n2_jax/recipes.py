"""Models as recipes over seed models: M2N2's archive in the memory of its seeds.

Without mutation, every model M2N2 makes from S seeds is, on each contiguous range
of coordinates, a fixed linear combination of the seeds: a slerp of two models is,
given its angle, a linear combination of them; a split point applies one pair of
coefficients before the cut and another from it on; parameter groups are ranges of
their own. A recipe archive stores, per slot, those coefficients instead of the model
(docs/recipes.md).

Each parameter group g keeps one sorted list of cut points (group-local flat
coordinates, as (k // WORD, k % WORD) int32 words like `merge.split_words`), shared by
every slot: cut c_0 <= c_1 <= ... splits the group into segments j = 0 .. C, segment j
holding the coordinates d with #{c_i <= d} = j. A recipe is float32 (G, C + 1, S):
recipe[g, j, s] is seed s's coefficient on segment j of group g. Unused cut slots hold
a sentinel past every coordinate, so their segments are empty.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from m2n2_jax.merge import leaf_split
from m2n2_jax.sharding import on_device

SENTINEL = 2**31 - 1
"""The high word of an unused cut slot: past every coordinate a group can have."""


@struct.dataclass
class Recipes:
    """What a recipe archive holds besides its slots' recipes.

    Attributes:
      seeds: the S seed models, stacked (S, ...): the only whole models kept.
      cuts: int32 (G, C, 2), each group's cut points as (hi, lo) words, sorted,
        unused slots (SENTINEL, 0) at the end.
      child: float32 (G, C + 1, S), the recipe of the child last asked for (told next).
      groups: static, the group index of each leaf (`merge.leaf_groups`).
    """

    seeds: object
    cuts: jax.Array
    child: jax.Array
    groups: tuple = struct.field(pytree_node=False, default=None)

    def build(self, recipe: jax.Array):
        """The model of `recipe` (G, C + 1, S) (`build`)."""
        return build(self.seeds, self.cuts, recipe, self.groups)


def empty(seeds, groups: tuple[int, ...], capacity: int) -> Recipes:
    """`Recipes` of the stacked `seeds` with room for `capacity` cuts per group."""
    num_seeds, num_groups = jax.tree.leaves(seeds)[0].shape[0], max(groups) + 1
    cuts = jnp.zeros((num_groups, capacity, 2), jnp.int32).at[..., 0].set(SENTINEL)
    return Recipes(seeds, cuts, jnp.zeros((num_groups, capacity + 1, num_seeds), jnp.float32), tuple(groups))


def seed_recipe(index, num_seeds: int, num_groups: int, capacity: int) -> jax.Array:
    """(G, C + 1, S): seed `index` itself, coefficient 1 on every segment."""
    one_hot = jax.nn.one_hot(index, num_seeds, dtype=jnp.float32)
    return jnp.broadcast_to(one_hot, (num_groups, capacity + 1, num_seeds))


def insert_cuts(cuts: jax.Array, hi: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each group's cut list with k_g = hi[g] * WORD + lo[g] inserted in order.

    Returns:
      (cuts, position (G,) int32, full (G,) bool): k_g went to index position[g] (after
      the cuts <= k_g), so segment position[g] of the old list splits into segments
      position[g] (before k_g) and position[g] + 1 (from k_g on). `full`: the list had
      no unused slot, and k_g was not inserted.
    """
    def one(cuts, hi, lo):
        after = (cuts[:, 0] > hi) | ((cuts[:, 0] == hi) & (cuts[:, 1] > lo))
        position = jnp.argmax(jnp.concatenate([after, jnp.ones((1,), bool)])).astype(jnp.int32)
        full = cuts[-1, 0] != SENTINEL
        index = jnp.arange(cuts.shape[0])
        shifted = cuts[jnp.maximum(index - 1, 0)]
        new = jnp.where((index < position)[:, None], cuts, jnp.where((index == position)[:, None],
                                                                       jnp.stack([hi, lo]), shifted))
        return jnp.where(full, cuts, new), position, full

    return jax.vmap(one)(cuts, hi, lo)


def split_segments(recipes: jax.Array, position: jax.Array) -> jax.Array:
    """Recipes (..., G, C + 1, S) re-expressed after a cut went to `position` (G,) of
    each group's list: segment position splits in two equal ones, later ones move up
    (the last, always empty before a cut is inserted, drops off)."""
    j = jnp.arange(recipes.shape[-2])
    source = jnp.where(j[None, :] > position[:, None], j[None, :] - 1, j[None, :])  # (G, C + 1)
    return jnp.take_along_axis(recipes, jnp.broadcast_to(source[..., None], recipes.shape), axis=-2)


def child_recipe(recipe_a: jax.Array, recipe_b: jax.Array, c_a: jax.Array, c_b: jax.Array,
                 position: jax.Array | None) -> jax.Array:
    """(G, C + 1, S): c_a A + c_b B on every segment, from the parents' recipes.

    c_a, c_b: (G, 2), the coefficients before the group's new cut ([:, 0]) and from it
    on ([:, 1]); segments 0 .. position[g] lie before it. position None: no split
    point, c_a, c_b (G,) everywhere.
    """
    if position is None:
        return c_a[:, None, None] * recipe_a + c_b[:, None, None] * recipe_b
    before = (jnp.arange(recipe_a.shape[-2])[None, :] <= position[:, None])[..., None]  # (G, C + 1, 1)
    pick = lambda c: jnp.where(before, c[:, 0, None, None], c[:, 1, None, None])
    return pick(c_a) * recipe_a + pick(c_b) * recipe_b


def build(seeds, cuts: jax.Array, recipe: jax.Array, groups: tuple[int, ...] | None = None):
    """The model of `recipe` (G, C + 1, S): on each segment, the recipe's combination
    of the seeds (stacked (S, ...)), computed in float32 in seed order, each leaf in its
    seeds' dtype.

    Args:
      cuts: int32 (G, C, 2), the groups' sorted cut lists (`insert_cuts`).
      groups: the group index of each leaf (`merge.leaf_groups`); None: one group.

    The segment of each coordinate is found per leaf, by the cheaper of two static
    plans: a binary search of every coordinate in the leaf's cuts, or (for leaves with
    long rows) one segment per row, then the rows that a cut crosses rebuilt.
    """
    leaves, treedef = jax.tree.flatten(on_device(seeds))
    groups = (0,) * len(leaves) if groups is None else tuple(groups)
    offsets, out = [0] * (max(groups) + 1), []
    for g, stacked in zip(groups, leaves):
        shape = stacked.shape[1:]
        out.append(_build_leaf(stacked, cuts[g], recipe[g], offsets[g], shape))
        offsets[g] += math.prod(shape)
    return jax.tree.unflatten(treedef, out)


def by_rows(shape: tuple, num_cuts: int) -> bool:
    """Whether `build` finds a leaf's segments per row (then rebuilds the rows a cut
    crosses) rather than per coordinate: the plan of fewer comparisons, each a binary
    search over the cuts."""
    size = math.prod(shape)
    rows = shape[0] if shape else 1
    log_cuts = max(1, math.ceil(math.log2(num_cuts + 1)))
    return size * log_cuts > rows * log_cuts + size + num_cuts * (size // max(rows, 1)) * log_cuts


def _build_leaf(stacked: jax.Array, cuts: jax.Array, recipe: jax.Array, offset: int, shape: tuple) -> jax.Array:
    """One leaf (shape) of a recipe; `stacked` (S, *shape), `cuts` (C, 2), `recipe` (C + 1, S)."""
    size = math.prod(shape)
    if size >= 2**31:
        raise ValueError(f"a leaf of shape {shape} ({size} >= 2^31 coordinates) cannot be built from a recipe")
    rows = shape[0] if shape else 1
    inner = size // rows if rows else 1
    row, column = jax.vmap(lambda c: leaf_split(c[0], c[1], offset, shape))(cuts)
    local = row * inner + column  # each cut's flat index in the leaf: 0 before it, size past it; sorted
    combine = lambda coefficients, values: sum(coefficients[..., s] * values[s].astype(jnp.float32)
                                               for s in range(stacked.shape[0]))
    seeds = stacked.reshape(stacked.shape[0], rows, inner)
    if cuts.shape[0] == 0:
        return combine(recipe[0], stacked).astype(stacked.dtype)
    if not by_rows(shape, cuts.shape[0]):  # search every coordinate
        segment = jnp.searchsorted(local, jnp.arange(size, dtype=jnp.int32), side="right", method="scan")
        return combine(recipe[segment], seeds.reshape(seeds.shape[0], size)).reshape(shape).astype(stacked.dtype)
    row_segment = jnp.searchsorted(local, jnp.arange(rows, dtype=jnp.int32) * inner, side="right", method="scan")
    leaf = combine(recipe[row_segment][:, None, :], seeds)  # (rows, inner): right but in rows a cut crosses
    crossed = (row < rows) & (column > 0)
    at = jnp.minimum(row, rows - 1)
    segment = jnp.searchsorted(local, at[:, None] * inner + jnp.arange(inner, dtype=jnp.int32)[None, :],
                               side="right", method="scan")  # (C, inner)
    fixed = combine(recipe[segment], seeds[:, at])
    leaf = leaf.at[jnp.where(crossed, row, rows)].set(fixed, mode="drop")
    return leaf.reshape(shape).astype(stacked.dtype)
