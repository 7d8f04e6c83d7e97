"""M2N2 (m2n2_jax.M2N2 + Params): init / ask / tell / best against NumPy references,
and each static switch of the paper's ablations checked by what it changes."""

import collections
import dataclasses
import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import problems as P
import pytest
from conftest import np_fitness, np_general_fitness
from jax.flatten_util import ravel_pytree

import m2n2_jax as mj
from m2n2_jax import archive as archive_lib
from m2n2_jax import task_vectors as tv_lib
from m2n2_jax.mutation import MUTATION_RNGS
from m2n2_jax.selection import sample_parents

TEMPLATE = P.init_model(jax.random.key(0))
STD = 0.05  # mutation std of the switch tests


def flat(tree) -> np.ndarray:
    """The flat vector(s) of a model or of models stacked on a leading axis."""
    leaves = jax.tree.leaves(tree)
    lead = leaves[0].shape[: leaves[0].ndim - jax.tree.leaves(TEMPLATE)[0].ndim]
    return np.concatenate([np.asarray(x, np.float64).reshape(lead + (-1,)) for x in leaves], axis=-1)


def models(n, seed=0):
    """n random MLPs stacked (n, ...)."""
    return jax.vmap(P.init_model)(jax.random.split(jax.random.key(seed), n))


def np_slerp(a, b, w, eps=1e-6):
    """NumPy reference of the merge: w is a scalar or one ratio per coordinate."""
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    omega = np.arccos(np.clip(a @ b / norm, -1, 1)) if norm > 0 else 0.0
    if norm == 0 or np.sin(omega) < eps:
        return (1 - w) * a + w * b
    return (np.sin((1 - w) * omega) * a + np.sin(w * omega) * b) / np.sin(omega)


def np_split_point_slerp(a, b, w, k):
    return np_slerp(a, b, np.where(np.arange(a.size) < k, w, 1 - w))


def np_dropped(scores, occupied, child_scores, alpha=1.0, capacity=None):
    """NumPy reference of docs/algorithm.md#step (tell): the index that leaves (N = the child)."""
    all_scores = np.concatenate([scores, np.asarray(child_scores)[None]])
    _, f = np_fitness(all_scores, alpha, capacity)
    f = np.where(np.concatenate([occupied, [True]]), f, np.inf)
    return int(np.argmin(f))


@functools.partial(jax.jit, static_argnums=0)
def init(algorithm, seeds, scores, params):
    return algorithm.init(jax.random.key(0), seeds, scores, params)


@functools.partial(jax.jit, static_argnums=0)
def tell(algorithm, state, child, scores, params):
    return algorithm.tell(jax.random.key(0), state, jax.tree.map(lambda x: x[None], child), scores[None], params)


@functools.partial(jax.jit, static_argnums=0)
def ask(algorithm, key, state, params):
    return algorithm.ask(key, state, params)


@functools.partial(jax.jit, static_argnums=0)
def ask_many(algorithm, state, params, keys):
    """Children of many keys, flat (K, D)."""
    return jax.vmap(lambda k: ravel_pytree(algorithm.ask(k, state, params)[0])[0])(keys)


def make_state(rng, n=6, m=20, filled=6, algorithm=None):
    algorithm = algorithm or mj.M2N2(archive_size=n)
    scores = jnp.asarray(rng.uniform(size=(filled, m)) > 0.5, jnp.float32)
    return init(algorithm, models(filled, int(rng.integers(1000))), scores, algorithm.default_params()), algorithm


# --- tell ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_tell_drops_the_worst_like_numpy(transform, seed):
    rng = np.random.default_rng(seed)
    state, algorithm = make_state(rng)
    params = algorithm.default_params()
    child = P.init_model(jax.random.key(100 + seed))
    child_scores = jnp.asarray(rng.uniform(size=20) > 0.3, jnp.float32)
    dropped = np_dropped(np.asarray(state.scores), np.asarray(state.occupied), np.asarray(child_scores))
    new = transform(lambda s, c, x: algorithm.tell(None, s, jax.tree.map(lambda y: y[None], c), x[None], params))(
        state, child, child_scores)
    assert_told(new, state, dropped, child, child_scores)


def assert_told(new, state, dropped, child, child_scores):
    """`new` is `state` with slot `dropped` replaced by the child (N: unchanged)."""
    n = state.scores.shape[0]
    if dropped == n:
        chex.assert_trees_all_equal(new, state)
        return
    np.testing.assert_array_equal(new.scores[dropped], child_scores)
    chex.assert_trees_all_equal(archive_lib.get(new, dropped), child)
    others = np.arange(n) != dropped
    np.testing.assert_array_equal(new.scores[others], state.scores[others])
    np.testing.assert_array_equal(flat(new.models)[others], flat(state.models)[others])
    np.testing.assert_array_equal(new.occupied, state.occupied.at[dropped].set(True))


def test_tell_uses_capacity_like_numpy():
    """Params.capacity weights the resources: F = c_j S / z_j."""
    rng = np.random.default_rng(3)
    algorithm = mj.M2N2(archive_size=6)
    state, _ = make_state(rng, algorithm=algorithm)
    child = P.init_model(jax.random.key(9))
    decisions = set()
    for _ in range(8):
        capacity = rng.uniform(0.1, 3.0, size=20).astype(np.float32)
        params = algorithm.default_params().replace(capacity=jnp.asarray(capacity))
        child_scores = jnp.asarray(rng.uniform(size=20) > 0.4, jnp.float32)
        dropped = np_dropped(np.asarray(state.scores), np.ones(6, bool), np.asarray(child_scores), 1.0, capacity)
        assert_told(tell(algorithm, state, child, child_scores, params), state, dropped, child, child_scores)
        decisions.add(dropped)
    assert len(decisions) > 2


