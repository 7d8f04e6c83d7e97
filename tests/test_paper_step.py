"""The paper's M2N2 step in plain NumPy vs the library, driven by the same draws.

The paper's code works on the flat parameter vector of the digits MLP 64 -> 256 -> 10
(W1, b1, W2, b2; D = 19,210): parents a, b, a ratio w and a split point k are drawn;
the child is the slerp with ONE global angle Omega between the two whole vectors,
ratio w_d = w for d < k and 1 - w from k on (linear interpolation if sin Omega <
1e-6), plus Gaussian noise; its fitness is the resource-normalised score (alpha = 1,
z_j = 1 where nobody solves datapoint j) over the N archive models and the child, and
the lowest fitness leaves (first index on ties; the child itself may be rejected).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import m2n2_jax as mj
from m2n2_jax import archive as archive_lib
from m2n2_jax.tasks import digits

(X_TRAIN, Y_TRAIN), _ = digits.load_digits()
X_NP, Y_NP = np.asarray(X_TRAIN), np.asarray(Y_TRAIN)
HIDDEN, N, STD = 256, 4, 0.01
D = 64 * HIDDEN + HIDDEN + HIDDEN * 10 + 10
W1_END, B1_END, W2_END = 64 * HIDDEN, 64 * HIDDEN + HIDDEN, 64 * HIDDEN + HIDDEN + HIDDEN * 10


# --- the paper's step in NumPy -------------------------------------------------------------


def np_unflatten(theta):
    """W1 (64, 256), b1, W2 (256, 10), b2 from the flat vector, in the paper's order."""
    w1 = theta[:W1_END].reshape(64, HIDDEN)
    b1 = theta[W1_END:B1_END]
    w2 = theta[B1_END:W2_END].reshape(HIDDEN, 10)
    b2 = theta[W2_END:]
    return w1, b1, w2, b2


def np_scores(theta):
    """1 where argmax(relu(x W1 + b1) W2 + b2) == y (float32 like the library)."""
    w1, b1, w2, b2 = np_unflatten(theta.astype(np.float32))
    logits = np.maximum(X_NP @ w1 + b1, 0) @ w2 + b2
    return (logits.argmax(1) == Y_NP).astype(np.float32)


def np_split_point_slerp(a, b, w, k):
    a, b = a.astype(np.float64), b.astype(np.float64)
    wd = np.where(np.arange(a.size) < k, w, 1.0 - w)
    cos = np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0)
    omega = np.arccos(cos)  # ONE global angle
    if np.sin(omega) < 1e-6:
        return (1 - wd) * a + wd * b
    return (np.sin((1 - wd) * omega) * a + np.sin(wd * omega) * b) / np.sin(omega)


def np_fitness(scores):
    total = scores.sum(0)
    z = np.where(total > 0, total, 1.0)  # alpha = 1, zero guard
    return (scores / z).sum(1)


def np_step(thetas, scores, a, b, w, k, noise):
    """One paper step on an archive (N, D), (N, M): returns (thetas, scores, dropped, child, child_scores)."""
    child = (np_split_point_slerp(thetas[a], thetas[b], w, k) + noise).astype(np.float32)
    child_scores = np_scores(child)
    f = np_fitness(np.vstack([scores, child_scores]))
    dropped = int(np.argmin(f))  # first index on ties; N = the child is rejected
    thetas, scores = thetas.copy(), scores.copy()
    if dropped < len(thetas):
        thetas[dropped], scores[dropped] = child, child_scores
    return thetas, scores, dropped, child, child_scores


# --- the library, driven by the same draws ------------------------------------------------

ALGO = mj.M2N2(archive_size=N)
PARAMS = ALGO.default_params()
TEMPLATE = digits.init_mlp(jax.random.key(0), HIDDEN)
UNRAVEL = ravel_pytree(TEMPLATE)[1]


@jax.jit
def library_step(state, a, b, w, k, noise):
    """Merge (split_point_slerp), noise, score, fitness (resource_fitness, alpha = 1) and
    archive update (insert_worst_leaves); also M2N2.tell on the same child for comparison."""
    child = mj.split_point_slerp(archive_lib.get(state, a), archive_lib.get(state, b), w, k, PARAMS.slerp_eps)
    child = jax.tree.map(jnp.add, child, UNRAVEL(noise))
    child_scores = digits.classification_scores(child, (X_TRAIN, Y_TRAIN))
    _, fitness = mj.resource_fitness(jnp.concatenate([state.scores, child_scores[None]]), 1.0)
    new, dropped = archive_lib.insert_worst_leaves(state, child, child_scores, fitness)
    told = ALGO.tell(None, state, jax.tree.map(lambda x: x[None], child), child_scores[None], PARAMS)
    return new, dropped, child, child_scores, fitness, told


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def test_the_digits_mlp_ravels_as_w1_b1_w2_b2():
    model = digits.init_mlp(jax.random.key(1), HIDDEN)
    layer1, layer2 = model
    w1, b1, w2, b2 = (np.asarray(x) for x in (layer1.kernel, layer1.bias, layer2.kernel, layer2.bias))
    assert w1.shape == (64, HIDDEN) and b1.shape == (HIDDEN,) and w2.shape == (HIDDEN, 10) and b2.shape == (10,)
    theta = np.concatenate([w1.ravel(), b1, w2.ravel(), b2])
    assert theta.size == D == 19_210 == mj.num_params(model)
    np.testing.assert_array_equal(flat(model), theta)
    # and back: mlp_from_flat is the inverse, and the NumPy unflatten reads the same layers
    chex.assert_trees_all_equal(digits.mlp_from_flat(jnp.asarray(theta), digits.widths(HIDDEN)), model)
    for x, y in zip(np_unflatten(theta), (w1, b1, w2, b2)):
        np.testing.assert_array_equal(x, y)
    # the library scores the model like the NumPy forward pass
    np.testing.assert_array_equal(digits.classification_scores(model, (X_TRAIN, Y_TRAIN)), np_scores(theta))


