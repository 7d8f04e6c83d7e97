import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2n2_jax.scoring import evaluate, num_points
from m2n2_jax.tasks import digits


def linear_score_fn():
    return lambda w, batch: (jnp.argmax(batch[0] @ w, -1) == batch[1]).astype(jnp.float32)


def test_digits_classification_scores_match_numpy(rng):
    w1, b1 = rng.normal(size=(64, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    w2, b2 = rng.normal(size=(5, 10)).astype(np.float32), rng.normal(size=10).astype(np.float32)
    x, y = rng.normal(size=(50, 64)).astype(np.float32), rng.integers(0, 10, size=50)
    scores = digits.classification_scores((digits.Dense(w1, b1), digits.Dense(w2, b2)), (x, y))
    logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    np.testing.assert_array_equal(scores, (np.argmax(logits, 1) == y).astype(np.float32))


@pytest.mark.parametrize("chunk", [1, 7, 16, 50, 64])
def test_chunked_evaluation_equals_unchunked(rng, chunk):
    w = rng.normal(size=(4, 3)).astype(np.float32)
    data = (rng.normal(size=(50, 4)).astype(np.float32), rng.integers(0, 3, size=50))
    full = evaluate(linear_score_fn(), w, data)
    np.testing.assert_array_equal(jax.jit(lambda w: evaluate(linear_score_fn(), w, data, chunk))(w), full)


def test_num_points_rejects_mismatched_leaves():
    with pytest.raises(ValueError, match="leading axis"):
        num_points((jnp.zeros((5, 2)), jnp.zeros((4,))))