def test_worst_model_leaves_and_useless_child_is_rejected():
    algorithm = mj.M2N2(archive_size=3)
    params = algorithm.default_params()
    scores = jnp.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]], jnp.float32)
    seeds = models(3)
    state = init(algorithm, seeds, scores, params)
    # A child that solves datapoint 3 alone collects a whole resource: model 2
    # (only a share of datapoint 1) leaves.
    child = P.init_model(jax.random.key(9))
    new = tell(algorithm, state, child, jnp.array([0, 0, 0, 1.0]), params)
    np.testing.assert_array_equal(flat(new.models), np.vstack([flat(seeds)[:2], flat(child)]))
    # A child that solves nothing has f = 0 and is rejected.
    chex.assert_trees_all_equal(tell(algorithm, state, child, jnp.zeros(4), params), state)


@pytest.mark.parametrize("accept", [True, False])
def test_replace_writes_a_slot_in_place_without_copying_the_old_one(accept):
    """An accepted write puts the model in the slot, a rejected one leaves the archive as
    it was, and neither takes a slot's worth of temporary memory in the compiled update
    (a select between the new and the old slot copies the old one out first)."""
    models = {"w": jnp.arange(4 * 256 * 128, dtype=jnp.float32).reshape(4, 256, 128), "b": jnp.ones((4, 128))}
    state = archive_lib.Archive(models=models, scores=jnp.zeros((4, 3)), occupied=jnp.ones(4, bool))
    child = {"w": jnp.full((256, 128), -1.0), "b": jnp.full((128,), -2.0)}
    update = lambda s, c, ok: archive_lib.replace(s, jnp.int32(2), c, jnp.full(3, 0.5), ok)
    new = jax.jit(update)(state, child, jnp.bool_(accept))
    for name in models:
        expected = np.asarray(models[name]).copy()
        if accept:
            expected[2] = np.asarray(child[name])
        np.testing.assert_array_equal(np.asarray(new.models[name]), expected)
    np.testing.assert_array_equal(np.asarray(new.scores[2]), np.full(3, 0.5) if accept else np.zeros(3))
    slot = 256 * 128 * 4
    compiled = jax.jit(update, donate_argnums=0).lower(state, child, jnp.bool_(accept)).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < slot // 8


def test_ties_drop_the_first_index():
    algorithm = mj.M2N2(archive_size=2)
    params = algorithm.default_params()
    seeds = models(2)
    state = init(algorithm, seeds, jnp.array([[1, 0], [0, 1]], jnp.float32), params)
    child = P.init_model(jax.random.key(9))
    new = tell(algorithm, state, child, jnp.array([1.0, 0.0]), params)
    # f = [0.5, 1, 0.5]: tie between slot 0 and the child; the first index leaves.
    np.testing.assert_array_equal(flat(new.models), [flat(child), flat(seeds)[1]])


def test_the_best_train_model_can_be_evicted():
    """M2N2 does not keep the best-train model: fitness is resource-normalised. The
    best model (mean 0.625) shares every datapoint it solves and has the lowest f once
    the child (mean 0.5) arrives, so it leaves and the best training score drops."""
    algorithm = mj.M2N2(archive_size=3)
    params = algorithm.default_params()
    scores = np.array([[1, 0, 0, 0, 1, 1, 1, 0], [1, 0, 1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0]], np.float32)
    child_scores = np.array([0, 0, 1, 0, 0, 1, 1, 1], np.float32)
    _, f = np_fitness(np.vstack([scores, child_scores]))
    assert np.argmax(scores.mean(1)) == 1 == np.argmin(f) and np.sort(f)[1] - f.min() > 0.1
    state = init(algorithm, models(3), jnp.asarray(scores), params)
    _, before = algorithm.best(state, None)
    child = P.init_model(jax.random.key(9))
    new = tell(algorithm, state, child, jnp.asarray(child_scores), params)
    np.testing.assert_array_equal(new.scores[1], child_scores)
    chex.assert_trees_all_equal(archive_lib.get(new, 1), child)
    _, after = algorithm.best(new, None)
    assert float(before) == 0.625 and float(after) == 0.5


# --- init and best ---------------------------------------------------------------------------


@pytest.mark.parametrize("filled", [6, 4])
def test_init_keeps_every_seed_in_order(filled):
    """N seeds fill all N slots in order (none rejected, even a seed that solves
    nothing, or a duplicate); S < N seeds fill the first S slots, the rest stay empty."""
    algorithm = mj.M2N2(archive_size=6)
    rng = np.random.default_rng(0)
    scores = (rng.uniform(size=(filled, 20)) > 0.5).astype(np.float32)
    scores[1] = 0.0  # f = 0: the tell rule alone would reject it
    scores[2] = scores[0]  # a duplicate competitor
    seeds = models(filled)
    state = init(algorithm, seeds, jnp.asarray(scores), algorithm.default_params())
    np.testing.assert_array_equal(state.occupied, np.arange(6) < filled)
    if filled == 6:
        assert state.occupied.all()
    np.testing.assert_array_equal(state.scores[:filled], scores)
    np.testing.assert_array_equal(flat(state.models)[:filled], flat(seeds))
    assert not np.asarray(state.scores[filled:]).any() and not flat(state.models)[filled:].any()


