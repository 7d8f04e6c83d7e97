import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m2n2_jax as mj
from conftest import np_fitness
from m2n2_jax import archive as archive_lib


def make_state(rng, n=6, m=20, filled=6, d=5):
    config = mj.Config(archive_size=n)
    models = {"w": jnp.asarray(rng.normal(size=(filled, d)), jnp.float32)}
    scores = jnp.asarray((rng.uniform(size=(filled, m)) > 0.5), jnp.float32)
    return mj.init(jax.random.key(0), models, scores, config), config


def np_tell(scores, occupied, child_scores, alpha=1.0):
    """NumPy reference of SPEC step 4: index that leaves (N = the child)."""
    all_scores = np.concatenate([scores, child_scores[None]])
    _, f = np_fitness(all_scores, alpha)
    f = np.where(np.concatenate([occupied, [True]]), f, -np.inf)
    return int(np.argmin(f))


@pytest.mark.parametrize("seed", range(5))
def test_tell_drops_the_worst_like_numpy(transform, seed):
    rng = np.random.default_rng(seed)
    state, config = make_state(rng)
    child = {"w": jnp.full((5,), 7.0)}
    child_scores = jnp.asarray(rng.uniform(size=20) > 0.3, jnp.float32)
    dropped = np_tell(np.asarray(state.scores), np.asarray(state.occupied), np.asarray(child_scores))
    new = transform(lambda s, c, x: mj.tell(s, c, x, config))(state, child, child_scores)
    if dropped == 6:
        chex.assert_trees_all_equal(new, state)
    else:
        np.testing.assert_array_equal(new.scores[dropped], child_scores)
        np.testing.assert_array_equal(new.params["w"][dropped], child["w"])
        others = np.arange(6) != dropped
        np.testing.assert_array_equal(new.scores[others], state.scores[others])


def test_worst_model_leaves_and_useless_child_is_rejected():
    config = mj.Config(archive_size=3)
    scores = jnp.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]], jnp.float32)
    state = mj.init(None, {"w": jnp.arange(3.0)[:, None]}, scores, config)
    # A child that solves datapoint 3 alone collects a whole resource: model 2
    # (only a share of datapoint 1) leaves.
    new = mj.tell(state, {"w": jnp.array([9.0])}, jnp.array([0, 0, 0, 1.0]), config)
    np.testing.assert_array_equal(new.params["w"][:, 0], [0, 1, 9])
    # A child that solves nothing has f = 0 and is rejected.
    same = mj.tell(state, {"w": jnp.array([9.0])}, jnp.zeros(4), config)
    chex.assert_trees_all_equal(same, state)


def test_ties_drop_the_first_index():
    config = mj.Config(archive_size=2)
    scores = jnp.array([[1, 0], [0, 1]], jnp.float32)
    state = mj.init(None, {"w": jnp.array([[0.0], [1.0]])}, scores, config)
    new = mj.tell(state, {"w": jnp.array([5.0])}, jnp.array([1.0, 0.0]), config)
    # f = [0.5, 1, 0.5]: tie between slot 0 and the child; the first index leaves.
    np.testing.assert_array_equal(new.params["w"][:, 0], [5, 1])


def test_empty_slots_fill_first_and_are_never_parents(rng):
    state, config = make_state(rng, n=8, filled=2)
    assert list(np.asarray(state.occupied)) == [True, True] + [False] * 6
    child = {"w": jnp.zeros(5)}
    new = mj.tell(state, child, jnp.zeros(20), config)  # even a useless child fills an empty slot
    assert bool(new.occupied[2])
    for i in range(50):
        k = jax.random.key(i)
        a, b = mj.sample_parents(k, *mj.resource_fitness(state.scores), state.occupied)
        assert int(a) < 2 and int(b) < 2


def test_init_rejects_nothing_and_best_is_top_train_score(rng):
    state, _ = make_state(rng)
    means = np.asarray(state.scores).mean(1)
    assert int(mj.best(state)) == int(np.argmax(means))


def test_ask_is_deterministic_and_respects_switches(rng):
    state, config = make_state(rng)
    c1 = mj.ask(jax.random.key(5), state, config)
    chex.assert_trees_all_equal(c1, mj.ask(jax.random.key(5), state, config))
    chex.assert_trees_all_equal_shapes_and_dtypes(c1, archive_lib.get(state, 0))
    # No crossover and no mutation: the child is a copy of an archive model.
    copy = mj.ask(jax.random.key(5), state, mj.Config(archive_size=6, crossover=False, mutation_std=0.0))
    assert any(np.array_equal(copy["w"], state.params["w"][i]) for i in range(6))


def test_config_validation():
    with pytest.raises(ValueError, match="archive_size"):
        mj.Config(archive_size=1)
    with pytest.raises(ValueError, match="alpha"):
        mj.Config(alpha=-0.5)
    with pytest.raises(ValueError, match="mutation_std"):
        mj.Config(mutation_std=-1.0)
