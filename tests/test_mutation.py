import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.flatten_util import ravel_pytree

from m2n2_jax.mutation import MUTATION_RNGS, gaussian_mutation, noise_key


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


# --- the mutation RNG option ------------------------------------------------------------------

D_NOISE = 20_000


def noise(key, rng):
    """std = 1 noise of D_NOISE coordinates drawn by `gaussian_mutation` with `rng`."""
    return np.asarray(gaussian_mutation(key, jnp.zeros((D_NOISE,)), 1.0, rng), np.float64)


def np_normal_cdf(x):
    return 0.5 * (1 + scipy.special.erf(x / np.sqrt(2)))


def test_default_rng_is_the_step_keys_own_threefry_draw():
    """The default noise is std * normal(key, (D,)) drawn with the key as given, bit for
    bit, as before the option existed (the digits results depend on it)."""
    key = jax.random.key(5)
    expected = 0.5 * jax.random.normal(key, (D_NOISE,), jnp.float32)
    np.testing.assert_array_equal(gaussian_mutation(key, jnp.zeros((D_NOISE,)), 0.5), expected)
    np.testing.assert_array_equal(gaussian_mutation(key, jnp.zeros((D_NOISE,)), 0.5, "threefry2x32"), expected)
    assert noise_key(key) is key


@pytest.mark.parametrize("rng", MUTATION_RNGS)
def test_each_rng_is_a_pure_function_of_the_key(rng):
    """Same key: the same noise, under jit and not; another key: other noise; and each
    option other than the default draws noise of its own (else it would not be one)."""
    key = jax.random.key(11)
    first = noise(key, rng)
    np.testing.assert_array_equal(first, noise(key, rng))
    np.testing.assert_array_equal(first, np.asarray(jax.jit(gaussian_mutation, static_argnums=3)(
        key, jnp.zeros((D_NOISE,)), 1.0, rng), np.float64))
    other = noise(jax.random.key(12), rng)
    assert abs(np.corrcoef(first, other)[0, 1]) < 0.03
    if rng != "threefry2x32":
        assert abs(np.corrcoef(first, noise(key, "threefry2x32"))[0, 1]) < 0.03


@pytest.mark.parametrize("rng", MUTATION_RNGS)
def test_each_rng_draws_standard_normal_noise(rng):
    """Pooled over 5 keys (100,000 draws): mean 0 and std 1 within 4 standard errors, a
    Kolmogorov-Smirnov distance to N(0, 1) below the 0.1 % critical value 1.95 / sqrt(n),
    and neighbouring coordinates uncorrelated (lag-1 autocorrelation within 4 / sqrt(n))."""
    x = np.concatenate([noise(jax.random.key(k), rng) for k in range(5)])
    n = x.size
    assert abs(x.mean()) < 4 / np.sqrt(n)
    assert abs(x.std() - 1) < 4 / np.sqrt(2 * n)
    cdf = np_normal_cdf(np.sort(x))
    ks = max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())
    assert ks < 1.95 / np.sqrt(n), f"KS distance {ks:.4f}"
    assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 4 / np.sqrt(n)


@pytest.mark.parametrize("rng", MUTATION_RNGS)
def test_vmap_over_keys(rng):
    """threefry: vmap over keys is the map over them, bit for bit. rbg (JAX's
    documented caveat): under vmap the batch is drawn from the first key only, so it
    differs from the map, but its rows still differ from each other."""
    keys = jax.random.split(jax.random.key(3), 4)
    batched = np.asarray(jax.vmap(lambda k: gaussian_mutation(k, jnp.zeros((500,)), 1.0, rng))(keys))
    mapped = np.stack([np.asarray(gaussian_mutation(k, jnp.zeros((500,)), 1.0, rng)) for k in keys])
    if rng == "rbg":
        assert not np.array_equal(batched, mapped)
        assert np.abs(np.corrcoef(batched)[np.triu_indices(4, 1)]).max() < 0.2
    else:
        np.testing.assert_array_equal(batched, mapped)


def test_unknown_rng_is_refused():
    with pytest.raises(ValueError, match="rng must be one of"):
        gaussian_mutation(jax.random.key(0), jnp.zeros(3), 1.0, "unsafe_rbg")