def test_init_with_more_seeds_than_slots_keeps_the_tell_rule():
    """Seeds beyond N compete like children (NumPy replay of the tell rule)."""
    algorithm = mj.M2N2(archive_size=3)
    rng = np.random.default_rng(1)
    scores = (rng.uniform(size=(6, 10)) > 0.5).astype(np.float32)
    state = init(algorithm, models(6), jnp.asarray(scores), algorithm.default_params())
    slots, kept = list(range(3)), scores[:3].copy()
    for i in range(3, 6):
        d = np_dropped(kept, np.ones(3, bool), scores[i])
        if d < 3:
            slots[d], kept[d] = i, scores[i]
    np.testing.assert_array_equal(state.scores, scores[slots])
    np.testing.assert_array_equal(flat(state.models), flat(models(6))[slots])


def test_best_is_the_top_mean_train_score_among_occupied_first_on_ties():
    rng = np.random.default_rng(2)
    state, algorithm = make_state(rng)
    model, score = algorithm.best(state, None)
    means = np.asarray(state.scores).mean(1)
    i = int(np.argmax(means))
    assert float(score) == np.float32(means[i])
    chex.assert_trees_all_equal(model, archive_lib.get(state, i))
    # an empty slot is never the best, even with every occupied score zero; ties -> first
    hand = archive_lib.Archive(models=models(3), scores=jnp.array([[0.0, 0], [0, 0], [0.5, 0.5]]),
                               occupied=jnp.array([False, True, True]))
    chex.assert_trees_all_equal(algorithm.best(hand, None)[0], archive_lib.get(hand, 2))
    hand = hand.replace(scores=jnp.zeros((3, 2)))
    chex.assert_trees_all_equal(algorithm.best(hand, None)[0], archive_lib.get(hand, 1))
    hand = hand.replace(scores=jnp.array([[1.0, 1], [0.5, 1], [1, 0.5]]))
    chex.assert_trees_all_equal(algorithm.best(hand, None)[0], archive_lib.get(hand, 1))


def test_empty_slots_fill_first_and_are_never_parents():
    rng = np.random.default_rng(0)
    state, algorithm = make_state(rng, n=8, filled=2)
    assert list(np.asarray(state.occupied)) == [True, True] + [False] * 6
    # even a useless child fills an empty slot
    new = tell(algorithm, state, TEMPLATE, jnp.zeros(20), algorithm.default_params())
    assert bool(new.occupied[2]) and new.occupied.sum() == 3
    keys = jax.random.split(jax.random.key(0), 200)
    a, b = jax.jit(jax.vmap(lambda k: sample_parents(k, *mj.resource_fitness(state.scores), state.occupied)))(keys)
    assert np.all(np.asarray(a) < 2) and np.all(np.asarray(b) < 2)


# --- ask ---------------------------------------------------------------------------------------

N = 4
SEEDS = models(N, seed=5)
X = flat(SEEDS)  # (N, D)
# Scores under which B ~ g(A, .) and B ~ f give very different parent pairs.
S_ATTR = np.array([[0, 0, 1, 0, 0, 0], [1, 1, 0, 1, 1, 1], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]], np.float32)


def switch_state(algorithm):
    params = algorithm.default_params().replace(mutation_std=jnp.float32(STD))
    return init(algorithm, SEEDS, jnp.asarray(S_ATTR), params), params


def test_ask_is_the_split_point_slerp_of_sampled_parents_plus_noise():
    """Default M2N2 against NumPy with the library's draws: parents from
    sample_parents, w ~ U(0, 1), k ~ U{0, .., D-1}, noise std * N(0, 1) in ravel order."""
    algorithm = mj.M2N2(archive_size=N)
    state, params = switch_state(algorithm)
    F, f = np_fitness(S_ATTR)

    @jax.jit
    def draws(key):  # the draws of ask, by the key layout of M2N2.ask
        k_parents, k_ratio, k_split, k_noise = jax.random.split(key, 4)
        a, b = sample_parents(k_parents, F.astype(np.float32), f.astype(np.float32), np.ones(N, bool))
        return (a, b, jax.random.uniform(k_ratio), jax.random.randint(k_split, (), 0, X.shape[1]),
                jax.random.normal(k_noise, (X.shape[1],)))

    for seed in range(6):
        key = jax.random.key(seed)
        children, same = ask(algorithm, key, state, params)
        chex.assert_trees_all_equal(same, state.replace(asked=state.asked + 1))  # ask only counts itself
        chex.assert_trees_all_equal(children, ask(algorithm, key, state, params)[0])  # deterministic
        chex.assert_trees_all_equal_shapes_and_dtypes(children, jax.tree.map(lambda x: x[None], TEMPLATE))
        a, b, w, k, noise = draws(key)
        w, k, noise = float(w), int(k), STD * np.asarray(noise, np.float64)
        expected = np_split_point_slerp(X[int(a)], X[int(b)], w, k) + noise
        np.testing.assert_allclose(flat(children)[0], expected, atol=2e-6)


def fit_slerp(children):
    """For each child (K, D): (i, j, residual) of the best fit child ~ slerp(X_i, X_j, w)
    with ONE ratio w for every coordinate (i == j: the child is X_i)."""
    out = []
    for c in np.asarray(children, np.float64):
        best = min((np.abs(c - X[i]).max(), i, i) for i in range(N))
        if best[0] > 1e-5:
            for i, j in itertools.combinations(range(N), 2):
                (ci, cj), *_ = np.linalg.lstsq(X[[i, j]].T, c, rcond=None)
                cos = X[i] @ X[j] / np.linalg.norm(X[i]) / np.linalg.norm(X[j])
                omega = np.arccos(cos)
                w = np.arctan2(cj * np.sin(omega), ci + cos * cj) / omega  # the ratio of these coefficients
                err = np.abs(c - np_slerp(X[i], X[j], w)).max() if 0 <= w <= 1 else np.inf
                best = min(best, (err, i, j))
        out.append((best[1], best[2], best[0]))
    return out


