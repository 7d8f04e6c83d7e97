import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_fitness, np_general_fitness

from m2n2_jax.fitness import attraction, resource_fitness


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("with_capacity", [False, True])
def test_resource_fitness_matches_numpy(rng, alpha, with_capacity):
    scores = rng.uniform(size=(7, 30)) * (rng.uniform(size=(7, 30)) > 0.4)
    scores[:, 3] = 0.0  # nobody solves datapoint 3: z = 1, no division by zero
    capacity = rng.uniform(0.5, 2.0, size=30) if with_capacity else None
    per_point, fitness = jax.jit(resource_fitness)(scores, alpha, capacity)
    ref_pp, ref_f = np_fitness(scores, alpha, capacity)
    np.testing.assert_allclose(per_point, ref_pp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fitness, ref_f, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(per_point))


def test_sole_solver_collects_whole_resource():
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    per_point, fitness = resource_fitness(scores)
    np.testing.assert_allclose(per_point[:, 0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(per_point[:, 1], [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(fitness, [4 / 3, 1 / 3, 4 / 3], rtol=1e-6)


def test_alpha_zero_is_plain_summed_score(rng):
    scores = (rng.uniform(size=(5, 40)) > 0.5).astype(np.float32)
    _, fitness = resource_fitness(scores, 0.0)
    np.testing.assert_allclose(fitness, scores.sum(1), rtol=1e-6)


def test_attraction_matches_numpy(rng):
    per_point = rng.uniform(size=(6, 25))
    for a in range(6):
        g = attraction(per_point, a)
        ref = np.maximum(per_point - per_point[a], 0).sum(1)
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)
        assert g[a] == 0.0


# --- the paper's general form (docs/algorithm.md#fitness) ----------------------------------

@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("eps", [0.0, 1e-2])
@pytest.mark.parametrize("rule", ["fixed", "max"])
@pytest.mark.parametrize("subtract_worst", [False, True])
def test_general_fitness_matches_numpy_on_continuous_scores(rng, alpha, eps, rule, subtract_worst):
    """Continuous scores, some rows not competing (their junk scores must enter neither z,
    nor the min, nor the max)."""
    scores = rng.uniform(0.2, 1.0, size=(7, 30))
    competing = np.array([True, True, False, True, True, False, True])
    scores[~competing] = rng.uniform(0.0, 0.1, size=(2, 30))  # would be the min and change z
    per_point, fitness = jax.jit(functools.partial(resource_fitness, capacity_rule=rule,
                                                   subtract_worst=subtract_worst))(
        scores, alpha, None, eps=eps, competing=competing)
    ref_pp, ref_f = np_general_fitness(scores, competing, alpha, eps, "max" if rule == "max" else "ones",
                                       subtract_worst)
    np.testing.assert_allclose(per_point, ref_pp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fitness, ref_f, rtol=1e-5, atol=1e-6)


def test_capacity_max_is_the_best_competing_score():
    """Datapoint 0 is worth 0.2 at most, datapoint 1 up to 1: with capacity "max" the sole
    scorer of datapoint 0 collects 0.2, not 1 (with ones it would collect 1)."""
    scores = np.array([[0.2, 0.0], [0.0, 1.0]])
    _, ones = resource_fitness(scores)
    _, capped = resource_fitness(scores, capacity_rule="max")
    np.testing.assert_allclose(ones, [1.0, 1.0])
    np.testing.assert_allclose(capped, [0.2, 1.0], rtol=1e-6)


def test_capacity_max_times_a_given_capacity(rng):
    """capacity_rule="max" with Params.capacity w: c_j = w_j max_k S'[k, j] over the
    competing rows (NumPy); w = ones is the rule alone, and w changes the fitness."""
    scores = rng.uniform(0.2, 1.0, size=(5, 12))
    competing = np.array([True, False, True, True, True])
    w = rng.uniform(0.5, 3.0, size=12)
    per_point, fitness = resource_fitness(scores, 1.0, w, competing=competing, capacity_rule="max")
    s = scores[competing]
    ref_pp, ref_f = np_general_fitness(scores, competing, capacity=w * s.max(0))
    np.testing.assert_allclose(per_point, ref_pp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fitness, ref_f, rtol=1e-5, atol=1e-6)
    plain = resource_fitness(scores, 1.0, np.ones(12), competing=competing, capacity_rule="max")[1]
    np.testing.assert_allclose(plain, resource_fitness(scores, competing=competing, capacity_rule="max")[1], rtol=1e-6)
    assert np.abs(plain - fitness).max() > 1e-2


def test_capacity_max_equals_ones_on_binary_scores(rng):
    scores = (rng.uniform(size=(6, 40)) > 0.6).astype(np.float32)
    np.testing.assert_array_equal(resource_fitness(scores, capacity_rule="max")[1], resource_fitness(scores)[1])


def test_worst_subtraction_removes_what_every_model_scores():
    """Datapoint 0 is scored 0.9 by both: after subtraction it is worth nothing, so the
    model that wins datapoint 1 is the fitter one; without subtraction they tie."""
    scores = np.array([[0.9, 0.3], [0.9, 0.5]])
    _, plain = resource_fitness(scores)
    _, subtracted = resource_fitness(scores, subtract_worst=True)
    assert plain[0] < plain[1] and subtracted[0] == 0.0 and subtracted[1] > 0
    np.testing.assert_allclose(subtracted, [0.0, 1.0], rtol=1e-6)


def test_eps_zero_is_the_digits_code_bit_for_bit(rng):
    scores = (rng.uniform(size=(6, 40)) > 0.6).astype(np.float32)
    for alpha in (0.0, 0.5, 1.0):
        old = resource_fitness(scores, alpha)
        new = jax.jit(lambda s, a: resource_fitness(s, a, eps=jnp.float32(0.0), competing=np.ones(6, bool)))(
            scores, alpha)
        np.testing.assert_array_equal(old[0], new[0])
        np.testing.assert_array_equal(old[1], new[1])


def test_eps_enters_the_normaliser():
    scores = np.array([[0.5, 0.0], [0.5, 0.25]])
    _, f = resource_fitness(scores, eps=0.5)
    np.testing.assert_allclose(f, [0.5 / 1.5, 0.5 / 1.5 + 0.25 / 0.75], rtol=1e-6)


def test_attraction_weighs_datapoints_by_capacity_over_z(rng):
    """g(A, B) = sum_j c_j / (z_j^alpha + eps) max(0, S'[B, j] - S'[A, j]), computed
    directly from the scores in NumPy, equals `attraction` of the general fitness."""
    scores = rng.uniform(size=(5, 20))
    competing = np.ones(5, bool)
    per_point, _ = resource_fitness(scores, 0.7, eps=0.1, competing=competing, capacity_rule="max", subtract_worst=True)
    s = scores - scores.min(0)
    weight = s.max(0) / (s.sum(0) ** 0.7 + 0.1)
    for a in range(5):
        ref = (weight * np.maximum(s - s[a], 0)).sum(1)
        np.testing.assert_allclose(attraction(per_point, a), ref, rtol=1e-5, atol=1e-6)
