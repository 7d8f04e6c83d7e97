"""MergeES: CMA-ES over per-group merge coefficients, each operator's genome -> model
against NumPy, the seeds as the best so far, and validation. (Runs, determinism, jit,
vmap and checkpoints: the registry's contract test.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import problems as P
import pytest
from evosax.algorithms import CMA_ES

import m2n2_jax as mj
from m2n2_jax.tasks.digits import layer_of

TEMPLATE = P.init_model(jax.random.key(0))
SIZES = [8 * 16, 16, 16 * 4, 4]  # leaves 0/kernel, 0/bias, 1/kernel, 1/bias; layers 0 and 1


def leaves64(model):
    return [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(model)]


def np_slerp(a, b, w):
    omega = np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))
    return (np.sin((1 - w) * omega) * a + np.sin(w * omega) * b) / np.sin(omega)


def seeds(n):
    return P.seed_fn(jax.random.key(5), n)


@functools.partial(jax.jit, static_argnums=0)
def merge(algorithm, state, genome):
    return algorithm.merge(state, genome, algorithm.default_params())


def make(operator, num_models=1, **kwargs):
    algorithm = mj.MergeES.for_model(CMA_ES, operator, TEMPLATE, layer_of, num_models, population_size=4, **kwargs)
    models = seeds(algorithm.num_seeds)
    scores = jnp.asarray(np.random.default_rng(0).uniform(size=(algorithm.num_seeds, 90)) > 0.5, jnp.float32)
    state = algorithm.init(jax.random.key(0), models, scores, algorithm.default_params())
    return algorithm, state, models, scores


def test_slerp_genome_is_a_per_layer_slerp_like_numpy():
    """Genome (1, 2): layer 0 (its kernel and bias, one vector) at ratio 0.2 with its own
    angle, layer 1 at 0.9; ratios outside [0, 1] are clipped."""
    algorithm, state, models, _ = make("slerp")
    assert algorithm.leaf_groups == (0, 0, 1, 1) and algorithm.num_seeds == 2
    a, b = (leaves64(jax.tree.map(lambda x: x[i], models)) for i in (0, 1))
    for genome, (w0, w1) in [([[0.2, 0.9]], (0.2, 0.9)), ([[-0.5, 1.7]], (0.0, 1.0))]:
        child = np.concatenate(leaves64(merge(algorithm, state, jnp.array(genome))))
        layer0 = np_slerp(np.concatenate(a[:2]), np.concatenate(b[:2]), w0)
        layer1 = np_slerp(np.concatenate(a[2:]), np.concatenate(b[2:]), w1)
        np.testing.assert_allclose(child, np.concatenate([layer0, layer1]), rtol=1e-5, atol=1e-6)


def test_task_arithmetic_genome_weighs_each_models_task_vector_per_layer():
    """Base + sum_k w[k, g] (M_k - base) on the leaves of layer g, weights clipped to
    [0, max_weight]."""
    algorithm, state, models, _ = make("task_arithmetic", num_models=2, max_weight=1.5)
    base, m1, m2 = (leaves64(jax.tree.map(lambda x: x[i], models)) for i in range(3))
    genome = np.array([[0.3, 2.0], [-1.0, 0.6]])
    weights = np.clip(genome, 0, 1.5)
    child = leaves64(merge(algorithm, state, jnp.asarray(genome, jnp.float32)))
    for leaf, g in enumerate(algorithm.leaf_groups):
        expected = base[leaf] + weights[0, g] * (m1[leaf] - base[leaf]) + weights[1, g] * (m2[leaf] - base[leaf])
        np.testing.assert_allclose(child[leaf], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("operator", ["ties", "dare"])
def test_sparse_operators_merge_each_layer_with_merge_ops(operator):
    """TIES / DARE per layer: the same as calling merge_ops on that layer's leaves with
    the layer's weights (mergekit conventions); DARE's masks are the run's, fixed: the
    same genome gives the same model."""
    algorithm, state, models, _ = make(operator, num_models=2)
    genome = jnp.array([[0.3, 0.8], [0.9, 0.5]])
    child = jax.tree.leaves(merge(algorithm, state, genome))
    leaves = jax.tree.leaves(models)
    for g, members in enumerate([(0, 1), (2, 3)]):
        base = [leaves[i][0] for i in members]
        ms = [[leaves[i][k] for i in members] for k in (1, 2)]
        if operator == "ties":
            ref = mj.merge_ops.ties(base, ms, genome[:, g], 0.5, convention="mergekit")
        else:
            key = jax.random.fold_in(jax.random.wrap_key_data(state.mask_key), g)
            ref = mj.merge_ops.dare(key, base, ms, genome[:, g], 0.5, rescale="l1", convention="mergekit")
        for i, r in zip(members, ref):
            np.testing.assert_allclose(child[i], r, rtol=1e-6, atol=1e-6)
    again = jax.tree.leaves(merge(algorithm, state, genome))
    for x, y in zip(child, again):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("operator,num_models", [("slerp", 1), ("task_arithmetic", 2), ("linear", 2)])
def test_the_best_seed_is_the_best_so_far(operator, num_models):
    """At init `best` is the best seed itself, with its score (seed 2 for task
    arithmetic: its genome is [0, 1] per layer; seed 1 for slerp: ratio 1)."""
    algorithm = mj.MergeES.for_model(CMA_ES, operator, TEMPLATE, layer_of, num_models, population_size=4)
    models = seeds(algorithm.num_seeds)
    scores = jnp.zeros((algorithm.num_seeds, 10)).at[-1].set(1.0)
    state = algorithm.init(jax.random.key(0), models, scores, algorithm.default_params())
    model, score = algorithm.best(state, algorithm.default_params())
    assert float(score) == 1.0
    for x, y in zip(jax.tree.leaves(model), jax.tree.leaves(jax.tree.map(lambda x: x[-1], models))):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_validation():
    with pytest.raises(ValueError, match="unknown merge operator 'avg'; choose one of linear, slerp, "
                                         "task_arithmetic, ties, dare"):
        mj.MergeES(CMA_ES, "avg", (0,))
    with pytest.raises(ValueError, match="num_models"):
        mj.MergeES(CMA_ES, "slerp", (0,), num_models=2)
    with pytest.raises(ValueError, match="max_weight must be <= 1"):
        mj.MergeES(CMA_ES, "slerp", (0,), max_weight=1.5)
    algorithm = mj.MergeES.for_model(CMA_ES, "ties", TEMPLATE, None, 2)
    assert algorithm.leaf_groups == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="the base and 2 models: 3 seeds, got 2"):
        algorithm.init(jax.random.key(0), seeds(2), jnp.zeros((2, 5)), algorithm.default_params())


@pytest.mark.parametrize("operator", list(mj.merge_ops.OPERATORS))
def test_every_operator_of_the_registry_merges_each_layer_as_its_registry_function(operator):
    """MergeES(operator) merges each layer with merge_ops.OPERATORS[operator] (mergekit's
    conventions), for every name there: an operator never falls back to another one (a
    name without its own branch once silently ran DARE)."""
    num_models = 1 if operator == "slerp" else 2
    algorithm, state, models, _ = make(operator, num_models=num_models)
    genome = jnp.array([[0.3, 0.8], [0.9, 0.5]])[:num_models]
    child = jax.tree.leaves(merge(algorithm, state, genome))
    leaves = jax.tree.leaves(models)
    for g, members in enumerate([(0, 1), (2, 3)]):
        base = [leaves[i][0] for i in members]
        ms = [[leaves[i][k] for i in members] for k in range(1, num_models + 1)]
        key = jax.random.fold_in(jax.random.wrap_key_data(state.mask_key), g)
        ref = mj.merge_ops.OPERATORS[operator](key, base, ms, genome[:, g], density=0.5, convention="mergekit")
        for i, r in zip(members, ref):
            np.testing.assert_allclose(child[i], r, rtol=1e-6, atol=1e-6)


def test_a_converged_es_keeps_sigma_at_the_floor_instead_of_underflowing():
    """A 2-coefficient CMA-ES converges and sigma shrinks geometrically; without a floor
    a child of generation 336 is NaN on this tiny problem, of generation ~330 on the
    digits specialists (measured, docs/real_models.md). Tell lifts sigma = 1e-7 to the
    floor, which min_std = 0 would not."""
    algorithm, state, _, _ = make("slerp")
    params = algorithm.default_params()
    small = state.replace(es=state.es.replace(std=jnp.float32(1e-7)))
    children, small = algorithm.ask(jax.random.key(1), small, params)
    for floor, expected in ((params.min_std, 1e-6), (jnp.float32(0.0), None)):
        told = algorithm.tell(jax.random.key(2), small, children, jnp.zeros((4, 90)), params.replace(min_std=floor))
        if expected:
            assert float(told.es.std) == pytest.approx(expected)
        else:
            assert float(told.es.std) < 1e-6