KEYS = jax.random.split(jax.random.key(42), 1500)


def test_no_split_point_child_is_a_plain_slerp_with_one_ratio():
    """split_point=False: every coordinate uses the same w (the child is slerp(A, B, w)
    for a pair of parents and w in [0, 1]); with the split point most children are not."""
    plain = mj.M2N2(archive_size=N, split_point=False, mutation=False)
    state, params = switch_state(plain)
    fits = fit_slerp(ask_many(plain, state, params, KEYS[:200]))
    assert max(err for *_, err in fits) < 1e-5
    assert sum(i != j for i, j, _ in fits) > 150, "attraction makes B != A"
    split = mj.M2N2(archive_size=N, mutation=False)
    fits = fit_slerp(ask_many(split, state, params, KEYS[:200]))
    assert sum(err > 1e-3 for *_, err in fits) > 180, "the checker must tell split-point children apart"


def test_no_crossover_child_is_a_copy_of_a_parent_drawn_from_f():
    algorithm = mj.M2N2(archive_size=N, crossover=False, mutation=False)
    state, params = switch_state(algorithm)  # mutation_std = 0.05, but mutation is off
    children = ask_many(algorithm, state, params, KEYS)
    match = (children[:, None, :] == X[None].astype(np.float32)).all(-1)  # bit-equal copies
    assert np.all(match.sum(1) == 1)
    _, f = np_fitness(S_ATTR)
    np.testing.assert_allclose(np.bincount(match.argmax(1), minlength=N) / len(KEYS), f / f.sum(), atol=0.04)


@pytest.mark.parametrize("crossover", [False, True])
def test_mutation_adds_gaussian_noise_of_mutation_std(crossover):
    """mutation=True: child = merge + N(0, std^2) on every coordinate (the residual of
    the best noise-free explanation); mutation=False (the tests above): no noise at all."""
    algorithm = mj.M2N2(archive_size=N, crossover=crossover, split_point=False)
    state, params = switch_state(algorithm)
    children = np.asarray(ask_many(algorithm, state, params, KEYS[:40]), np.float64)
    for c in children:
        if crossover:  # projection off the span of the two parents: residual ~ N(0, std^2) on D - 2 dims
            res = min(np.linalg.lstsq(X[[i, j]].T, c, rcond=None)[1][0] for i, j in itertools.permutations(range(N), 2))
            std = np.sqrt(res / (X.shape[1] - 2))
        else:
            std = min(np.std(c - x) for x in X)
        assert 0.8 * STD < std < 1.2 * STD


def np_pair_distribution(scores, attraction):
    """NumPy reference: probability of each unordered parent pair {A, B} (a slerp child
    does not tell A from B: slerp(A, B, w) = slerp(B, A, 1 - w))."""
    F, f = np_fitness(scores)
    n = len(f)
    p_a = f / f.sum()
    joint = np.zeros((n, n))
    for a in range(n):
        g = np.maximum(F - F[a], 0).sum(1)
        joint[a] = p_a[a] * (g / g.sum() if attraction and g.sum() > 0 else p_a)
    return np.triu(joint + joint.T) - np.diag(np.diag(joint))


@pytest.mark.parametrize("attraction", [True, False])
def test_attraction_switch_draws_b_from_g_or_from_f(attraction):
    """Frequencies of unordered parent pairs over many keys == the NumPy distribution of
    this switch, and far from the other switch's (total variation 0.66 apart)."""
    algorithm = mj.M2N2(archive_size=N, attraction=attraction, split_point=False, mutation=False)
    state, params = switch_state(algorithm)
    fits = fit_slerp(ask_many(algorithm, state, params, KEYS))
    assert max(err for *_, err in fits) < 1e-5
    freq = np.zeros((N, N))
    for i, j, _ in fits:
        freq[min(i, j), max(i, j)] += 1 / len(fits)
    expected, other = np_pair_distribution(S_ATTR, attraction), np_pair_distribution(S_ATTR, not attraction)
    np.testing.assert_allclose(freq, expected, atol=0.04)
    assert 0.5 * np.abs(freq - other).sum() > 0.5


def test_alpha_sweep_is_one_vmap_over_params():
    """Params are traced: a sweep over alpha is one vmap, equal to separate calls, and
    the tell decision follows NumPy for each alpha (0 drops model 0, 1 rejects the child)."""
    algorithm = mj.M2N2(archive_size=4)
    scores = np.array([[0, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 1], [1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 0]], np.float32)
    child_scores = jnp.array([0, 0, 1, 0, 1, 0], jnp.float32)
    alphas = jnp.array([0.0, 0.5, 1.0, 2.0])
    params = jax.vmap(lambda a: algorithm.default_params().replace(alpha=a))(alphas)
    state = init(algorithm, SEEDS, jnp.asarray(scores), algorithm.default_params())
    child = P.init_model(jax.random.key(9))

    def both(p):
        children, _ = algorithm.ask(jax.random.key(3), state, p)
        return children, tell(algorithm, state, child, child_scores, p)

    swept = jax.jit(jax.vmap(both))(params)
    separate = jax.jit(both)
    dropped = []
    for i, alpha in enumerate(np.asarray(alphas)):
        one = separate(jax.tree.map(lambda x: x[i], params))
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], swept), one, rtol=1e-6, atol=1e-7)
        d = np_dropped(scores, np.ones(4, bool), np.asarray(child_scores), float(alpha))
        assert_told(one[1], state, d, child, child_scores)
        dropped.append(d)
    assert dropped[0] == 0 and dropped[2] == 4