def test_gaussian_mutation_adds_one_flat_draw_in_ravel_order():
    """The library's mutation is theta + std * N(0, I_D) drawn as one flat vector, so the
    explicit noise below is what M2N2 adds."""
    key = jax.random.key(3)
    mutated = mj.gaussian_mutation(key, TEMPLATE, STD)
    noise = STD * np.asarray(jax.random.normal(key, (D,)))
    np.testing.assert_allclose(flat(mutated), flat(TEMPLATE) + noise, rtol=0, atol=1e-7)


@pytest.mark.parametrize("k, where", [(5_000, "inside W1"), (16_500, "inside b1"), (B1_END, "at W2"),
                                      (0, "start"), (D, "end")])
def test_split_point_cuts_the_same_coordinates(k, where):
    """Per layer: coordinates before k use w, from k on 1 - w (one global angle)."""
    a, b = digits.init_mlp(jax.random.key(4), HIDDEN), digits.init_mlp(jax.random.key(5), HIDDEN)
    w = 0.3
    child = mj.split_point_slerp(a, b, w, k)
    expected = np_split_point_slerp(flat(a), flat(b), w, k)
    np.testing.assert_allclose(flat(child), expected, rtol=1e-5, atol=1e-8)
    lo, hi = np_split_point_slerp(flat(a), flat(b), w, D), np_split_point_slerp(flat(a), flat(b), w, 0)
    (k1, c1), (k2, c2) = ((np.asarray(layer.kernel), np.asarray(layer.bias)) for layer in child)
    layers = dict(zip(("W1", "b1", "W2", "b2"), (k1.ravel(), c1, k2.ravel(), c2)))
    starts = dict(W1=0, b1=W1_END, W2=B1_END, b2=W2_END)
    for name, values in layers.items():
        index = starts[name] + np.arange(values.size)
        want = np.where(index < k, lo[index], hi[index])  # w before k, 1 - w from k
        np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-8, err_msg=f"{name}, k {where}")
    if k == B1_END:  # W1 and b1 entirely at w, W2 and b2 entirely at 1 - w
        np.testing.assert_allclose(c1, lo[W1_END:B1_END], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(k2.ravel(), hi[B1_END:W2_END], rtol=1e-5, atol=1e-8)
    assert not np.allclose(lo, hi), "w and 1 - w must give different children"


# explicit draws: (a, b, w, k); the last one has a == b (sin Omega = 0: the linear merge)
DRAWS = [(0, 1, 0.3, 5_000), (2, 3, 0.8, 16_500), (1, 2, 0.55, B1_END), (3, 0, 0.1, 19_205), (0, 2, 0.45, 120),
         (1, 3, 0.65, 17_000), (2, 0, 0.25, 10_000), (1, 1, 0.7, 9_000)]


def test_library_steps_equal_the_papers_numpy_step():
    rng = np.random.default_rng(0)
    seeds = jax.vmap(lambda k: digits.init_mlp(k, HIDDEN, std=0.05))(jax.random.split(jax.random.key(6), N))
    seed_scores = jax.vmap(lambda m: digits.classification_scores(m, (X_TRAIN, Y_TRAIN)))(seeds)
    state = ALGO.init(jax.random.key(0), seeds, seed_scores, PARAMS)
    thetas = np.stack([flat(jax.tree.map(lambda x: x[i], seeds)) for i in range(N)])
    scores = np.stack([np_scores(t) for t in thetas])
    np.testing.assert_array_equal(state.scores, scores)
    assert (scores.sum(0) == 0).any(), "the zero guard must matter: some datapoint solved by nobody"
    outcomes = []
    for a, b, w, k in DRAWS:
        noise = (STD * rng.normal(size=D)).astype(np.float32)
        before = scores
        thetas, scores, dropped, child, child_scores = np_step(thetas, scores, a, b, w, k, noise)
        lib = library_step(state, a, b, jnp.float32(w), k, jnp.asarray(noise))
        state, lib_dropped, lib_child, lib_child_scores, lib_fitness, told = lib
        np.testing.assert_allclose(flat(lib_child), child, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(lib_child_scores, child_scores)
        np.testing.assert_allclose(lib_fitness, np_fitness(np.vstack([before, child_scores])), rtol=1e-6)
        assert int(lib_dropped) == dropped
        np.testing.assert_array_equal(state.scores, scores)
        np.testing.assert_allclose(np.stack([flat(archive_lib.get(state, i)) for i in range(N)]), thetas,
                                   rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_equal(told, state)  # M2N2.tell is the same update
        outcomes.append(dropped)
    assert N in outcomes and any(d < N for d in outcomes), f"both an accepted and a rejected child: {outcomes}"
    # a tie: a == b, no noise, so the child is a copy of the archive's weakest model and
    # has its fitness; the first index (the archive model) leaves, not the child
    weakest = int(np.argmin(np_fitness(scores)))
    before = scores
    thetas, scores, dropped, child, child_scores = np_step(thetas, scores, weakest, weakest, 0.4, 777,
                                                           np.zeros(D, np.float32))
    f = np_fitness(np.vstack([before, child_scores]))
    assert f[weakest] == f[N] == f.min() and dropped == weakest
    state, lib_dropped, *_ = library_step(state, weakest, weakest, jnp.float32(0.4), 777, jnp.zeros(D))
    assert int(lib_dropped) == weakest
    np.testing.assert_array_equal(state.scores, scores)
