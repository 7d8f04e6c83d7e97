"""Spherical merging with a split point (docs/algorithm.md#merge), optionally per
parameter group (docs/algorithm.md#groups).

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
import numpy as np

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
    dot products and squared norms in float32 (`pair_reductions`). Where sin(Omega)
    < eps, a parent is zero, or |cos(Omega)| > dot_threshold, the coefficients are the
    linear ones (1 - w, w). dot_threshold = 1 (default) is the paper's rule:
    near-antiparallel parents give coefficients up to ~1 / sin(Omega); mergekit uses 0.9995.

    Args:
      a, b: parent pytrees of the same structure.
      ratios: float array of mixing ratios w, any shape.

    Returns:
      (c_a, c_b), float32 arrays of the shape of `ratios`.
    """
    parts = [pair_reductions(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    dot, aa, bb = (sum(p[i] for p in parts) for i in range(3))
    return once(coefficients_from_reductions, dot, aa, bb, jnp.asarray(ratios, jnp.float32),
                jnp.asarray(eps, jnp.float32), jnp.asarray(dot_threshold, jnp.float32))


ROW = 128
"""The longest row `pair_reductions` sums in one sequential float32 run."""


def pair_reductions(x: jax.Array, y: jax.Array, row: int = ROW) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(<x, y>, |x|^2, |y|^2) of two arrays of one shape, float32 scalars, in one pass.

    One variadic reduction over rows of the last dimension (r, the largest divisor of
    it up to `row`, coordinates each), then the rows' sums. A reduction rather than
    dot products: XLA fuses an archive slot's slice (`models[i]`) into it and reads
    the slot where it lies, where a dot product takes the slot copied out first, two
    parents of fresh memory at every step (SmolLM2 on a 2-core CPU: 0.11 s instead of
    0.9 s for the angle of two archive slots, docs/scale.md). The rows bound each
    sequential float32 sum to r terms.
    """
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    if x.size == 0:
        return (jnp.float32(0),) * 3
    last = x.shape[-1] if x.ndim else 1
    r = max(d for d in range(1, min(row, last) + 1) if last % d == 0)
    x, y = x.reshape(-1, r), y.reshape(-1, r)
    zero = jnp.float32(0)
    add = lambda p, q: tuple(u + v for u, v in zip(p, q))
    rows = jax.lax.reduce((x * y, x * x, y * y), (zero,) * 3, add, (1,))
    return tuple(jnp.sum(s) for s in rows)


def once(fn, *arrays):
    """fn(*arrays), computed once rather than inside each consumer's fusion (every
    value fn reads is an argument: custom_vmap needs it so).

    XLA:CPU copies a cheap scalar producer into every fusion that reads it: the L-term
    sums of a model's L leaves, read by each of its L leaves' merges, became L copies
    of the chain, O(L^2) to compile (a 272-leaf slerp: 33 s and 1.3 GB instead of
    1.3 s, docs/llm_real.md). A conditional is a boundary that fusion does not cross;
    both branches are `fn`, so the result is fn's whatever the predicate. Under vmap
    the predicate stays one scalar (a batched one would turn the conditional into a
    select of both branches, and the copies would return)."""

    @jax.custom_batching.custom_vmap
    def boundary(*arrays):
        return jax.lax.cond(jnp.isnan(arrays[0]).any(), fn, fn, *arrays)

    @boundary.def_vmap
    def batched(axis_size, in_batched, *arrays):
        out = once(jax.vmap(fn, in_axes=tuple(0 if b else None for b in in_batched)), *arrays)
        return out, jax.tree.map(lambda _: True, out)

    return boundary(*arrays)


def coefficients_from_reductions(dot, aa, bb, ratios, eps: float = 1e-6, dot_threshold: float = 1.0):
    """`slerp_coefficients` given the parents' float32 reductions <A, B>, |A|^2 and
    |B|^2 (scalars), however they were computed (benchmarks/merge_memory.py compares
    ways of reducing)."""
    # sqrt(|A|^2 |B|^2) rather than |A| |B|: for equal parents (<A, B> = |A|^2 = |B|^2)
    # it is exactly |A|^2, so cos = 1 and a model merged with itself is itself, bit
    # for bit; the product of the square roots where the other would overflow.
    product = aa * bb
    norm = jnp.where(jnp.isfinite(product), jnp.sqrt(product), jnp.sqrt(aa) * jnp.sqrt(bb))
    cos = jnp.clip(dot / jnp.where(norm > 0, norm, 1.0), -1.0, 1.0)
    omega = jnp.arccos(cos)
    sin = jnp.sin(omega)
    linear = (sin < eps) | (norm == 0) | (jnp.abs(cos) > dot_threshold)
    safe_sin = jnp.where(linear, 1.0, sin)
    w = jnp.asarray(ratios, jnp.float32)
    c_a = jnp.where(linear, 1.0 - w, jnp.sin((1.0 - w) * omega) / safe_sin)
    c_b = jnp.where(linear, w, jnp.sin(w * omega) / safe_sin)
    return c_a, c_b


WORD = 2**30
"""A split point k of any size travels as the int32 pair (k // WORD, k % WORD): a group
may hold more than 2^31 - 1 coordinates (a 7B model as one group), and JAX computes in
32 bits unless x64 is enabled. Pairs address groups of up to 2^61 coordinates."""


def split_words(split, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """(hi, lo), int32 (G,) each with k = hi * WORD + lo, from a split point given as an
    integer (a Python or NumPy int of any size, or an int32 array), shape () or (G,),
    or as the pair (hi, lo) itself."""
    if isinstance(split, tuple):
        hi, lo = split
    elif isinstance(split, jax.Array):
        if not jnp.issubdtype(split.dtype, jnp.integer):
            raise ValueError(f"split must be an integer array, got {split.dtype}")
        k = split.astype(jnp.int32)
        hi, lo = k >> 30, k & (WORD - 1)
    else:
        k = np.asarray(split)
        if not np.issubdtype(k.dtype, np.integer):
            raise ValueError(f"split must be an integer, got {k.dtype}")
        hi, lo = np.divmod(k.astype(np.int64), WORD)
    as_groups = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32).reshape(-1), (num_groups,))
    return as_groups(hi), as_groups(lo)


def random_split(key: jax.Array, sizes: tuple[int, ...], shape: tuple[int, ...] = ()):
    """Split points k_g ~ U{0, .., D_g - 1}, one per group of `sizes` (static ints),
    shaped `shape` (() for one group, (G,) for G). Groups below 2^31 coordinates draw
    one `jax.random.randint` (int32, as always); with a larger group, every group is
    drawn as a (hi, lo) pair (`WORD`), exactly uniform by rejection."""
    if max(sizes) < 2**31:
        return jax.random.randint(key, shape, 0, jnp.asarray(sizes, jnp.int32).reshape(shape))
    words = [_random_wide(k, d) for k, d in zip(jax.random.split(key, len(sizes)), sizes)]
    return tuple(jnp.stack([w[i] for w in words]).reshape(shape) for i in range(2))


def _random_wide(key: jax.Array, size: int, word: int = WORD) -> tuple[jax.Array, jax.Array]:
    """k ~ U{0, .., size - 1} as (k // word, k % word): hi uniform below ceil(size /
    word), lo uniform below word, redrawn while k >= size (accepted with probability
    > 1/2 when size > word); a group of at most `word` draws lo alone."""
    if not 0 < size < 2**31 * word:
        raise ValueError(f"a group of {size} coordinates: split points address 1 .. 2^61 - 1")
    if size <= word:
        return jnp.int32(0), jax.random.randint(key, (), 0, size)
    top, last = -(-size // word), size - (-(-size // word) - 1) * word

    def draw(i):
        key_hi, key_lo = jax.random.split(jax.random.fold_in(key, i))
        return jax.random.randint(key_hi, (), 0, top), jax.random.randint(key_lo, (), 0, word)

    rejected = lambda hi, lo: (hi == top - 1) & (lo >= last)
    hi, lo = draw(0)
    _, hi, lo = jax.lax.while_loop(lambda c: rejected(c[1], c[2]), lambda c: (c[0] + 1, *draw(c[0] + 1)), (0, hi, lo))
    return hi, lo


def leaf_split(hi: jax.Array, lo: jax.Array, offset, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Where the split point k = hi * WORD + lo cuts a leaf of `shape` that starts at
    flat index `offset` (a static int, or traced as int32 (offset // WORD, offset %
    WORD) words, so one compiled loop serves leaves at different offsets):
    k_leaf = clip(k - offset, 0, size), returned as its
    (row, column) in the leaf viewed as (shape[0], rest), int32 scalars; row = shape[0]
    when the whole leaf lies before k. Exact for any size: the 64-bit arithmetic is
    done on 30-bit words, and rows and columns are below 2^31."""
    rows, size = (shape[0] if shape else 1), math.prod(shape)
    inner = size // rows if rows else 1
    if inner >= 2**31:
        raise ValueError(f"a leaf of shape {shape}: its trailing dimensions hold {inner} >= 2^31 coordinates")
    off_hi, off_lo = offset if isinstance(offset, tuple) else divmod(offset, WORD)
    size_hi, size_lo = divmod(size, WORD)
    d_lo = lo - off_lo
    borrow = d_lo < 0
    d_lo = jnp.where(borrow, d_lo + WORD, d_lo)
    d_hi = hi - off_hi - borrow.astype(jnp.int32)
    before_leaf = d_hi < 0
    past_leaf = (d_hi > size_hi) | ((d_hi == size_hi) & (d_lo >= size_lo))
    if size < 2**31:  # k_leaf fits int32
        k = jnp.clip(d_hi, 0, size_hi) * WORD + d_lo
        row, column = k // inner, k % inner
    else:  # long division of the 61-bit k_leaf by inner, one bit at a time
        d_hi = jnp.clip(d_hi, 0, size_hi).astype(jnp.uint32)
        rest, row = jnp.uint32(0), jnp.int32(0)
        for bit in range(30 + size_hi.bit_length() - 1, -1, -1):
            b = (d_hi >> (bit - 30)) & 1 if bit >= 30 else (d_lo.astype(jnp.uint32) >> bit) & 1
            rest = (rest << 1) | b
            take = rest >= inner
            rest = jnp.where(take, rest - jnp.uint32(inner), rest)
            row = (row << 1) | take.astype(jnp.int32)
        column = rest.astype(jnp.int32)
    row = jnp.where(past_leaf, rows, jnp.where(before_leaf, 0, row))
    column = jnp.where(past_leaf | before_leaf, 0, column)
    return row.astype(jnp.int32), column.astype(jnp.int32)


def before_split(shape: tuple[int, ...], offset: int, hi: jax.Array, lo: jax.Array) -> jax.Array:
    """bool `shape`: which coordinates of a leaf starting at flat index `offset` lie
    before the split point k (flat index < k, in C order), without a flat index wider
    than the leaf's rows or columns."""
    row, column = leaf_split(hi, lo, offset, shape)
    if len(shape) == 0:
        return row > 0
    rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    if len(shape) == 1:
        return rows < row
    columns = jax.lax.iota(jnp.int32, math.prod(shape[1:])).reshape(shape[1:])
    return (rows < row) | ((rows == row) & (columns < column))


def split_point_slerp(
    a: PyTree,
    b: PyTree,
    ratio: jax.Array,
    split,
    eps: float = 1e-6,
    dot_threshold: float = 1.0,
    groups: tuple[int, ...] | None = None,
) -> PyTree:
    """Slerp with ratio w before flat index `split` and 1 - w from it on.

    Args:
      a, b: parent pytrees of the same structure and dtypes.
      ratio: w, float scalar in [0, 1]; shape (G,) with groups.
      split: k, an integer in [0, D]; k = D gives slerp(w), k = 0 gives slerp(1 - w).
        Shape (G,) with groups, k_g in [0, D_g]. Of any size: an int32 array, a Python
        or NumPy int, or the pair (k // WORD, k % WORD) that `random_split` returns for
        groups of 2^31 coordinates or more. (M2N2 draws k uniformly in [0, D), docs/algorithm.md#merge;
        every value of [0, D] is a valid merge.)
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
    hi, lo = split_words(split, num_groups)
    coefficients = split_coefficients(a, b, ratio, eps, dot_threshold, groups)
    out, offsets = [], [0] * num_groups
    for g, x, y in zip(groups, leaves_a, leaves_b):
        (ca_lo, ca_hi), (cb_lo, cb_hi) = coefficients[0][g], coefficients[1][g]
        before = before_split(x.shape, offsets[g], hi[g], lo[g])
        c_a = jnp.where(before, ca_lo, ca_hi)
        c_b = jnp.where(before, cb_lo, cb_hi)
        out.append((c_a * x.astype(jnp.float32) + c_b * y.astype(jnp.float32)).astype(x.dtype))
        offsets[g] += math.prod(x.shape)
    return jax.tree.unflatten(treedef, out)


def split_coefficients(a: PyTree, b: PyTree, ratio: jax.Array, eps: float = 1e-6, dot_threshold: float = 1.0,
                       groups: tuple[int, ...] | None = None) -> tuple[jax.Array, jax.Array]:
    """(c_a, c_b), float32 (G, 2) each: the split-point slerp's coefficients of A and B
    in each group g, before its split point ([g, 0], ratio w_g) and from it on ([g, 1],
    ratio 1 - w_g), each group with its own angle."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    groups = (0,) * len(leaves_a) if groups is None else tuple(groups)
    num_groups = max(groups) + 1
    ratio = jnp.asarray(ratio, jnp.float32).reshape(num_groups)
    pairs = []
    for g in range(num_groups):
        members = [i for i, gi in enumerate(groups) if gi == g]
        pairs.append(slerp_coefficients([leaves_a[i] for i in members], [leaves_b[i] for i in members],
                                        jnp.stack([ratio[g], 1.0 - ratio[g]]), eps, dot_threshold))
    return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


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
        return split_point_slerp(a, b, ratio, np.asarray(group_sizes(a, groups)), eps, dot_threshold, groups)
    ratio = jnp.asarray(ratio, jnp.float32)
    c_a, c_b = slerp_coefficients(a, b, ratio, eps, dot_threshold)
    return jax.tree.map(
        lambda x, y: (c_a * x.astype(jnp.float32) + c_b * y.astype(jnp.float32)).astype(x.dtype),
        a, b,
    )