def test_archive_size_is_validated():
    with pytest.raises(ValueError, match="archive_size"):
        mj.M2N2(archive_size=1)
    with pytest.raises(ValueError, match="archive_size"):
        mj.M2N2(archive_size=2.0)


def test_options_are_validated():
    with pytest.raises(ValueError, match="capacity_rule"):
        mj.M2N2(capacity_rule="mean")
    with pytest.raises(ValueError, match="groups"):
        mj.M2N2(groups="attn")
    algorithm = mj.M2N2(archive_size=4)
    params = algorithm.default_params().replace(capacity=jnp.ones(7))
    with pytest.raises(ValueError, match=r"capacity must have shape \(6,\)"):
        algorithm.init(jax.random.key(0), SEEDS, jnp.asarray(S_ATTR), params)


# --- options of the paper's real-model experiments -------------------------------------


def np_dropped_general(scores, occupied, child_scores, **options):
    all_scores = np.concatenate([scores, np.asarray(child_scores)[None]])
    competing = np.concatenate([occupied, [True]])
    _, f = np_general_fitness(all_scores, competing, **options)
    return int(np.argmin(np.where(competing, f, np.inf)))


@pytest.mark.parametrize("rule,subtract_worst,eps", [("max", False, 0.0), ("fixed", True, 0.0), ("max", True, 0.05)])
def test_tell_with_continuous_score_options_drops_like_numpy(rule, subtract_worst, eps):
    """Continuous scores, a full archive of 6: the capacity rule, worst subtraction and
    eps decide who leaves as in the NumPy reference over the 6 + the child; and they
    change decisions against the digits rule (else this test could not see them)."""
    rng = np.random.default_rng(11)
    algorithm = mj.M2N2(archive_size=6, capacity_rule=rule, subtract_worst=subtract_worst)
    params = algorithm.default_params().replace(eps=jnp.float32(eps))
    child = P.init_model(jax.random.key(9))
    options = dict(capacity="max" if rule == "max" else "ones", subtract_worst=subtract_worst, eps=eps)
    changed = 0
    for _ in range(16):
        scores = jnp.asarray(rng.uniform(size=(6, 12)) ** 3, jnp.float32)
        state = init(algorithm, models(6, int(rng.integers(1000))), scores, params)
        child_scores = jnp.asarray(rng.uniform(size=12) ** 3, jnp.float32)
        dropped = np_dropped_general(np.asarray(scores), np.ones(6, bool), np.asarray(child_scores), **options)
        assert_told(tell(algorithm, state, child, child_scores, params), state, dropped, child, child_scores)
        changed += dropped != np_dropped(np.asarray(scores), np.ones(6, bool), np.asarray(child_scores))
    assert changed > 0, "the options never changed a decision: the test cannot see them"


def test_parents_are_drawn_by_the_general_fitness():
    """No crossover, continuous scores, capacity "max" + worst subtraction: the copied
    parent's frequencies are f / sum(f) of the NumPy reference, not the digits rule's."""
    scores = np.array([[0.9, 0.6, 0.6], [0.6, 0.9, 0.6], [0.6, 0.6, 0.9], [0.5, 0.5, 0.5]], np.float32)  # 3 is worst
    algorithm = mj.M2N2(archive_size=N, crossover=False, mutation=False, capacity_rule="max", subtract_worst=True)
    params = algorithm.default_params()
    state = init(algorithm, SEEDS, jnp.asarray(scores), params)
    children = ask_many(algorithm, state, params, KEYS)
    match = (children[:, None, :] == X[None].astype(np.float32)).all(-1)
    freq = np.bincount(match.argmax(1), minlength=N) / len(KEYS)
    _, f = np_general_fitness(scores, np.ones(N, bool), capacity="max", subtract_worst=True)
    _, plain = np_fitness(scores)
    np.testing.assert_allclose(freq, f / f.sum(), atol=0.04)
    assert freq[3] == 0 and plain[3] / plain.sum() > 0.15  # the worst everywhere collects nothing


def test_warmup_draws_both_parents_uniformly_among_occupied_slots():
    """3 of 6 slots occupied; model 0 solves everything, so after warm-up every child is
    model 0 merged with itself (A ~ f, no attraction to anyone). During the first
    `warmup` asks each unordered pair of distinct occupied slots has probability 1/3,
    and no empty slot is a parent."""
    algorithm = mj.M2N2(archive_size=6, split_point=False, mutation=False)
    params = algorithm.default_params().replace(warmup=jnp.int32(5))
    scores = jnp.array([[1.0] * 6, [0.0] * 6, [0.0] * 6])
    state = init(algorithm, jax.tree.map(lambda x: x[:3], SEEDS), scores, params)
    assert int(state.asked) == 0
    fits = fit_slerp(ask_many(algorithm, state, params, KEYS[:600]))
    assert max(err for *_, err in fits) < 1e-5
    pairs = collections.Counter(tuple(sorted((i, j))) for i, j, _ in fits)
    assert set(pairs) == {(0, 1), (0, 2), (1, 2)}
    for count in pairs.values():
        assert abs(count / 600 - 1 / 3) < 0.06
    after = fit_slerp(ask_many(algorithm, state.replace(asked=jnp.int32(5)), params, KEYS[:50]))
    assert all((i, j) == (0, 0) for i, j, _ in after)


