import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2n2_jax.scoring import classification_scores, evaluate, num_points


def linear_score_fn():
    return classification_scores(lambda w, x: x @ w)


def test_classification_scores_match_numpy(rng):
    w = rng.normal(size=(4, 3)).astype(np.float32)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=50)
    scores = linear_score_fn()(w, (x, y))
    np.testing.assert_array_equal(scores, (np.argmax(x @ w, 1) == y).astype(np.float32))


@pytest.mark.parametrize("chunk", [1, 7, 16, 50, 64])
def test_chunked_evaluation_equals_unchunked(rng, chunk):
    w = rng.normal(size=(4, 3)).astype(np.float32)
    data = (rng.normal(size=(50, 4)).astype(np.float32), rng.integers(0, 3, size=50))
    full = evaluate(linear_score_fn(), w, data)
    np.testing.assert_array_equal(jax.jit(lambda w: evaluate(linear_score_fn(), w, data, chunk))(w), full)


def test_num_points_rejects_mismatched_leaves():
    with pytest.raises(ValueError, match="leading axis"):
        num_points((jnp.zeros((5, 2)), jnp.zeros((4,))))
