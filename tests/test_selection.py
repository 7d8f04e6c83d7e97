"""Parent sampling (docs/algorithm.md#selection) against exact NumPy probabilities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from conftest import np_fitness

from m2n2_jax.selection import attraction_probs, proportional, sample, sample_parents

DRAWS = 6000


def np_proportional(weights, occupied):
    w = np.where(occupied, weights, 0.0)
    return w / w.sum() if w.sum() > 0 else occupied / occupied.sum()


def np_joint(scores, occupied, use_attraction):
    """NumPy reference: P(A = a, B = b), shape (N, N). A ~ f over occupied slots; B ~
    g(A, .) over occupied slots, or ~ f where g(A, .) is zero everywhere (or without
    attraction)."""
    per_point, fitness = np_fitness(scores)
    p_a = np_proportional(fitness, occupied)
    joint = np.zeros((len(p_a), len(p_a)))
    for a in np.flatnonzero(p_a):
        g = np.where(occupied, np.maximum(per_point - per_point[a], 0).sum(1), 0.0)
        joint[a] = p_a[a] * (g / g.sum() if use_attraction and g.sum() > 0 else p_a)
    return joint


@functools.partial(jax.jit, static_argnums=3)
def _draw(keys, per_point, fitness, use_attraction, occupied):
    return jax.vmap(lambda k: sample_parents(k, per_point, fitness, occupied, use_attraction))(keys)


def draw(scores, occupied, use_attraction, seed=0):
    """Empirical joint frequencies of (A, B) over DRAWS keys."""
    per_point, fitness = np_fitness(scores)
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    a, b = _draw(keys, jnp.asarray(per_point, jnp.float32), jnp.asarray(fitness, jnp.float32), use_attraction,
                 jnp.asarray(occupied))
    n = len(occupied)
    return np.bincount(np.asarray(a) * n + np.asarray(b), minlength=n * n).reshape(n, n) / DRAWS


def test_proportional_matches_numpy_and_skips_empty(rng):
    weights = rng.uniform(size=10)
    occupied = np.arange(10) < 6
    p = proportional(weights, occupied)
    np.testing.assert_allclose(p, np_proportional(weights, occupied), rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(p)[6:] == 0)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)


def test_proportional_all_zero_falls_back_to_uniform_over_occupied():
    p = proportional(jnp.zeros(5), jnp.array([True, False, True, True, False]))
    np.testing.assert_allclose(p, [1 / 3, 0, 1 / 3, 1 / 3, 0], rtol=1e-6)
    # weights on empty slots never count, even when the occupied ones are all zero
    p = proportional(jnp.array([0.0, 5.0, 0.0]), jnp.array([True, False, True]))
    np.testing.assert_allclose(p, [0.5, 0, 0.5], rtol=1e-6)


def test_sample_frequencies_match_probs():
    probs = jnp.array([0.1, 0.0, 0.6, 0.3])
    keys = jax.random.split(jax.random.key(3), DRAWS)
    i = jax.jit(jax.vmap(lambda k: sample(k, probs)))(keys)
    np.testing.assert_allclose(np.bincount(np.asarray(i), minlength=4) / DRAWS, probs, atol=0.02)
    assert not np.any(np.asarray(i) == 1)


def test_parent_frequencies_match_numpy_probabilities(rng):
    scores = (rng.uniform(size=(6, 50)) > 0.5).astype(np.float64)
    scores[5] = 0.0  # an empty slot
    occupied = np.arange(6) < 5
    freq, expected = draw(scores, occupied, True, seed=1), np_joint(scores, occupied, True)
    np.testing.assert_allclose(freq, expected, atol=0.02)
    # marginal of A ~ f, and the conditional B | A = 0 ~ g(0, .) normalised
    _, fitness = np_fitness(scores)
    np.testing.assert_allclose(freq.sum(1), fitness / fitness.sum(), atol=0.02)
    assert freq[5].sum() == 0 and freq[:, 5].sum() == 0, "an empty slot was chosen as a parent"
    assert np.trace(freq) == 0, "A mated with itself"


def test_attraction_probs_match_numpy(rng):
    per_point = rng.uniform(size=(8, 20))
    occupied = np.arange(8) != 6
    p = attraction_probs(per_point, 2, occupied)
    g = np.where(occupied, np.maximum(per_point - per_point[2], 0).sum(1), 0.0)
    np.testing.assert_allclose(p, g / g.sum(), rtol=1e-5, atol=1e-7)
    assert p[2] == 0 and p[6] == 0
    # a dominating A: zero attraction everywhere, all-zero probabilities
    np.testing.assert_array_equal(attraction_probs(per_point.max(0, keepdims=True) * np.ones((3, 1)), 0,
                                                   np.ones(3, bool)), np.zeros(3))


def test_dominating_parent_draws_mate_from_fitness():
    """Model 0 solves everything the others do: g(0, .) = 0, so B | A = 0 ~ f (B may
    equal A). The other rows follow attraction. Exact joint probabilities:"""
    scores = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 0]], np.float64)
    expected = np_joint(scores, np.ones(3, bool), True)
    _, f = np_fitness(scores)  # f = [5/2, 1, 1/2]
    np.testing.assert_allclose(expected[0] / expected[0].sum(), f / f.sum())
    freq = draw(scores, np.ones(3, bool), True, seed=4)
    np.testing.assert_allclose(freq, expected, atol=0.02)
    b_given_0 = freq[0] / freq[0].sum()
    np.testing.assert_allclose(b_given_0, [5 / 8, 2 / 8, 1 / 8], atol=0.03)


def test_without_attraction_parents_are_independent_fitness_draws(rng):
    scores = (rng.uniform(size=(4, 30)) > 0.3).astype(np.float64)
    occupied = np.ones(4, bool)
    freq = draw(scores, occupied, False, seed=2)
    _, fitness = np_fitness(scores)
    p = fitness / fitness.sum()
    np.testing.assert_allclose(freq, np.outer(p, p), atol=0.02)
    np.testing.assert_allclose(freq, np_joint(scores, occupied, False), atol=0.02)
    assert np.trace(freq) > 0.1  # A == B happens