def test_warmup_counts_asks_in_a_run():
    """Through the runner: `asked` counts the steps, and warm-up makes a difference only
    while asked < warmup (same key: the runs agree up to there, not after)."""
    algorithm = mj.M2N2(archive_size=4, mutation=False)
    run = lambda w: mj.run(algorithm, P.KEYS[:1], P.score_fn, P.TRAIN, 2 + 12, seed_fn=P.seed_fn, log_every=1,
                           params=algorithm.default_params().replace(warmup=jnp.int32(w)), progress=False)
    cold, warm = run(0), run(12)
    assert int(cold.state.asked[0]) == int(warm.state.asked[0]) == 12
    assert not np.array_equal(flat(cold.state.models), flat(warm.state.models))


def one_group(path):
    return "all"


def per_layer(path):
    """Group by layer: the digits MLP's leaves are 0/kernel, 0/bias, 1/kernel, 1/bias."""
    return path.split("/")[0]


def test_one_group_is_todays_m2n2_bit_for_bit():
    plain = mj.M2N2(archive_size=N)
    grouped = mj.M2N2(archive_size=N, groups=one_group)
    state, params = switch_state(plain)
    for key in KEYS[:5]:
        chex.assert_trees_all_equal(ask(grouped, key, state, params), ask(plain, key, state, params))
    for no_split in (mj.M2N2(archive_size=N, split_point=False),
                     mj.M2N2(archive_size=N, split_point=False, groups=one_group)):
        chex.assert_trees_all_equal(ask(no_split, KEYS[0], state, params)[0],
                                    ask(mj.M2N2(archive_size=N, split_point=False), KEYS[0], state, params)[0])


def test_grouped_child_has_per_group_ratio_split_and_angle():
    """Two layer groups: the child is, per group, the split-point slerp of that group's
    parent vectors with the group's own w_g ~ U(0, 1), k_g ~ U{0, .., D_g - 1} and angle
    (NumPy, float64), with the draws of ask's key layout."""
    algorithm = mj.M2N2(archive_size=N, groups=per_layer, mutation=False)
    state, params = switch_state(algorithm)
    F, f = np_fitness(S_ATTR)
    sizes = np.array([8 * 16 + 16, 16 * 4 + 4])
    assert mj.merge.leaf_groups(TEMPLATE, per_layer) == (0, 0, 1, 1)

    @jax.jit
    def draws(key):
        k_parents, k_ratio, k_split, _ = jax.random.split(key, 4)
        a, b = sample_parents(k_parents, F.astype(np.float32), f.astype(np.float32), np.ones(N, bool))
        return a, b, jax.random.uniform(k_ratio, (2,)), jax.random.randint(k_split, (2,), 0, sizes)

    for key in KEYS[:6]:
        a, b, w, k = draws(key)
        child = flat(ask(algorithm, key, state, params)[0])[0]
        xa, xb = X[int(a)], X[int(b)]
        d0 = sizes[0]
        expected = np.concatenate([np_split_point_slerp(xa[:d0], xb[:d0], float(w[0]), int(k[0])),
                                   np_split_point_slerp(xa[d0:], xb[d0:], float(w[1]), int(k[1]))])
        np.testing.assert_allclose(child, expected, atol=2e-6)


# --- task-vector mode (our extension) -----------------------------------------------------

BASE = P.init_model(jax.random.key(77))
XB = flat(BASE)[None][0]


def tv_state(algorithm, magnitude_std=0.0, base=BASE):
    params = algorithm.default_params().replace(base=base, magnitude_std=jnp.float32(magnitude_std))
    return init(algorithm, SEEDS, jnp.asarray(S_ATTR), params), params


def test_task_vector_child_is_base_plus_the_merge_of_task_vectors():
    """With the library's draws (ask's key layout): child = base + split-point slerp of
    (A - base) and (B - base), NumPy float64; not the merge of the models themselves."""
    algorithm = mj.M2N2(archive_size=N, mutation=False, task_vectors=True)
    state, params = tv_state(algorithm)
    F, f = np_fitness(S_ATTR)

    @jax.jit
    def draws(key):
        k_parents, k_ratio, k_split, _ = jax.random.split(key, 4)
        a, b = sample_parents(k_parents, F.astype(np.float32), f.astype(np.float32), np.ones(N, bool))
        return a, b, jax.random.uniform(k_ratio), jax.random.randint(k_split, (), 0, X.shape[1])

    for key in KEYS[:6]:
        a, b, w, k = draws(key)
        child = flat(ask(algorithm, key, state, params)[0])[0]
        expected = XB + np_split_point_slerp(X[int(a)] - XB, X[int(b)] - XB, float(w), int(k))
        np.testing.assert_allclose(child, expected, atol=5e-6)
        if int(a) != int(b):
            assert np.abs(child - np_split_point_slerp(X[int(a)], X[int(b)], float(w), int(k))).max() > 1e-2


def test_task_vector_mode_with_a_zero_base_is_plain_m2n2_bit_for_bit():
    zero = jax.tree.map(jnp.zeros_like, BASE)
    tv = mj.M2N2(archive_size=N, task_vectors=True)
    state, params = tv_state(tv, base=zero)
    plain = mj.M2N2(archive_size=N)
    for key in KEYS[:4]:
        chex.assert_trees_all_equal(ask(tv, key, state, params), ask(plain, key, state, params))


