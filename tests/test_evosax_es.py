"""The evosax adapter (m2n2_jax.EvosaxES): start, best-so-far, exact budget."""

import functools

import chex
import jax
import numpy as np
import problems as P
import pytest
from jax.flatten_util import ravel_pytree

import m2n2_jax as mj
from experiments.methods import ES, make_method

CASES = {name: make_method(name, P.SETTINGS) for name in ES}  # population 4, std_init 0.3
TEMPLATE = P.SETTINGS.es.template


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def seeds(n, seed=0):
    return jax.vmap(P.init_model)(jax.random.split(jax.random.key(seed), n))


def scores_of(models):
    return jax.vmap(P.score_fn, (0, None))(models, P.TRAIN)


@functools.partial(jax.jit, static_argnums=0)
def init(algorithm, params, models, scores):
    return algorithm.init(jax.random.key(0), models, scores, params)


@functools.partial(jax.jit, static_argnums=0)
def generation(algorithm, params, state, key):
    """ask, score, tell: (state, children, their scores)."""
    key_ask, key_tell = jax.random.split(key)
    children, state = algorithm.ask(key_ask, state, params)
    scores = scores_of(children)
    return algorithm.tell(key_tell, state, children, scores, params), children, scores


@pytest.fixture(params=list(ES))
def case(request):
    return CASES[request.param]


def test_search_starts_at_the_mean_of_the_seeds_and_the_best_seed_is_best(case):
    algorithm, params = case
    models = seeds(3)
    scores = scores_of(models)
    state = init(algorithm, params, models, scores)
    each = np.stack([flat(jax.tree.map(lambda x: x[i], models)) for i in range(3)])
    np.testing.assert_allclose(state.mean, each.mean(0), rtol=1e-6, atol=1e-7)
    means = np.asarray(scores).mean(1)
    assert len(set(means)) == 3, "distinct seed scores"
    model, score = algorithm.best(state, algorithm.default_params())
    best = int(np.argmax(means))
    chex.assert_trees_all_equal(model, jax.tree.map(lambda x: x[best], models))
    assert float(score) == np.float32(means[best])
    assert float(state.std) == pytest.approx(0.3)  # Params are evosax's own (std_init)


def test_best_is_the_best_so_far_by_training_score(case):
    """Over generations, best() is the model with the highest mean training score among
    the seeds and every child told so far (the earliest on ties), like NumPy tracking."""
    algorithm, params = case
    models = seeds(2, seed=1)
    scores = scores_of(models)
    state = init(algorithm, params, models, scores)
    means = np.asarray(scores).mean(1)
    best_score, best_model = means.max(), flat(jax.tree.map(lambda x: x[int(np.argmax(means))], models))
    improved = 0
    for g in range(12):
        state, children, child_scores = generation(algorithm, params, state, jax.random.key(g))
        child_means = np.asarray(child_scores).mean(1)
        assert child_scores.shape == (algorithm.population_size, 90)
        if child_means.max() > best_score:
            i = int(np.argmax(child_means))
            best_score, best_model = child_means[i], flat(jax.tree.map(lambda x: x[i], children))
            improved += 1
        model, score = algorithm.best(state, algorithm.default_params())
        assert float(score) == np.float32(best_score)
        np.testing.assert_array_equal(flat(model), best_model)
    assert 0 < improved < 12, "the test must see both improving and non-improving generations"


def test_budget_is_exact_and_the_es_improves(case):
    """passes = S + P * steps, steps = (F - S) // P; one generation per step; the
    logged best training score never drops and is the returned model's."""
    algorithm, params = case
    pop = algorithm.population_size
    forward_passes = 2 + pop * 15 + 3  # 3 passes left over: not spent
    result = mj.run(algorithm, P.KEYS[:2], P.score_fn, P.TRAIN, forward_passes, params=params, seed_fn=P.seed_fn,
                    log_every=2, progress=False)
    np.testing.assert_array_equal(result.passes, 2 + pop * np.arange(16))  # the seeds, then every generation
    np.testing.assert_array_equal(np.asarray(result.state.generation_counter), [15, 15])
    train = result.train_score
    assert np.all(np.diff(train, axis=1) >= 0), "best-so-far never drops"
    assert np.all(train[:, -1] > train[:, 0]), "the ES beats its seeds"
    for r in range(2):
        best = jax.tree.map(lambda x: x[r], result.best_models)
        np.testing.assert_allclose(float(P.score_fn(best, P.TRAIN).mean()), train[r, -1], atol=1e-6)
    # the first point is the seeds' best
    seed_models = P.seed_fn(jax.random.split(P.KEYS[0])[0])
    np.testing.assert_allclose(train[0, 0], np.asarray(scores_of(seed_models)).mean(1).max(), atol=1e-6)


def test_validation():
    from evosax.algorithms import CMA_ES

    with pytest.raises(ValueError, match="population_size"):
        mj.EvosaxES.for_model(CMA_ES, TEMPLATE, population_size=1)
    with pytest.raises(ValueError, match="template"):
        make_method("cma-es", P.SETTINGS.__class__())
    algorithm = mj.EvosaxES.for_model(CMA_ES, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), TEMPLATE),
                                      population_size=4)
    assert algorithm == CASES["cma-es"][0] and hash(algorithm) == hash(CASES["cma-es"][0])
