import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from m2n2_jax.merge import num_params, slerp, split_point_slerp


def np_split_slerp(a, b, w, k, eps=1e-6):
    """NumPy reference of SPEC mechanism 3 on flat float64 vectors."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)
    omega = np.arccos(cos)
    wd = np.where(np.arange(a.size) < k, w, 1 - w)
    if np.sin(omega) < eps:
        return (1 - wd) * a + wd * b
    return np.sin((1 - wd) * omega) / np.sin(omega) * a + np.sin(wd * omega) / np.sin(omega) * b


def random_tree(rng, dtype=jnp.float32):
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), dtype), "bias": jnp.asarray(rng.normal(size=(5,)), dtype)},
        "conv": jnp.asarray(rng.normal(size=(2, 3, 4)), dtype),
        "scale": jnp.asarray(rng.normal(size=()), dtype),
    }


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0], np.float64)


# Leaf order is conv (24), dense/bias (5), dense/kernel (30), scale (1): D = 60.
@pytest.mark.parametrize("k", [0, 1, 23, 24, 29, 30, 45, 59, 60])
def test_split_point_slerp_matches_numpy(transform, k):
    rng = np.random.default_rng(k)
    a, b = random_tree(rng), random_tree(rng)
    assert num_params(a) == 60
    w = float(rng.uniform())
    child = transform(split_point_slerp)(a, b, w, k)
    chex.assert_trees_all_equal_shapes_and_dtypes(child, a)
    np.testing.assert_allclose(flat(child), np_split_slerp(flat(a), flat(b), w, k), rtol=2e-5, atol=2e-6)


def test_split_point_at_ends_gives_plain_slerps(rng):
    a, b = random_tree(rng), random_tree(rng)
    w = 0.3
    chex.assert_trees_all_close(split_point_slerp(a, b, w, 60), slerp(a, b, w), atol=1e-6)
    chex.assert_trees_all_close(split_point_slerp(a, b, w, 0), slerp(a, b, 1 - w), atol=1e-6)
    np.testing.assert_allclose(flat(slerp(a, b, w)), np_split_slerp(flat(a), flat(b), w, 60), rtol=2e-5, atol=2e-6)


def test_ratio_zero_returns_first_parent_and_one_the_second(rng):
    a, b = random_tree(rng), random_tree(rng)
    chex.assert_trees_all_close(slerp(a, b, 0.0), a, atol=1e-6)
    chex.assert_trees_all_close(slerp(a, b, 1.0), b, atol=1e-5)


def test_parallel_parents_fall_back_to_linear(rng):
    a = random_tree(rng)
    b = jax.tree.map(lambda x: 2.0 * x, a)  # sin(Omega) = 0
    child = slerp(a, b, 0.25)
    chex.assert_tree_all_finite(child)
    chex.assert_trees_all_close(child, jax.tree.map(lambda x: 1.25 * x, a), rtol=1e-5)
    zero = jax.tree.map(jnp.zeros_like, a)
    chex.assert_trees_all_close(slerp(zero, a, 0.5), jax.tree.map(lambda x: 0.5 * x, a), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_leaves_keep_dtype_and_match_float32(rng, dtype):
    a, b = random_tree(rng, dtype), random_tree(rng, dtype)
    child = split_point_slerp(a, b, 0.4, 17)
    chex.assert_trees_all_equal_dtypes(child, a)
    ref = np_split_slerp(flat(a), flat(b), 0.4, 17)
    np.testing.assert_allclose(flat(child), ref, rtol=2e-2, atol=2e-2)


def test_merge_is_vmappable(rng):
    a, b = random_tree(rng), random_tree(rng)
    ws = jnp.array([0.1, 0.5, 0.9])
    ks = jnp.array([0, 30, 60])
    batched = jax.vmap(split_point_slerp, in_axes=(None, None, 0, 0))(a, b, ws, ks)
    for i in range(3):
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], batched), split_point_slerp(a, b, ws[i], ks[i]), atol=1e-6)


def mixed_tree(rng, num_leaves=23):
    """Shapes of random ranks 0-3 and dtypes cycling float32, bfloat16, float16."""
    dtypes = [jnp.float32, jnp.bfloat16, jnp.float16]
    shapes = [tuple(int(s) for s in rng.integers(1, 5, size=rng.integers(0, 4))) for _ in range(num_leaves)]
    return shapes, [dtypes[i % 3] for i in range(num_leaves)]


def build(rng, shapes, dtypes):
    return {f"l{i:02d}": jnp.asarray(rng.normal(size=s), d) for i, (s, d) in enumerate(zip(shapes, dtypes))}


def test_leafwise_merge_equals_flat_merge_on_many_mixed_dtype_leaves():
    rng = np.random.default_rng(7)
    shapes, dtypes = mixed_tree(rng)
    a, b = build(rng, shapes, dtypes), build(rng, shapes, dtypes)
    sizes = [int(np.prod(s)) for s in shapes]
    d = sum(sizes)
    bounds = list(np.cumsum(sizes))
    ends = [0, d, bounds[0], bounds[5], bounds[11] + 1, bounds[17] - 1, d // 2]
    to32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
    flat_a, unravel = ravel_pytree(to32(a))
    flat_b, _ = ravel_pytree(to32(b))
    for k in ends:
        w = float(rng.uniform())
        child = jax.jit(split_point_slerp)(a, b, w, k)
        chex.assert_trees_all_equal_shapes_and_dtypes(child, a)
        # The flat merge: one concatenated float32 vector, unraveled and cast back per leaf.
        flat_child = unravel(split_point_slerp({"v": flat_a}, {"v": flat_b}, w, k)["v"])
        flat_child = jax.tree.map(lambda x, ref: x.astype(ref.dtype), flat_child, a)
        for name in a:
            np.testing.assert_allclose(np.asarray(child[name], np.float32), np.asarray(flat_child[name], np.float32),
                                       rtol=1e-2 if a[name].dtype != jnp.float32 else 1e-5, atol=1e-2, err_msg=name)
        # And both equal the NumPy reference on the float64 vectors.
        ref = np_split_slerp(flat(to32(a)), flat(to32(b)), w, k)
        np.testing.assert_allclose(flat(to32(child)), ref, rtol=2e-2, atol=2e-2)
        f32 = np.concatenate([np.full(s, dt == jnp.float32) for s, dt in zip(sizes, dtypes)])
        np.testing.assert_allclose(flat(to32(child))[f32], ref[f32], rtol=2e-5, atol=2e-6)
