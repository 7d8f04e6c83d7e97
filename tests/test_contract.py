"""The contract of base.Algorithm, checked for every registered algorithm.

Parametrised over `m2n2_jax.algorithms.ALGORITHMS` (like evosax's tests over its
algorithms), each run as its `example()`, so a new module plus one registry line is
tested for free: shapes, determinism, jit, lax.scan, vmap over keys, finiteness, empty
archive slots never being parents, `best`, `check_contract`, and a checkpointed run
that resumes bit-identical. No count, no per-class branches.
"""

import functools
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import problems as P
import pytest

import m2n2_jax as mj
from m2n2_jax.algorithms import ALGORITHMS

TEMPLATE = P.init_model(jax.random.key(0))
CASES = {name: cls.example(TEMPLATE, P.TRAIN[1].shape[0]) for name, cls in ALGORITHMS.items()}
KEYS = P.KEYS[:2]
STEPS = 6  # steps of the shared runs


def num_seeds(algorithm):
    """The seeds a run gets: what the algorithm takes, else two."""
    return algorithm.num_seeds or 2


@functools.cache
def seed_fn(n):
    """One seed function per count: an equal static argument, so runs share the compiled seeding."""
    return functools.partial(P.seed_fn, n=n)


def run(algorithm, params, directory=None, resume=False, steps=STEPS):
    """`steps` steps of two runs from their own random seeds, one step per call,
    checkpointed every two steps in `directory`: every call shares one set of
    compiled programs per method."""
    s, pop = num_seeds(algorithm), algorithm.population_size
    checkpoint = None if directory is None else mj.Checkpointing(str(directory), 2 * pop, resume=resume, keep=10)
    return mj.run(algorithm, KEYS, P.score_fn, P.TRAIN, s + steps * pop, params=params, log_every=2 * pop,
                  steps_per_call=1, checkpoint=checkpoint, progress=False,
                  seed_fn=seed_fn(s))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (RunResult, its checkpoint directory), computed once per method."""
    cache = {}

    def get(name):
        if name not in cache:
            directory = tmp_path_factory.mktemp(name) / "full"
            cache[name] = run(*CASES[name], directory), directory
        return cache[name]

    return get


def row(tree, i):
    """Run i of a stacked pytree, indexed on the host (no tiny program compiled per leaf)."""
    return jax.tree.map(lambda x: np.asarray(x)[i], tree)


def float_leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


@pytest.fixture(params=sorted(ALGORITHMS))
def name(request):
    return request.param


def test_example_is_a_hashable_algorithm_of_its_class(name):
    algorithm, _ = CASES[name]
    assert type(algorithm) is ALGORITHMS[name] and isinstance(algorithm, mj.Algorithm)
    assert hash(algorithm) == hash(ALGORITHMS[name].example(TEMPLATE, P.TRAIN[1].shape[0])[0])  # a static jit argument
    assert isinstance(algorithm.population_size, int) and algorithm.population_size >= 1
    assert algorithm.num_seeds is None or (isinstance(algorithm.num_seeds, int) and algorithm.num_seeds >= 1)


def test_ask_returns_population_stacked_and_tell_keeps_the_state_shape(name, runs):
    algorithm, params = CASES[name]
    template = P.init_model(jax.random.key(0))
    state = row(runs(name)[0].state, 0)
    children, asked = jax.eval_shape(lambda s: algorithm.ask(jax.random.key(1), s, params), state)
    pop = algorithm.population_size
    assert jax.tree.structure(children) == jax.tree.structure(template)
    for child, leaf in zip(jax.tree.leaves(children), jax.tree.leaves(template)):
        assert child.shape == (pop,) + leaf.shape and child.dtype == leaf.dtype
    chex.assert_trees_all_equal_shapes_and_dtypes(asked, state)
    scores = jax.ShapeDtypeStruct((pop, P.TRAIN[1].shape[0]), jnp.float32)
    told = jax.eval_shape(lambda s, c, x: algorithm.tell(jax.random.key(2), s, c, x, params), state, children, scores)
    chex.assert_trees_all_equal_shapes_and_dtypes(told, state)  # so the state is a lax.scan carry
    s = num_seeds(algorithm)
    seeds = jax.tree.map(lambda x: jax.ShapeDtypeStruct((s,) + x.shape, x.dtype), template)
    seed_scores = jax.ShapeDtypeStruct((s, 90), jnp.float32)
    init = jax.eval_shape(lambda m, x: algorithm.init(jax.random.key(0), m, x, params), seeds, seed_scores)
    chex.assert_trees_all_equal_shapes_and_dtypes(init, state)


def test_same_key_gives_bit_identical_runs(name, runs):
    """Two runs of the same keys (one checkpointed, one not) are bit-identical; the two keys differ."""
    result, _ = runs(name)
    again = run(*CASES[name])
    chex.assert_trees_all_equal(again.state, result.state)
    chex.assert_trees_all_equal(again.best_models, result.best_models)
    np.testing.assert_array_equal(again.train_score, result.train_score)
    # the keys give each run its own seeds (and draws): the two runs differ
    assert any(not np.array_equal(x[0], x[1]) for x in float_leaves(result.state)), "two keys gave the same run"


@functools.partial(jax.jit, static_argnums=0)
def vmapped_step(algorithm, params, states, keys, n):
    """Step n of each run (its key fold_in(key, n), as in the runner) inside a
    lax.scan, vmapped over runs; also the children that step asked for."""

    def one(state, key):
        key = jax.random.fold_in(key, n)
        children, _ = algorithm.ask(jax.random.split(key)[0], state, params)  # what mj.step asks
        body = lambda s, _: mj.step(algorithm, P.score_fn, s, key, params, P.TRAIN)
        state, ok = jax.lax.scan(body, state, None, length=1)
        return state, ok[0], children

    return jax.vmap(one)(states, keys)


def evo_keys():
    """The runner's step key of each run: split(run key)[1]."""
    return jax.vmap(lambda k: jax.random.split(k)[1])(KEYS)


