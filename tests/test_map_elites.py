"""MAP-Elites (m2n2_jax.MapElites): cells, the elite rule and parents, against NumPy."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import problems as P
import pytest
from jax.flatten_util import ravel_pytree

import m2n2_jax as mj
from m2n2_jax import archive as archive_lib
from m2n2_jax.algorithms import map_elites as me
from m2n2_jax.selection import sample

LABELS = np.array([0, 0, 1, 1])  # datapoints 0, 1 labelled 0; 2, 3 labelled 1
W = me.label_descriptor(LABELS)
ALGO = mj.MapElites(bins=2, mutation=False)
PARAMS = ALGO.default_params().replace(descriptor=W)


def models(n, seed=0):
    return jax.vmap(P.init_model)(jax.random.split(jax.random.key(seed), n))


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def np_cell(descriptor, bins):
    """floor(descriptor * bins) per axis, in float32 like the descriptors themselves."""
    b = np.array((bins, bins) if np.isscalar(bins) else bins)
    ij = np.clip(np.floor(np.asarray(descriptor, np.float32) * b.astype(np.float32)).astype(int), 0, b - 1)
    return int(ij[0] * b[1] + ij[1])


@functools.partial(jax.jit, static_argnums=0)
def init(algorithm, seeds, scores, params):
    return algorithm.init(jax.random.key(0), seeds, scores, params)


@functools.partial(jax.jit, static_argnums=0)
def tell(algorithm, state, children, scores, params):
    return algorithm.tell(jax.random.key(0), state, children, scores, params)


@functools.partial(jax.jit, static_argnums=0)
def ask(algorithm, key, state, params):
    return algorithm.ask(key, state, params)


def one(model):
    return jax.tree.map(lambda x: x[None], model)


def test_cell_matches_numpy(rng):
    assert int(me.cell(jnp.array([0.0, 0.0]), 10)) == 0
    assert int(me.cell(jnp.array([1.0, 1.0]), 10)) == 99  # 1.0 falls in the last bin
    assert int(me.cell(jnp.array([0.35, 0.71]), 10)) == 37
    for bins in (1, 2, 4, 10):
        d = rng.uniform(size=(200, 2)).astype(np.float32)
        d[:10] = np.round(d[:10] * bins) / bins  # bin edges
        got = jax.vmap(lambda x: me.cell(x, bins))(jnp.asarray(d))
        np.testing.assert_array_equal(got, [np_cell(x, bins) for x in d])


def test_rectangular_grid_cells_match_numpy(rng):
    """A 3 x 5 grid: axis 0 has 3 bins, axis 1 has 5 (a transposed grid would differ)."""
    assert int(me.cell(jnp.array([0.99, 0.0]), (3, 5))) == 10 and int(me.cell(jnp.array([0.0, 0.99]), (3, 5))) == 4
    d = rng.uniform(size=(300, 2)).astype(np.float32)
    got = jax.vmap(lambda x: me.cell(x, (3, 5)))(jnp.asarray(d))
    np.testing.assert_array_equal(got, [np_cell(x, (3, 5)) for x in d])
    assert set(np.asarray(got)) == set(range(15))
    algorithm = mj.MapElites(bins=(3, 5))
    state = init(algorithm, models(2), jnp.zeros((2, 4)), PARAMS)
    assert state.scores.shape[0] == 15


def test_label_descriptor_averages_each_label(rng):
    labels = rng.integers(0, 3, size=30)
    w = np.asarray(me.label_descriptor(labels, 3))
    scores = rng.uniform(size=30)
    np.testing.assert_allclose(w @ scores, [scores[labels == lab].mean() for lab in range(3)], rtol=1e-5)
    np.testing.assert_allclose(me.label_descriptor(np.array([0, 1, 1, 0])) @ jnp.array([1.0, 1, 0, 0]), [0.5, 0.5])
    # a label no datapoint has gives a zero row, not NaN
    np.testing.assert_array_equal(me.label_descriptor(np.array([0, 0]), 2)[1], [0, 0])


def test_init_places_each_seed_in_its_cell():
    seeds = models(2)
    state = init(ALGO, seeds, jnp.array([[1, 0, 0, 0], [0, 0, 1, 1.0]]), PARAMS)
    # descriptors (0.5, 0) -> cell 2, (0, 1) -> cell 1
    assert np_cell([0.5, 0], 2) == 2 and np_cell([0, 1], 2) == 1
    np.testing.assert_array_equal(state.occupied, [False, True, True, False])
    np.testing.assert_array_equal(flat(archive_lib.get(state, 2)), flat(jax.tree.map(lambda x: x[0], seeds)))
    np.testing.assert_array_equal(flat(archive_lib.get(state, 1)), flat(jax.tree.map(lambda x: x[1], seeds)))
    assert not flat(archive_lib.get(state, 0)).any() and not np.asarray(state.scores[0]).any()


def test_an_occupied_cell_is_replaced_only_by_a_strictly_better_child():
    seeds = models(2)
    state = init(ALGO, seeds, jnp.array([[1, 0, 0, 0], [0, 0, 1, 1.0]]), PARAMS)
    child = P.init_model(jax.random.key(7))
    # (0.5, 0.5) -> cell 3, empty: taken even with a low quality
    scores = jnp.array([1, 0, 1, 0.0])
    assert np_cell(W @ scores, 2) == 3
    new = tell(ALGO, state, one(child), scores[None], PARAMS)
    assert bool(new.occupied[3]) and np.array_equal(flat(archive_lib.get(new, 3)), flat(child))
    # cell 2 holds quality 0.25; a child of descriptor (1, 0) -> cell 2, quality 0.5: replaces it
    better = jnp.array([1, 1, 0, 0.0])
    assert np_cell(W @ better, 2) == 2 and better.mean() > state.scores[2].mean()
    new = tell(ALGO, state, one(child), better[None], PARAMS)
    np.testing.assert_array_equal(flat(archive_lib.get(new, 2)), flat(child))
    np.testing.assert_array_equal(new.scores[2], better)
    chex.assert_trees_all_equal(archive_lib.get(new, 1), archive_lib.get(state, 1))
    np.testing.assert_array_equal(new.occupied, state.occupied)
    # equal quality (0.25) in the same cell: rejected, the archive is unchanged
    equal = jnp.array([0, 1, 0, 0.0])
    assert np_cell(W @ equal, 2) == 2 and equal.mean() == state.scores[2].mean()
    chex.assert_trees_all_equal(tell(ALGO, state, one(child), equal[None], PARAMS), state)
    # worse quality in an occupied cell (cell 1 holds 0.5; (0, 0.5) -> cell 1, quality 0.25): rejected
    worse = jnp.array([0, 0, 0, 1.0])
    assert np_cell(W @ worse, 2) == 1 and worse.mean() < state.scores[1].mean()
    chex.assert_trees_all_equal(tell(ALGO, state, one(child), worse[None], PARAMS), state)


def np_tell(cells, scores, descriptor, bins):
    """NumPy reference of the elite rule: cells maps index -> (child id, scores)."""
    for i, s in enumerate(scores):
        c = np_cell(descriptor @ s, bins)
        if c not in cells or s.mean() > cells[c][1].mean():
            cells[c] = (i, s)
    return cells


@pytest.mark.parametrize("seed", range(3))
def test_a_stream_of_children_matches_numpy(seed):
    """Seeds and 40 children with random scores on the problem's 90 datapoints (parity
    descriptor, 4 x 4 grid): the final grid equals the NumPy replay."""
    rng = np.random.default_rng(seed)
    algorithm = mj.MapElites(bins=4, mutation=False)
    params = algorithm.default_params().replace(descriptor=P.SETTINGS.map_elites.descriptor)
    # per-model success rates spread the descriptors over the grid
    rate = rng.uniform(size=(80, 2))[:, P.TRAIN[1] % 2]
    scores = (rng.uniform(size=(80, 90)) < rate).astype(np.float32)
    # no descriptor on an interior bin edge (1/4, 1/2, 3/4), where float32 rounding decides the cell
    descriptors = scores @ np.asarray(P.SETTINGS.map_elites.descriptor, np.float64).T
    inner = np.abs(descriptors * 4 - np.round(descriptors * 4)) + (descriptors == 0) + (descriptors == 1)
    scores = scores[inner.min(1) > 1e-4][:43]
    everyone = models(43, seed)
    state = init(algorithm, jax.tree.map(lambda x: x[:3], everyone), jnp.asarray(scores[:3]), params)
    for i in range(3, 43):  # one child per tell: one small compiled program
        state = tell(algorithm, state, jax.tree.map(lambda x: x[i : i + 1], everyone), jnp.asarray(scores[i : i + 1]),
                     params)
    cells = np_tell({}, scores, np.asarray(P.SETTINGS.map_elites.descriptor, np.float64), 4)
    np.testing.assert_array_equal(np.flatnonzero(state.occupied), sorted(cells))
    for c, (i, s) in cells.items():
        np.testing.assert_array_equal(state.scores[c], s)
        np.testing.assert_array_equal(flat(archive_lib.get(state, c)), flat(jax.tree.map(lambda x: x[i], everyone)))
    # the stream did replace occupied cells (not only fill empty ones)
    first = {}
    for i, s in enumerate(scores):
        first.setdefault(np_cell(np.asarray(P.SETTINGS.map_elites.descriptor, np.float64) @ s, 4), i)
    replaced_occupied = sum(cells[c][0] != first[c] for c in cells)
    assert replaced_occupied >= 3 and len(cells) >= 5


def test_ask_is_the_split_point_slerp_of_quality_drawn_parents():
    """Against NumPy with the library's draws (key layout of MapElites.ask): both
    parents ~ mean score over filled cells, w ~ U(0, 1), k ~ U{0..D-1}, noise."""
    algorithm = mj.MapElites(bins=2)
    params = algorithm.default_params().replace(descriptor=W, mutation_std=jnp.float32(0.05))
    seeds = models(3, seed=4)
    scores = jnp.array([[1, 0, 0, 0], [0, 0, 1, 1.0], [1, 1, 1, 0]])
    state = init(algorithm, seeds, scores, params)
    x = np.stack([flat(archive_lib.get(state, i)) for i in range(4)])
    q = np.where(state.occupied, np.asarray(state.scores).mean(1), 0)
    probs = q / q.sum()
    d = x.shape[1]

    @jax.jit
    def draws(key):
        k_a, k_b, k_ratio, k_split, k_noise = jax.random.split(key, 5)
        p = jnp.asarray(probs, jnp.float32)
        return (sample(k_a, p), sample(k_b, p), jax.random.uniform(k_ratio), jax.random.randint(k_split, (), 0, d),
                jax.random.normal(k_noise, (d,)))

    for seed in range(6):
        key = jax.random.key(seed)
        children, same = ask(algorithm, key, state, params)
        chex.assert_trees_all_equal(same, state.replace(asked=state.asked + 1))
        a, b, w, k, noise = draws(key)
        a, b, w, k = int(a), int(b), float(w), int(k)
        assert state.occupied[a] and state.occupied[b]
        u, v = x[a], x[b]
        wd = np.where(np.arange(d) < k, w, 1 - w)
        omega = np.arccos(np.clip(u @ v / np.linalg.norm(u) / np.linalg.norm(v), -1, 1))
        merged = (np.sin((1 - wd) * omega) * u + np.sin(wd * omega) * v) / np.sin(omega) if a != b else u
        expected = merged + 0.05 * np.asarray(noise, np.float64)
        np.testing.assert_allclose(flat(jax.tree.map(lambda y: y[0], children)), expected, atol=2e-6)


def test_parents_come_from_filled_cells():
    """One filled cell among four: every child (no mutation) is that cell's model."""
    seeds = models(2, seed=3)
    state = init(ALGO, seeds, jnp.array([[1, 0, 0, 0.0], [1, 0, 0, 0.0]]), PARAMS)
    np.testing.assert_array_equal(state.occupied, [False, False, True, False])
    for seed in range(5):
        child, _ = ask(ALGO, jax.random.key(seed), state, PARAMS)
        np.testing.assert_allclose(flat(jax.tree.map(lambda y: y[0], child)), flat(archive_lib.get(state, 2)),
                                   atol=1e-6)


def test_best_is_the_top_quality_cell():
    state = init(ALGO, models(3), jnp.array([[1, 0, 0, 0], [0, 0, 1, 1.0], [1, 1, 1, 0]]), PARAMS)
    model, score = ALGO.best(state, PARAMS)
    q = np.where(state.occupied, np.asarray(state.scores).mean(1), -np.inf)
    assert float(score) == q.max() == 0.75
    chex.assert_trees_all_equal(model, archive_lib.get(state, int(np.argmax(q))))


def test_validation():
    for bins in (0, (2,), (2, 0), (2.0, 3)):
        with pytest.raises(ValueError, match="bins"):
            mj.MapElites(bins=bins)
    seeds, scores = models(2), jnp.zeros((2, 4))
    with pytest.raises(ValueError, match="descriptor"):
        ALGO.init(jax.random.key(0), seeds, scores, ALGO.default_params())
    with pytest.raises(ValueError, match="shape"):
        ALGO.init(jax.random.key(0), seeds, scores, PARAMS.replace(descriptor=jnp.zeros((2, 5))))
