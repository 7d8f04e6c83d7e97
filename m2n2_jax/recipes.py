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

import bisect
import hashlib
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from m2n2_jax.merge import WORD, leaf_path, leaf_split
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

    def build(self, recipe: jax.Array, dtype=None):
        """The model of `recipe` (G, C + 1, S) (`build`)."""
        return build(self.seeds, self.cuts, recipe, self.groups, dtype)


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


def reductions(book: Recipes, recipe_a: jax.Array, recipe_b: jax.Array) -> tuple[jax.Array, ...]:
    """(<A, B>, |A|^2, |B|^2), float32 (G,) each: the slerp angle's sums over each group
    of the models of two recipes, each leaf of both built in float32 from one lookup of
    its coordinates' segments and summed as products (a reduction that the build fuses
    into, so neither model is written out whole, where a dot product would need both as
    operands); the leaves' sums added to their group's in leaf order."""
    def products(stacked, g, offset):
        shape = stacked.shape[1:]

        def fn(pick, values):
            x, y = (_combine(pick(r[g]), values).reshape(shape) for r in (recipe_a, recipe_b))
            return jnp.stack([jnp.sum(x * y), jnp.sum(x * x), jnp.sum(y * y)])

        return _by_segment(stacked, book.cuts[g], offset, shape, fn)

    sums = jnp.zeros((recipe_a.shape[0], 3), jnp.float32)
    for g, leaf_sums in zip(book.groups, _each_leaf(jax.tree.leaves(on_device(book.seeds)), book.groups, products)):
        sums = sums.at[g].add(leaf_sums)
    return tuple(sums.T)


def build(seeds, cuts: jax.Array, recipe: jax.Array, groups: tuple[int, ...] | None = None, dtype=None):
    """The model of `recipe` (G, C + 1, S): on each segment, the recipe's combination
    of the seeds (stacked (S, ...)), computed in float32 in seed order, each leaf in its
    seeds' dtype (or `dtype`: float32 leaves of bfloat16 seeds are not rounded).

    Args:
      cuts: int32 (G, C, 2), the groups' sorted cut lists (`insert_cuts`).
      groups: the group index of each leaf (`merge.leaf_groups`); None: one group.

    The segment of each coordinate is found per leaf, by the cheaper of two static
    plans: a binary search of every coordinate in the leaf's cuts, or (for leaves with
    long rows) one segment per row, then the rows that a cut crosses rebuilt.
    """
    leaves, treedef = jax.tree.flatten(on_device(seeds))
    groups = (0,) * len(leaves) if groups is None else tuple(groups)
    lookups = _each_leaf(leaves, groups, lambda stacked, g, offset: _lookup(cuts[g], offset, stacked.shape[1:]),
                         values=False) if cuts.shape[1] else [None] * len(leaves)
    out = [_build_leaf(stacked, cuts[g], recipe[g], offset, stacked.shape[1:], lookup).astype(dtype or stacked.dtype)
           for (g, stacked, offset), lookup in zip(_with_offsets(leaves, groups), lookups)]
    return jax.tree.unflatten(treedef, out)


def _each_leaf(leaves, groups: tuple[int, ...], fn, values: bool = True) -> list:
    """[fn(stacked leaf (S, ...), its group, its group-local offset) for each leaf], with
    fn traced once per shape and dtype: leaves that share them (a Llama's layers) go
    through one `lax.scan`, their group and offset traced (the offset as int32
    (offset // WORD, offset % WORD) words), each picked by a `lax.switch` (one leaf
    copied at a time). `values` False: fn reads only the leaf's shape and dtype, and in
    the scan gets a `jax.ShapeDtypeStruct`, no copy.

    Why: XLA:CPU keeps ~80 kB of code per kernel and a leaf's lookup is 20-30 kernels,
    so the angle's sums compiled once per leaf held ~0.4 GB of SmolLM2's step program.
    `build` takes this path for its lookups only: built here, its values came out of
    the scan stacked, were copied into the leaves, and the stacked buffers lived beside
    the step's other temporaries (SmolLM2: +0.42 GB, measured).
    """
    offsets, classes = [], {}
    for i, (_, stacked, offset) in enumerate(_with_offsets(leaves, groups)):
        offsets.append(offset)
        classes.setdefault((stacked.shape, stacked.dtype), []).append(i)
    out = [None] * len(leaves)
    for members in classes.values():
        if len(members) == 1:
            i, = members
            out[i] = fn(leaves[i], groups[i], offsets[i])
            continue
        words = np.array([divmod(offsets[i], WORD) for i in members], np.int32)
        branches = [lambda *xs, j=j: xs[j] for j in range(len(members))]

        def body(_, x, members=members, branches=branches):
            k, g, hi, lo = x
            stacked = jax.lax.switch(k, branches, *(leaves[i] for i in members)) if values else \
                jax.ShapeDtypeStruct(leaves[members[0]].shape, leaves[members[0]].dtype)
            return None, fn(stacked, g, (hi, lo))

        xs = (jnp.arange(len(members)), jnp.asarray([groups[i] for i in members], jnp.int32),
              jnp.asarray(words[:, 0]), jnp.asarray(words[:, 1]))
        _, stacked_out = jax.lax.scan(body, None, xs)
        for k, i in enumerate(members):
            out[i] = jax.tree.map(lambda y, k=k: y[k], stacked_out)
    return out


