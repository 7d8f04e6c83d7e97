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