def test_jit_scan_and_vmap_over_keys_agree_with_the_runner(name, runs):
    """Step 6 of both runs, jitted, in a lax.scan, vmapped over the runs (states and
    keys), from the runner's state after 5 steps == the runner's state after 6 steps
    (lax.map over runs, one step per call); and swapping the runs swaps the rows bit
    for bit (no run sees another's key or state)."""
    algorithm, params = CASES[name]
    result, _ = runs(name)
    five = run(algorithm, params, steps=STEPS - 1)
    batched, ok, _ = vmapped_step(algorithm, params, five.state, evo_keys(), STEPS - 1)
    assert np.all(ok)
    chex.assert_trees_all_close(batched, result.state, rtol=1e-5, atol=1e-6)
    swap = lambda t: jax.tree.map(lambda x: x[::-1], t)
    swapped, _, _ = vmapped_step(algorithm, params, swap(five.state), swap(evo_keys()), STEPS - 1)
    chex.assert_trees_all_equal(swap(swapped), batched)


def test_state_stays_finite(name, runs):
    result, _ = runs(name)
    for x in float_leaves(result.state):
        assert np.all(np.isfinite(x)), "non-finite state"
    chex.assert_tree_all_finite(result.best_models)


@functools.partial(jax.jit, static_argnums=0)
def best(algorithm, state, params):
    return algorithm.best(state, params)


def test_best_returns_a_model_and_its_mean_training_score(name, runs):
    algorithm, params = CASES[name]
    result, _ = runs(name)
    template = P.init_model(jax.random.key(0))
    for i in range(2):
        model, score = best(algorithm, row(result.state, i), params)
        chex.assert_trees_all_equal_shapes_and_dtypes(model, template)
        chex.assert_trees_all_equal(model, row(result.best_models, i))
        assert score.shape == () and 0 <= float(score) <= 1
        assert float(score) == result.train_score[i, -1]
        np.testing.assert_allclose(float(P.score_fn(model, P.TRAIN).mean()), float(score), atol=1e-6)


# --- empty archive slots are never parents -------------------------------------------

V = jax.tree.map(lambda x: jnp.full_like(x, 0.5), P.init_model(jax.random.key(0)))  # every occupied slot


