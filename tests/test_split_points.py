"""Split points of any size (merge.py): a group of a 7B model holds more than 2^31
coordinates, so k travels as the int32 pair (k // WORD, k % WORD). Checked against
Python integers, against `index < k` in ravel order, and for uniformity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_merge import np_split_slerp, random_tree

import m2n2_jax as mj
from m2n2_jax.merge import WORD, _random_wide, before_split, leaf_split, random_split, split_point_slerp

BEYOND_INT32 = 3 * 2**31 + 11


def python_cut(k: int, offset: int, shape: tuple[int, ...]) -> tuple[int, int]:
    """(row, column) of clip(k - offset, 0, size) in the leaf viewed as (rows, rest)."""
    rows = shape[0] if shape else 1
    size = int(np.prod(shape, dtype=object))
    inside = min(max(k - offset, 0), size)
    return (rows, 0) if inside == size else divmod(inside, size // rows)


# (3000, 2**20) and (2**20, 2**13) hold more than 2^31 coordinates: the long division.
@pytest.mark.parametrize("shape", [(), (3,), (5, 7), (2, 3, 4), (3000, 2**20), (2**20, 2**13)])
@pytest.mark.parametrize("offset", [0, 17, BEYOND_INT32])
@pytest.mark.parametrize("traced", [False, True], ids=["static offset", "offset as traced words"])
def test_leaf_split_equals_python_integer_arithmetic(shape, offset, traced):
    size = int(np.prod(shape, dtype=object))
    rng = np.random.default_rng(size % 1000 + offset % 1000)
    ks = [offset - 1, offset, offset + 1, offset + size - 1, offset + size, offset + size + 1]
    ks += [int(k) for k in rng.integers(max(offset - 10, 0), offset + size + 10, size=20)]
    words = (jnp.int32(offset // WORD), jnp.int32(offset % WORD))
    cut = jax.jit(lambda hi, lo, words: leaf_split(hi, lo, words if traced else offset, shape))
    for k in [k for k in ks if k >= 0]:
        row, column = cut(jnp.int32(k // WORD), jnp.int32(k % WORD), words)
        assert (int(row), int(column)) == python_cut(k, offset, shape), k


@pytest.mark.parametrize("base", [0, BEYOND_INT32])
def test_cut_is_flat_index_below_k_across_leaf_boundaries(base):
    """Leaves of ranks 0 to 3 laid end to end from flat index `base`: for every k, the
    coordinates before the split are exactly those whose ravel index is below k."""
    shapes = [(2, 3, 4), (5,), (6, 5), ()]
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = base + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    total = sum(sizes)
    mask = jax.jit(lambda hi, lo: jnp.concatenate(
        [before_split(s, int(o), hi, lo).reshape(-1) for s, o in zip(shapes, offsets)]))
    for j in range(-2, total + 3):
        k = base + j
        if k < 0:
            continue
        got = np.asarray(mask(jnp.int32(k // WORD), jnp.int32(k % WORD)))
        np.testing.assert_array_equal(got, np.arange(total) < j, err_msg=f"k = base + {j}")


@pytest.mark.parametrize("k", [0, 23, 24, 29, 45, 60])
def test_every_form_of_a_split_point_gives_the_numpy_merge(rng, k):
    a, b = random_tree(rng), random_tree(rng)
    expected = np_split_slerp(ravel_pytree(a)[0], ravel_pytree(b)[0], 0.3, k)
    for split in (k, np.int64(k), jnp.int32(k), (jnp.int32(k // WORD), jnp.int32(k % WORD))):
        child = ravel_pytree(split_point_slerp(a, b, 0.3, split))[0]
        np.testing.assert_allclose(child, expected, rtol=1e-5, atol=1e-6, err_msg=repr(split))


def chi_square_p(counts: np.ndarray) -> float:
    """p-value of counts against the uniform distribution (chi-square, df = n - 1)."""
    from scipy import stats
    return float(stats.chisquare(counts).pvalue)


def test_random_split_is_uniform_over_the_coordinates_of_a_model():
    d = 60  # random_tree's D, over four leaves
    ks = jax.vmap(lambda key: random_split(key, (d,)))(jax.random.split(jax.random.key(0), 30_000))
    counts = np.bincount(np.asarray(ks), minlength=d)
    assert counts.size == d and chi_square_p(counts) > 1e-3


@pytest.mark.parametrize("size", [29, 32, 8, 5])
def test_wide_draw_is_exactly_uniform(size):
    """The (hi, lo) draw with a word of 8: hi below ceil(size / 8), redrawn past size.
    Without the redraw (or with k clipped to size - 1) the counts fail this test."""
    word = 8
    hi, lo = jax.jit(jax.vmap(lambda key: _random_wide(key, size, word)))(jax.random.split(jax.random.key(1), 40_000))
    ks = np.asarray(hi) * word + np.asarray(lo)
    assert ks.min() >= 0 and ks.max() < size
    assert chi_square_p(np.bincount(ks, minlength=size)) > 1e-3


def test_groups_beyond_int32_draw_in_range_and_cover_the_high_words():
    sizes = (BEYOND_INT32, 100)
    hi, lo = jax.jit(jax.vmap(lambda key: random_split(key, sizes, (2,))))(jax.random.split(jax.random.key(2), 4000))
    ks = np.asarray(hi, np.int64) * WORD + np.asarray(lo)
    assert (ks >= 0).all() and (ks < np.array(sizes)).all()
    top = -(-BEYOND_INT32 // WORD)  # 7 high words, the last holding 11 coordinates
    share = np.bincount(np.asarray(hi[:, 0]), minlength=top) / len(ks)
    np.testing.assert_allclose(share[:-1], WORD / BEYOND_INT32, atol=0.03)
    assert share[-1] < 0.01
    assert abs(ks[:, 0].mean() / BEYOND_INT32 - 0.5) < 0.03


def test_a_7b_group_merges_in_abstract_shapes():
    """Two bf16 leaves of 1.61e9 coordinates as one group (3.2e9 > 2^31): M2N2's merge
    and the grouped one trace (randint on an int32 bound used to overflow)."""
    leaf = jax.ShapeDtypeStruct((40_000, 40_250), jnp.bfloat16)
    model = {"a": leaf, "b": leaf}
    algorithm = mj.M2N2(archive_size=2, mutation=False)
    merge = lambda a, b: algorithm.merge(jax.random.key(0), jax.random.key(1), a, b, algorithm.default_params())
    assert jax.eval_shape(merge, model, model) == model
    grouped = mj.M2N2(archive_size=2, mutation=False, groups=lambda path: path)
    merge = lambda a, b: grouped.merge(jax.random.key(0), jax.random.key(1), a, b, grouped.default_params())
    assert jax.eval_shape(merge, model, model) == model


def test_split_refuses_non_integers_and_groups_past_2_61():
    with pytest.raises(ValueError, match="integer"):
        split_point_slerp({"v": jnp.ones(3)}, {"v": jnp.ones(3)}, 0.5, 1.5)
    with pytest.raises(ValueError, match="2\\^61"):
        _random_wide(jax.random.key(0), 2**62)
