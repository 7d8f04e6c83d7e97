import jax
import numpy as np
import pytest

from conftest import np_fitness
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
