import jax
import jax.numpy as jnp
import numpy as np

from conftest import np_fitness
from m2n2_jax.selection import attraction_probs, proportional, sample_parents


def test_proportional_sums_to_one_and_skips_empty(rng):
    weights = rng.uniform(size=10)
    occupied = np.arange(10) < 6
    p = proportional(weights, occupied)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
    assert np.all(np.asarray(p)[6:] == 0)
    np.testing.assert_allclose(p[:6], weights[:6] / weights[:6].sum(), rtol=1e-5)


def test_proportional_all_zero_falls_back_to_uniform_over_occupied():
    p = proportional(jnp.zeros(5), jnp.array([True, False, True, True, False]))
    np.testing.assert_allclose(p, [1 / 3, 0, 1 / 3, 1 / 3, 0], rtol=1e-6)


def _draw(key, scores, occupied, use_attraction, n=4000):
    per_point, fitness = np_fitness(scores)
    keys = jax.random.split(key, n)
    f = jax.jit(jax.vmap(lambda k: sample_parents(k, per_point, fitness, occupied, use_attraction)))
    a, b = f(keys)
    return np.asarray(a), np.asarray(b), per_point, fitness


def test_parent_frequencies_match_numpy_probabilities(rng):
    scores = (rng.uniform(size=(6, 50)) > 0.5).astype(np.float64)
    scores[5] = 0.0  # an empty slot
    occupied = np.arange(6) < 5
    a, b, per_point, fitness = _draw(jax.random.key(1), scores, occupied, True)
    p_a = fitness / fitness.sum()
    np.testing.assert_allclose(np.bincount(a, minlength=6) / len(a), p_a, atol=0.03)
    assert not np.any(a == 5) and not np.any(b == 5), "an empty slot was chosen as a parent"
    assert not np.any(a == b), "A mated with itself"
    # B given A = 0 follows g(0, .) normalised.
    g = np.maximum(per_point - per_point[0], 0).sum(1)
    freq = np.bincount(b[a == 0], minlength=6) / max((a == 0).sum(), 1)
    np.testing.assert_allclose(freq, g / g.sum(), atol=0.06)


def test_attraction_probs_sum_to_one(rng):
    per_point = rng.uniform(size=(8, 20))
    p = attraction_probs(per_point, 2, np.ones(8, bool))
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
    assert p[2] == 0


def test_dominating_parent_draws_mate_from_fitness():
    # Model 0 solves everything the others do: g(0, .) = 0, so B ~ f (may equal A).
    scores = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 0]], np.float64)
    per_point, fitness = np_fitness(scores)
    keys = jax.random.split(jax.random.key(0), 500)
    a, b = jax.vmap(lambda k: sample_parents(k, per_point, fitness, np.ones(3, bool), True))(keys)
    b_given_0 = np.asarray(b)[np.asarray(a) == 0]
    assert len(b_given_0) > 50 and np.all(b_given_0 >= 0)
    assert np.any(b_given_0 == 0) and np.any(b_given_0 != 0)


def test_without_attraction_parents_are_independent_fitness_draws(rng):
    scores = (rng.uniform(size=(4, 30)) > 0.3).astype(np.float64)
    a, b, _, fitness = _draw(jax.random.key(2), scores, np.ones(4, bool), False)
    p = fitness / fitness.sum()
    np.testing.assert_allclose(np.bincount(b, minlength=4) / len(b), p, atol=0.03)
    assert np.any(a == b)