def _with_offsets(leaves, groups: tuple[int, ...]):
    """(group, stacked leaf (S, ...), the group-local flat coordinate where the leaf
    starts) of each leaf: a group's leaves follow one another in its coordinates."""
    offsets = [0] * (max(groups) + 1)
    for g, stacked in zip(groups, leaves):
        yield g, stacked, offsets[g]
        offsets[g] += math.prod(stacked.shape[1:])


ROW_CUTS = 2
"""Cuts strictly inside one row that `build`'s row plan handles (more: every
coordinate is searched instead)."""


def _combine(coefficients: jax.Array, values: jax.Array) -> jax.Array:
    """sum_s coefficients[..., s] values[s], float32, in seed order."""
    return sum(coefficients[..., s] * values[s].astype(jnp.float32) for s in range(values.shape[0]))


def _build_leaf(stacked: jax.Array, cuts: jax.Array, recipe: jax.Array, offset, shape: tuple,
                lookup=None) -> jax.Array:
    """One leaf (shape) of a recipe, float32; `stacked` (S, *shape), `cuts` (C, 2), `recipe` (C + 1, S);
    `offset` and `lookup` as `_by_segment` takes them."""
    return _by_segment(stacked, cuts, offset, shape, lambda pick, values: _combine(pick(recipe), values).reshape(shape),
                       lookup)


def _rows(shape: tuple) -> tuple[int, int]:
    """(rows, inner): a leaf of rank >= 2 viewed as rows; vectors and scalars, one row."""
    size = math.prod(shape)
    if size >= 2**31:
        raise ValueError(f"a leaf of shape {shape} ({size} >= 2^31 coordinates) cannot be built from a recipe")
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (size // rows if rows else 1)


def _lookup(cuts: jax.Array, offset, shape: tuple) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where a leaf's cuts fall, int32: (local (C,), each cut's flat index in the leaf,
    0 before it and size past it; start (rows,), the segment of each row's first
    coordinate; inside (rows,), the cuts strictly inside each row), rows as `_rows`
    (start and inside empty for one row). It needs only the cuts, the offset and the
    shape, not the leaf's values."""
    rows, inner = _rows(shape)
    row, column = jax.vmap(lambda c: leaf_split(c[0], c[1], offset, shape))(cuts)  # in (shape[0], rest)
    local = row * (math.prod(shape) // (shape[0] if shape else 1)) + column
    if rows == 1:
        return local, jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32)
    first = jnp.arange(rows, dtype=jnp.int32) * inner
    start = jnp.searchsorted(local, first, side="right", method="scan")
    return local, start, jnp.searchsorted(local, first + inner - 1, side="right", method="scan") - start


def _by_segment(stacked: jax.Array, cuts: jax.Array, offset, shape: tuple, fn, lookup=None):
    """fn(pick, values) over one leaf's coordinates: `values` (S, ...) its seeds, and
    pick(table (C + 1, S)) -> (..., S) each coordinate's row of a per-segment table.
    fn's result must not depend on which view (...) of the coordinates it is given.
    `lookup`: the leaf's `_lookup`, if made already.

    A coordinate's segment is the number of cuts at or before it, found by the cheaper
    of two static plans: a binary search of every coordinate in the leaf's cuts, or,
    with rows (a leaf of rank >= 2 viewed as (rows, inner)), each row's first segment
    found once and only the few cuts inside a row compared per coordinate (at most
    ROW_CUTS a row; a leaf with more falls back to the search).
    """
    rows, inner = _rows(shape)
    size, num_seeds, num_cuts = math.prod(shape), stacked.shape[0], cuts.shape[0]
    if num_cuts == 0:
        return fn(lambda table: table[0], stacked)
    local, start, inside = _lookup(cuts, offset, shape) if lookup is None else lookup

    def search(_):
        segment = jnp.searchsorted(local, jnp.arange(size, dtype=jnp.int32), side="right", method="scan")
        return fn(lambda table: table[segment], stacked.reshape(num_seeds, size))

    if rows == 1:
        return search(None)
    first = jnp.arange(rows, dtype=jnp.int32) * inner

    def by_rows(_):
        position = first[:, None] + jnp.arange(inner, dtype=jnp.int32)[None, :]  # (rows, inner)
        segment = start[:, None]
        for t in range(ROW_CUTS):
            cut = local[jnp.minimum(start + t, num_cuts - 1)]  # the row's t-th inner cut, if it has one
            segment = segment + ((t < inside)[:, None] & (cut[:, None] <= position))
        return fn(lambda table: table[segment], stacked.reshape(num_seeds, rows, inner))

    return jax.lax.cond(jnp.max(inside) <= ROW_CUTS, by_rows, search, None)