def test_magnitude_scales_each_groups_task_vector_log_normally():
    """magnitude_std = 0.2, two layer groups: per child, (child - base) / (merge of the
    task vectors) is one constant s_g per group, and log s_g ~ N(0, 0.2^2) over keys;
    with magnitude_std = 0 the ratio is exactly 1."""
    algorithm = mj.M2N2(archive_size=N, mutation=False, task_vectors=True, groups=per_layer)
    state, params = tv_state(algorithm, 0.2)
    _, unscaled = tv_state(algorithm, 0.0)
    d0 = 8 * 16 + 16
    logs = []
    for key in KEYS[:300]:
        scaled = flat(ask(algorithm, key, state, params)[0])[0] - XB
        plain = flat(ask(algorithm, key, state, unscaled)[0])[0] - XB
        for part in (slice(0, d0), slice(d0, None)):
            big = np.abs(plain[part]) > 1e-3
            ratio = scaled[part][big] / plain[part][big]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-3)
            logs.append(np.log(ratio[0]))
    logs = np.array(logs)
    assert abs(logs.mean()) < 0.03 and abs(logs.std() - 0.2) < 0.03
    assert np.corrcoef(logs[0::2], logs[1::2])[0, 1] < 0.2  # the two groups draw independently


def np_union_norm(a, b):
    return np.sqrt(a @ a + b @ b - max(a @ b, 0.0))


