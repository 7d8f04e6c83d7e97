import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from m2n2_jax.mutation import gaussian_mutation


def test_mutation_equals_flat_vector_mutation(transform):
    tree = {"w": jnp.ones((30, 40)), "b": jnp.zeros((40,)), "s": jnp.ones(())}
    key = jax.random.key(3)
    out = transform(gaussian_mutation)(key, tree, 0.5)
    flat, unravel = ravel_pytree(tree)
    flat_out = ravel_pytree(gaussian_mutation(key, flat, 0.5))[0]
    np.testing.assert_allclose(ravel_pytree(out)[0], flat_out, rtol=1e-6, atol=1e-6)


def test_mutation_noise_statistics_and_determinism():
    tree = {"w": jnp.zeros((200, 100))}
    out = gaussian_mutation(jax.random.key(0), tree, 0.01)
    noise = np.asarray(out["w"])
    assert abs(noise.mean()) < 3e-4
    np.testing.assert_allclose(noise.std(), 0.01, rtol=0.02)
    chex.assert_trees_all_equal(out, gaussian_mutation(jax.random.key(0), tree, 0.01))
    assert not np.allclose(out["w"], gaussian_mutation(jax.random.key(1), tree, 0.01)["w"])


def test_mutation_keeps_dtype():
    tree = {"a": jnp.ones((8,), jnp.bfloat16), "b": jnp.ones((3,), jnp.float32)}
    chex.assert_trees_all_equal_dtypes(gaussian_mutation(jax.random.key(0), tree, 0.1), tree)