@pytest.mark.parametrize("scored", [False, True], ids=["all-zero-scores", "scores"])
def test_empty_archive_slots_are_never_parents(name, scored, runs):
    """The runs' archives (with empty slots) with every occupied slot set to the model V
    (0.5 everywhere), empty ones zeros: without mutation a child built from occupied
    slots only is V (sin Omega = 0: linear merge of V with V), a child with an empty
    parent is (1 - w_d) V or 0. With all-zero scores parent sampling falls back to
    uniform, which must stay over occupied slots."""
    algorithm, params = CASES[name]
    states = runs(name)[0].state
    if not isinstance(states, mj.Archive):
        pytest.skip("not an archive-based method")
    params = params.replace(mutation_std=jnp.float32(0.0))
    occupied = np.asarray(states.occupied)
    assert occupied.any(axis=1).all() and not occupied.all(axis=1).any(), "each run must have empty slots"
    assert not any(np.asarray(x)[~occupied].any() for x in jax.tree.leaves(states.models)), "empty slots are zeros"
    fill = lambda x, v: jnp.where(occupied.reshape(occupied.shape + (1,) * v.ndim), v, x)
    states = states.replace(models=jax.tree.map(fill, states.models, V))
    if not scored:
        states = states.replace(scores=jnp.zeros_like(states.scores))
    keys = jax.random.split(jax.random.key(1), (150, 2))  # 300 children, through the shared program
    children = [vmapped_step(algorithm, params, states, k, 0)[2] for k in keys]
    for i, v in enumerate(jax.tree.leaves(V)):
        c = np.stack([np.asarray(jax.tree.leaves(x)[i]) for x in children])
        err = np.abs(c - np.asarray(v)).reshape(300, -1).max(1)
        assert np.all(err < 1e-5), f"{np.sum(err >= 1e-5)} of 300 children had an empty parent"


# --- checkpoint and resume -------------------------------------------------------------


def test_resumed_run_ends_bit_identical(name, runs, tmp_path):
    """The shared run, checkpointed every two steps to the end, vs the same run resumed
    from its checkpoint after step 2 (copied alone to a fresh directory)."""
    algorithm, params = CASES[name]
    full, full_dir = runs(name)
    s, pop = num_seeds(algorithm), algorithm.population_size
    saved = sorted(int(p) for p in os.listdir(full_dir) if p.isdigit())
    assert saved == [s + 2 * pop, s + 4 * pop, s + 6 * pop], saved
    part_dir = tmp_path / "part"
    shutil.copytree(full_dir / str(s + 2 * pop), part_dir / str(s + 2 * pop))
    with pytest.raises(ValueError, match="already holds a checkpoint"):  # a fresh run does not overwrite it
        run(algorithm, params, part_dir)
    resumed = run(algorithm, params, part_dir, resume=True)
    chex.assert_trees_all_equal(resumed.state, full.state)
    chex.assert_trees_all_equal(resumed.best_models, full.best_models)
    np.testing.assert_array_equal(resumed.passes, full.passes)
    np.testing.assert_array_equal(resumed.train_score, full.train_score)
    saved = sorted(int(p) for p in os.listdir(part_dir) if p.isdigit())
    assert saved == [s + 2 * pop, s + 4 * pop, s + 6 * pop]
    # it continued from the checkpoint: the wall stamps logged up to step 2 are the saved ones
    restored = full.passes <= s + 2 * pop
    assert restored.sum() >= 1
    np.testing.assert_array_equal(resumed.log_wall_seconds[restored], full.log_wall_seconds[restored])
    assert np.all(resumed.log_wall_seconds[~restored] != full.log_wall_seconds[~restored])


def test_every_method_of_the_experiments_menu_is_a_registered_algorithm_that_keeps_the_contract():
    """The paper's menu (experiments/methods.py) builds values of registered classes; each
    passes `check_contract` (abstractly: nothing runs) with its number of seeds."""
    import dataclasses

    from experiments import methods

    settings = dataclasses.replace(P.SETTINGS, task_vectors=dataclasses.replace(P.SETTINGS.task_vectors, base=TEMPLATE))
    for method in methods.METHODS:
        algorithm, params = methods.make_method(method, settings)
        assert type(algorithm) in ALGORITHMS.values(), method
        seeds = jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_seeds(algorithm),) + x.shape, x.dtype), TEMPLATE)
        mj.check_contract(algorithm, seeds, P.TRAIN[1].shape[0], params)