def test_union_norms_match_numpy_and_the_skill_model():
    """U = sqrt(|a|^2 + |b|^2 - max(<a, b>, 0)) per group; on orthonormal skills e_i,
    the norm of the union of the parents' skills: |e1 + e2| for e1, e2; |e1| for e1, e1;
    |e1 + e2| for e1 + e2, e1."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 7)).astype(np.float32), rng.normal(size=(2, 5)).astype(np.float32)
    got = np.asarray(tv_lib.union_norms([a[0], b[0]], [a[1], b[1]], (0, 1)))
    np.testing.assert_allclose(got, [np_union_norm(a[0], a[1]), np_union_norm(b[0], b[1])], rtol=1e-5)
    e1, e2 = np.eye(3, dtype=np.float32)[:2]
    norm = lambda x, y: float(tv_lib.union_norms([x], [y], (0,))[0])
    assert norm(e1, e2) == pytest.approx(np.sqrt(2)) and norm(e1, e1) == pytest.approx(1.0)
    assert norm(e1 + e2, e1) == pytest.approx(np.sqrt(2)) and norm(e1, -e1) == pytest.approx(np.sqrt(2))


def test_union_norm_rescales_each_groups_merge_to_the_parents_union_norm():
    """task_vector_norm="union", two layer groups: child - base = the merge of the task
    vectors (same draws as "merge") rescaled per group to the union norm of the parents'
    task vectors; the merge alone has a different norm (the counter-case)."""
    union = mj.M2N2(archive_size=N, mutation=False, task_vectors=True, groups=per_layer, task_vector_norm="union")
    merge = dataclasses.replace(union, task_vector_norm="merge")
    state, params = tv_state(union)
    F, f = np_fitness(S_ATTR)
    d0 = 8 * 16 + 16

    @jax.jit
    def parents(key):
        return sample_parents(jax.random.split(key, 4)[0], F.astype(np.float32), f.astype(np.float32),
                              np.ones(N, bool))

    differs = 0
    for key in KEYS[:8]:
        a, b = (int(i) for i in parents(key))
        child = flat(ask(union, key, state, params)[0])[0] - XB
        plain = flat(ask(merge, key, state, params)[0])[0] - XB
        ta, tb = X[a] - XB, X[b] - XB
        for part in (slice(0, d0), slice(d0, None)):
            target = np_union_norm(ta[part].astype(np.float64), tb[part].astype(np.float64))
            expected = plain[part] * target / np.linalg.norm(plain[part])
            np.testing.assert_allclose(child[part], expected, rtol=1e-4, atol=1e-6)
            differs += abs(np.linalg.norm(plain[part]) - target) > 1e-2 * target
    assert differs > 0


def test_task_vector_norm_must_be_known():
    with pytest.raises(ValueError, match="task_vector_norm"):
        mj.M2N2(task_vectors=True, task_vector_norm="sum")


def test_task_vector_mode_needs_a_base_of_the_seeds_shape():
    algorithm = mj.M2N2(archive_size=N, task_vectors=True)
    with pytest.raises(ValueError, match="needs Params.base"):
        init(algorithm, SEEDS, jnp.asarray(S_ATTR), algorithm.default_params())
    with pytest.raises(ValueError, match="structure and leaf shapes"):
        init(algorithm, SEEDS, jnp.asarray(S_ATTR), algorithm.default_params().replace(base=BASE[:1]))


# --- P children per step and the mutation RNG ----------------------------------------------


@pytest.mark.parametrize("rng", ["threefry2x32", "threefry4x32"])
def test_the_children_of_one_step_are_single_asks_with_split_keys(rng):
    """P = 4: child i is what a one-child ask gives with key split(key, 4)[i] from the
    same archive after i earlier children (`asked` + i), up to float32 rounding (the
    children are vmapped); `asked` grows by 4. P = 1 is the one-child ask with the key
    itself (its key layout is pinned by the draws test above)."""
    one = mj.M2N2(archive_size=N, mutation_rng=rng)
    four = dataclasses.replace(one, population_size=4)
    assert four.population_size == 4 and one.population_size == 1
    state, params = switch_state(one)
    for key in KEYS[:3]:
        children, after = ask(four, key, state, params)
        assert int(after.asked) == int(state.asked) + 4
        flat_children = flat(children)
        for i, k in enumerate(jax.random.split(key, 4)):
            single, _ = ask(one, k, state.replace(asked=state.asked + i), params)
            np.testing.assert_allclose(flat_children[i], flat(single)[0], rtol=1e-5, atol=1e-6)  # vmap rounds
        assert len({c.tobytes() for c in flat_children}) == 4
    chex.assert_trees_all_equal(ask(dataclasses.replace(one, population_size=1), KEYS[0], state, params),
                                ask(one, KEYS[0], state, params))


def test_warmup_counts_children():
    """P = 4 with 3 children asked before and warm-up 5: children 0 and 1 of the next ask
    are still in warm-up (two distinct uniform parents), children 2 and 3 are not (model
    0 solves everything, so they are model 0 merged with itself: bit-equal copies)."""
    algorithm = mj.M2N2(archive_size=6, split_point=False, mutation=False, population_size=4)
    params = algorithm.default_params().replace(warmup=jnp.int32(5))
    scores = jnp.array([[1.0] * 6, [0.0] * 6, [0.0] * 6])
    state = init(algorithm, jax.tree.map(lambda x: x[:3], SEEDS), scores, params).replace(asked=jnp.int32(3))
    copies = np.zeros(4)
    for key in KEYS[:40]:
        children = flat(ask(algorithm, key, state, params)[0])
        copies += np.abs(children - X[0].astype(np.float32)).max(1) == 0
    np.testing.assert_array_equal(copies, [0, 0, 40, 40])


def test_tell_inserts_children_in_order():
    """A full archive of 2 (model 0 solves datapoint 0, model 1 datapoint 1); child c0
    solves datapoint 2, child c1 datapoints 1 and 2. Told c0, c1: c0 replaces model 0,
    then c1 replaces c0 (archive: c1, model 1). Told c1, c0: c1 replaces model 1, then
    c0 is rejected (archive: model 0, c1). Each insertion follows the NumPy replay."""
    algorithm = mj.M2N2(archive_size=2, population_size=2)
    params = algorithm.default_params()
    seeds = models(2)
    scores = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    state = init(algorithm, seeds, jnp.asarray(scores), params)
    children = models(2, seed=9)
    child_scores = np.array([[0, 0, 1], [0, 1, 1]], np.float32)

    def np_replay(order):
        kept, slots = scores.copy(), [0, 1]
        for i in order:
            d = np_dropped(kept, np.ones(2, bool), child_scores[i])
            if d < 2:
                kept[d], slots[d] = child_scores[i], 2 + i
        return kept, slots

    told = jax.jit(algorithm.tell)(None, state, children, jnp.asarray(child_scores), params)
    everyone = np.concatenate([flat(seeds), flat(children)])
    for order, new in [((0, 1), told), ((1, 0), jax.jit(algorithm.tell)(
            None, state, jax.tree.map(lambda x: x[::-1], children), jnp.asarray(child_scores[::-1]), params))]:
        kept, slots = np_replay(order)
        np.testing.assert_array_equal(new.scores, kept)
        np.testing.assert_array_equal(flat(new.models), everyone[slots])
    assert np_replay((0, 1))[1] == [3, 1] and np_replay((1, 0))[1] == [0, 3], "the counter-case must depend on order"


def test_a_population_of_p_spends_p_passes_per_step():
    """Through the runner: P = 4 spends 4 passes per step (2 seeds + 4 k), `asked`
    counts the 16 children, and a second run of the same keys is bit-identical."""
    algorithm = mj.M2N2(archive_size=4, population_size=4)
    run = lambda: mj.run(algorithm, P.KEYS[:2], P.score_fn, P.TRAIN, 2 + 16, seed_fn=P.seed_fn, log_every=4,
                         progress=False)
    result = run()
    np.testing.assert_array_equal(result.passes, [6, 10, 14, 18])
    assert (np.asarray(result.state.asked) == 16).all()
    chex.assert_trees_all_equal(result.state, run().state)


@pytest.mark.parametrize("rng", ["threefry4x32", "rbg"])
def test_mutation_rng_changes_only_the_noise(rng):
    """child = the noise-free child + std * normal(noise_key(key_noise, rng)): the same
    parents, ratio and split point as the default, another noise draw."""
    from m2n2_jax.mutation import noise_key

    algorithm = mj.M2N2(archive_size=N, mutation_rng=rng)
    state, params = switch_state(algorithm)
    clean = mj.M2N2(archive_size=N, mutation=False)
    for key in KEYS[:3]:
        key_noise = jax.random.split(key, 4)[3]
        expected = flat(ask(clean, key, state, params)[0])[0] + STD * np.asarray(
            jax.random.normal(noise_key(key_noise, rng), (X.shape[1],)), np.float64)
        child = flat(ask(algorithm, key, state, params)[0])[0]
        np.testing.assert_allclose(child, expected, atol=1e-6)
        assert np.abs(child - flat(ask(mj.M2N2(archive_size=N), key, state, params)[0])[0]).max() > 2 * STD


@pytest.mark.parametrize("rng", MUTATION_RNGS)
def test_each_mutation_rng_runs_through_the_runner(rng):
    """Every offered RNG compiles inside `run` (shard_map over 2 devices: philox does
    not, so it is not offered) and gives the same run twice."""
    algorithm = mj.M2N2(archive_size=4, mutation_rng=rng)
    run = lambda: mj.run(algorithm, P.KEYS[:2], P.score_fn, P.TRAIN, 2 + 8, seed_fn=P.seed_fn, progress=False)
    chex.assert_trees_all_equal(run().state, run().state)


def test_new_options_are_validated():
    for bad in (0, 2.0):
        with pytest.raises(ValueError, match="population_size"):
            mj.M2N2(population_size=bad)
    with pytest.raises(ValueError, match="mutation_rng"):
        mj.M2N2(mutation_rng="philox4x32")
