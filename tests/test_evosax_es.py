"""The evosax CMA-ES baselines: budget accounting, improvement, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m2n2_jax as mj
from m2n2_jax.baselines.evosax_es import STRATEGIES, es_log_mask, run_es
from m2n2_jax.models.mlp import MLP, random_params

rng = np.random.default_rng(1)
X = rng.normal(size=(100, 6)).astype(np.float32)
Y = X[:, :3].argmax(1).astype(np.int32)
MODEL = MLP(features=(4, 3))
SCORE_FN = mj.classification_scores(MODEL.apply)
INIT = lambda key: random_params(key, MODEL, 6, std=0.01)
KEYS = jax.vmap(jax.random.key)(jnp.arange(2))


@pytest.mark.parametrize("name", STRATEGIES)
def test_es_improves_on_a_tiny_problem_and_counts_passes_exactly(name):
    result = run_es(KEYS, name, INIT, SCORE_FN, (X, Y), 600, population_size=10, std_init=0.1,
                    test_data=(X, Y), log_every=100, progress=False)
    np.testing.assert_array_equal(result.passes, np.arange(100, 601, 100))
    assert result.log_wall_seconds.shape == (6,) and np.all(np.diff(result.log_wall_seconds) >= 0)
    assert np.all(np.isfinite(result.test_accuracy)), "every logged generation has its test accuracy"
    assert int(result.state.generation_counter[0]) == 60  # 600 passes = 10 x 60 generations
    start = float(SCORE_FN(INIT(jax.random.split(KEYS[0])[0]), (X, Y)).mean())
    assert np.all(result.final_train_accuracy > max(start, 0.6))
    assert np.all(np.diff(result.train_accuracy, axis=1) >= 0)
    # The logged best solution is the returned one, scored on the same data.
    best0 = jax.tree.map(lambda x: x[0], result.best_params)
    np.testing.assert_allclose(float(SCORE_FN(best0, (X, Y)).mean()), result.final_train_accuracy[0], atol=1e-6)


def test_es_time_limit_stops_after_one_call_and_scores_the_last_generation():
    full = run_es(KEYS, "sep-cma-es", INIT, SCORE_FN, (X, Y), 600, population_size=10, std_init=0.1,
                  test_data=(X, Y), log_every=10, generations_per_call=7, progress=False)
    cut = run_es(KEYS, "sep-cma-es", INIT, SCORE_FN, (X, Y), 600, population_size=10, std_init=0.1,
                 test_data=(X, Y), log_every=100, generations_per_call=7, time_limit=1e-9, progress=False)
    np.testing.assert_array_equal(cut.passes, [70])  # 7 generations x 10, not a multiple of log_every
    assert int(cut.state.generation_counter[0]) == 7
    assert np.all(np.isfinite(cut.test_accuracy)) and cut.log_wall_seconds.shape == (1,)
    # The same generations as the uninterrupted run, logged at every generation (70 passes = index 6).
    np.testing.assert_array_equal(cut.train_accuracy[:, 0], full.train_accuracy[:, 6])
    np.testing.assert_allclose(cut.test_accuracy[:, 0], full.test_accuracy[:, 6], atol=1e-6)
    best0 = jax.tree.map(lambda x: x[0], cut.best_params)
    np.testing.assert_allclose(float(SCORE_FN(best0, (X, Y)).mean()), cut.test_accuracy[0, 0], atol=1e-6)


def test_es_log_mask_reaches_each_multiple_once():
    mask = es_log_mask(generations=12, population_size=20, log_every=50)
    passes = 20 * np.arange(1, 13)[mask]
    np.testing.assert_array_equal(passes, [60, 100, 160, 200, 240])


@pytest.mark.parametrize("kwargs, message", [
    ({"forward_passes": 105}, "multiple of the population"),
    ({"forward_passes": 5}, "multiple of the population"),
    ({"name": "pso"}, "unknown ES"),
    ({"population_size": 1}, "population_size"),
    ({"std_init": 0.0}, "std_init"),
    ({"time_limit": 0}, "time_limit"),
    ({"generations_per_call": 0}, "generations_per_call"),
])
def test_es_validates_input(kwargs, message):
    args = dict(key=KEYS, name="sep-cma-es", init_fn=INIT, score_fn=SCORE_FN, data=(X, Y), forward_passes=100,
                population_size=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        run_es(**args, progress=False)
