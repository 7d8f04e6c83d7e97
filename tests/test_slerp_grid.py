"""The slerp-grid baseline (m2n2_jax.SlerpGrid: brute force over one slerp ratio) against a NumPy loop over the grid."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import problems as P
import pytest
from jax.flatten_util import ravel_pytree

import m2n2_jax as mj

A, B = P.init_model(jax.random.key(21)), P.init_model(jax.random.key(22))
GRID = mj.SlerpGrid(num_ratios=60)  # = make_method("slerp-grid", problems.SETTINGS)


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0], np.float64)


UNRAVEL = ravel_pytree(A)[1]


def np_slerp(a, b, w, eps=1e-6):
    cos = np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)
    omega = np.arccos(cos)
    if np.sin(omega) < eps:
        return (1 - w) * a + w * b
    return (np.sin((1 - w) * omega) * a + np.sin(w * omega) * b) / np.sin(omega)


def np_search(a, b, score, num_ratios, steps=None):
    """NumPy reference: mean score of linspace(0, 1, n) (the ends are the seeds), over
    the first `steps` interior ratios; the best ratio is the first argmax (ties -> the
    smallest ratio). Returns (ratios, means, best index)."""
    ratios = np.linspace(0, 1, num_ratios)
    steps = num_ratios - 2 if steps is None else steps
    searched = [0, num_ratios - 1] + list(range(1, steps + 1))
    means = np.full(num_ratios, -np.inf)
    for i in searched:
        model = a if i == 0 else b if i == num_ratios - 1 else np_slerp(flat(a), flat(b), ratios[i])
        means[i] = score(model)
    return ratios, means, int(np.argmax(means))


def run(grid, seeds, score_fn, data, passes):
    return mj.run(grid, jax.random.key(0), score_fn, data, passes, seed_models=seeds, log_every=10,
                  steps_per_call=10, progress=False)


def accuracy(model):
    """Mean training accuracy of a model or of a NumPy flat vector (float32)."""
    if isinstance(model, np.ndarray):
        model = UNRAVEL(jnp.asarray(model, jnp.float32))
    return float(P.score_fn(model, P.TRAIN).mean())


@pytest.mark.parametrize("passes", [60, 32])
def test_the_grid_search_equals_a_numpy_loop(passes):
    """Budget n searches exactly linspace(0, 1, n) (S = 2 seeds + n - 2 interior
    ratios, one pass each); a smaller budget the first interior ratios."""
    result = run(GRID, [A, B], P.score_fn, P.TRAIN, passes)
    steps = passes - 2
    ratios, means, best = np_search(A, B, accuracy, 60, steps)
    state = result.state
    assert int(state.step[0]) == steps
    np.testing.assert_array_equal(result.passes, 2 + np.array(sorted({*range(8, steps + 1, 10), steps})))
    assert float(state.best_ratio[0]) == np.float32(ratios[best])
    assert float(state.best_score[0]) == np.float32(means[best])
    assert result.final_train_score[0] == np.float32(means[best])
    assert (means == means[best]).sum() > 1, "ties must occur, so that the smallest-ratio rule is exercised"
    np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[0], result.best_models)),
                               np_slerp(flat(A), flat(B), ratios[best]), rtol=1e-5, atol=1e-6)


def closeness(model, data):
    """Per-datapoint score exp(-scale_j ||theta - target_j||^2) in (0, 1]: the best
    model is the target (scale 0: every model scores 1, all ratios tie)."""
    targets, scales = data
    theta = ravel_pytree(model)[0]
    return jnp.exp(-scales * jnp.sum((theta[None] - targets) ** 2, axis=1))


def target_data(target, scale):
    return jnp.stack([ravel_pytree(target)[0]] * 2), jnp.full((2,), scale, jnp.float32)


@pytest.mark.parametrize("target, best", [(B, B), (A, A), (None, A)], ids=["b-best", "a-best", "all-tie"])
def test_the_ends_are_the_seeds_bit_for_bit(target, best):
    """When a seed wins (or everything ties: the smallest ratio, 0, wins), best() returns
    that seed itself, not a slerp that rounds near it."""
    data = target_data(A if target is None else target, 0.0 if target is None else 50.0)
    result = run(mj.SlerpGrid(num_ratios=12), [A, B], closeness, data, 12)
    expected_ratio = 1.0 if best is B else 0.0
    assert float(result.state.best_ratio[0]) == expected_ratio
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[0], result.best_models), best)
    score = lambda m: float(np.mean(np.exp(-np.asarray(data[1], np.float64) *
                                           np.sum((flat(m) - np.asarray(data[0], np.float64)) ** 2, axis=1))))
    ratios, means, i = np_search(A, B, score, 12)
    assert ratios[i] == expected_ratio
    np.testing.assert_allclose(float(result.state.best_score[0]), means[i], rtol=1e-6)
    if target is None:
        assert np.all(means == 1.0)
    else:  # the interior never matches the seed itself (the slerp at w = 1 - 1/11 is not the seed)
        assert means[i] == 1.0 and np.all(means[1:-1] < 1.0)


def test_ask_and_tell_walk_the_grid():
    """ask i: slerp(a, b, linspace[i]) for i = 1, 2, ...; tell keeps the best (ties: the
    earlier, smaller ratio)."""
    grid = mj.SlerpGrid(num_ratios=5)
    seeds = jax.tree.map(lambda x, y: jnp.stack([x, y]), A, B)
    state = grid.init(None, seeds, jnp.array([[0.5, 0.5], [0.5, 0.5]]), None)
    assert float(state.best_ratio) == 0.0 and float(state.best_score) == 0.5  # tie between the seeds: a
    told = []
    for i, score in zip(range(1, 4), [0.75, 0.75, 0.9]):
        children, state = grid.ask(None, state, None)
        np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[0], children)),
                                   np_slerp(flat(A), flat(B), np.linspace(0, 1, 5)[i]), rtol=1e-5, atol=1e-6)
        state = grid.tell(None, state, children, jnp.full((1, 2), score), None)
        told.append((float(state.best_ratio), float(state.best_score)))
    assert told == [(0.25, 0.75), (0.25, 0.75), (0.75, np.float32(0.9))]
    model, score = grid.best(state, None)
    np.testing.assert_allclose(flat(model), np_slerp(flat(A), flat(B), 0.75), rtol=1e-5, atol=1e-6)
    # b wins over a at init
    state = grid.init(None, seeds, jnp.array([[0.5, 0.5], [0.5, 1.0]]), None)
    assert float(state.best_ratio) == 1.0 and float(state.best_score) == 0.75


def test_validation():
    with pytest.raises(ValueError, match="num_ratios"):
        mj.SlerpGrid(num_ratios=1)
    seeds = jax.tree.map(lambda x: jnp.stack([x] * 3), A)
    with pytest.raises(ValueError, match="exactly 2"):
        GRID.init(None, seeds, jnp.zeros((3, 4)), None)
    assert GRID.default_params() is None