FORMAT = "m2n2_jax.recipe/1"


def digest(model) -> str:
    """sha256 of a model's leaves (their paths, shapes, dtypes and bytes), hex."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(model)[0]:
        leaf = np.asarray(leaf)
        h.update(f"{leaf_path(path)}{leaf.shape}{leaf.dtype}".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def to_json(book: Recipes, recipe, names: Sequence[str] | None = None) -> dict:
    """A recipe as plain JSON: for each leaf, the ranges of its flat (C-order)
    coordinates [start, end) and each range's seed coefficients, adjacent ranges with
    equal coefficients joined; the seeds named (`names`, e.g. their paths) and digested.
    `from_json` rebuilds the model from it and the seeds bit for bit.

    Args:
      book: one run's `Recipes` (no run axis), e.g. `state.recipes` of a recipe archive.
      recipe: float32 (G, C + 1, S), e.g. `state.models[i]`.
    """
    seeds, cuts, recipe = book.seeds, np.asarray(book.cuts, np.int64), np.asarray(recipe, np.float32)
    num_seeds = recipe.shape[-1]
    names = [f"seed {i}" for i in range(num_seeds)] if names is None else list(names)
    if len(names) != num_seeds:
        raise ValueError(f"{len(names)} names for {num_seeds} seeds")
    lists = [[int(hi) * WORD + int(lo) for hi, lo in group if hi != SENTINEL] for group in cuts]
    leaves, flat = [], jax.tree_util.tree_flatten_with_path(seeds)[0]
    for (path, _), (g, stacked, start) in zip(flat, _with_offsets([x for _, x in flat], book.groups)):
        size = math.prod(stacked.shape[1:])
        bounds = [start] + [k for k in lists[g] if start < k < start + size] + [start + size]
        ranges = []
        for lo, hi in zip(bounds, bounds[1:]):
            if lo == hi:  # between two equal cuts
                continue
            coefficients = [float(c) for c in recipe[g, bisect.bisect_right(lists[g], lo)]]
            if ranges and ranges[-1][2] == coefficients:
                ranges[-1][1] = hi - start
            else:
                ranges.append([lo - start, hi - start, coefficients])
        leaves.append({"path": leaf_path(path), "shape": list(stacked.shape[1:]), "dtype": str(stacked.dtype),
                       "group": g, "ranges": ranges})
    return {"format": FORMAT, "seeds": [{"name": n, "sha256": digest(jax.tree.map(lambda x: x[i], seeds))}
                                        for i, n in enumerate(names)], "leaves": leaves}


def from_json(recipe: dict, seed_models: Sequence):
    """The model of a `to_json` recipe, built from `seed_models` (in the recipe's order)
    by `build`, bit for bit the model the run returned.

    Raises:
      ValueError: another format, another number of seeds, a seed whose digest differs
      (named), or leaves that differ from the seeds' (named).
    """
    if recipe.get("format") != FORMAT:
        raise ValueError(f"not a recipe of format {FORMAT!r}: {recipe.get('format')!r}")
    if len(seed_models) != len(recipe["seeds"]):
        raise ValueError(f"the recipe merges {len(recipe['seeds'])} seeds, got {len(seed_models)} models")
    for seed, model in zip(recipe["seeds"], seed_models):
        if digest(model) != seed["sha256"]:
            raise ValueError(f"seed {seed['name']!r}: the model given differs from the one the recipe was made "
                             f"from (sha256 {digest(model)[:12]}... vs {seed['sha256'][:12]}...)")
    seeds = jax.tree.map(lambda *x: jnp.stack(x), *seed_models)
    paths = [leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(seed_models[0])[0]]
    if paths != [leaf["path"] for leaf in recipe["leaves"]]:
        raise ValueError(f"the seeds' leaves {paths[:3]}... are not the recipe's "
                         f"{[leaf['path'] for leaf in recipe['leaves']][:3]}...")
    groups = tuple(leaf["group"] for leaf in recipe["leaves"])
    starts, pieces, offsets = [[] for _ in range(max(groups) + 1)], [[] for _ in range(max(groups) + 1)], \
        [0] * (max(groups) + 1)
    for leaf in recipe["leaves"]:
        g = leaf["group"]
        for lo, _, coefficients in leaf["ranges"]:
            starts[g].append(offsets[g] + lo)
            pieces[g].append(coefficients)
        offsets[g] += math.prod(leaf["shape"])
    capacity = max(len(s) - 1 for s in starts)
    cuts = np.zeros((len(starts), capacity, 2), np.int32)
    cuts[..., 0] = SENTINEL
    table = np.zeros((len(starts), capacity + 1, len(seed_models)), np.float32)
    for g in range(len(starts)):
        for i, k in enumerate(starts[g][1:]):
            cuts[g, i] = divmod(k, WORD)
        table[g, : len(pieces[g])] = pieces[g]
    return jax.jit(build, static_argnums=3)(seeds, jnp.asarray(cuts), jnp.asarray(table), groups)
