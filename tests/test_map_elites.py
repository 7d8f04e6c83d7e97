import jax
import jax.numpy as jnp
import numpy as np

from m2n2_jax.baselines import map_elites as me


def test_cell_and_group_means():
    assert int(me.cell(jnp.array([0.0, 0.0]), 10)) == 0
    assert int(me.cell(jnp.array([1.0, 1.0]), 10)) == 99
    assert int(me.cell(jnp.array([0.35, 0.71]), 10)) == 37
    fn = me.group_means(np.array([0, 1, 1, 0]))
    np.testing.assert_allclose(fn(jnp.array([1.0, 1.0, 0.0, 0.0])), [0.5, 0.5])


def test_child_takes_cell_only_if_empty_or_strictly_better():
    config = me.MapElitesConfig(me.group_means(np.array([0, 0, 1, 1])), bins=2)
    seeds = {"w": jnp.array([[1.0], [2.0]])}
    state = me.init(None, seeds, jnp.array([[1, 0, 0, 0], [0, 0, 1, 1.0]]), config)
    # descriptors (0.5, 0) -> cell 2, (0, 1) -> cell 1
    assert list(np.asarray(state.occupied)) == [False, True, True, False]
    worse = me.tell(state, {"w": jnp.array([3.0])}, jnp.array([0, 1, 0, 0.0]), config)  # cell 2, equal quality
    assert float(worse.params["w"][2, 0]) == 1.0
    better = me.tell(state, {"w": jnp.array([4.0])}, jnp.array([1, 0, 1, 0.0]), config)  # (0.5, 0.5) -> cell 3
    assert float(better.params["w"][3, 0]) == 4.0 and bool(better.occupied[3])


def test_parents_come_from_filled_cells():
    config = me.MapElitesConfig(me.group_means(np.array([0, 1])), bins=3, mutation_std=0.0)
    seeds = {"w": jnp.array([[1.0, 0.0], [1.0, 0.0]])}
    state = me.init(None, seeds, jnp.array([[1, 0.0], [1, 0.0]]), config)
    child = me.ask(jax.random.key(0), state, config)
    np.testing.assert_allclose(child["w"], [1.0, 0.0], atol=1e-6)
