"""End-to-end runs of the runner on a tiny problem: every method, determinism,
chunking invariance, logging and validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m2n2_jax as mj
from m2n2_jax.baselines.map_elites import group_means
from m2n2_jax.models.mlp import MLP, random_params

rng = np.random.default_rng(0)
X = rng.normal(size=(120, 8)).astype(np.float32)
Y = (X[:, :4].argmax(1)).astype(np.int32)
TRAIN, TEST = (X[:90], Y[:90]), (X[90:], Y[90:])
MODEL = MLP(features=(16, 4))
SCORE_FN = mj.classification_scores(MODEL.apply)
SEEDS = lambda key: jax.vmap(lambda k: random_params(k, MODEL, 8, std=0.3))(jax.random.split(key, 2))
KEYS = jax.vmap(jax.random.key)(jnp.arange(3))


def tiny_run(method="m2n2", passes=60, **kwargs):
    algo = mj.make_method(method, descriptor_fn=group_means(TRAIN[1] % 2), mutation_std=0.05)
    return mj.run(KEYS, SEEDS, SCORE_FN, TRAIN, passes, algo, test_data=TEST, log_every=10, progress=False, **kwargs)


@pytest.mark.parametrize("method", mj.METHODS)
def test_every_method_runs_end_to_end(method):
    result = tiny_run(method)
    np.testing.assert_array_equal(result.passes, np.arange(10, 61, 10))
    assert result.test_accuracy.shape == (3, 6) and np.all(np.isfinite(result.test_accuracy))
    assert np.all((result.test_accuracy >= 0) & (result.test_accuracy <= 1))
    stamps = result.log_wall_seconds
    assert stamps.shape == (6,) and np.all(np.diff(stamps) >= 0) and stamps[-1] <= result.wall_seconds
    # The logged train accuracy is the archive's best and never decreases.
    assert np.all(np.diff(result.train_accuracy, axis=1) >= 0)
    chex.assert_tree_all_finite(result.best_params)


def test_evolution_improves_on_seeds():
    result = tiny_run(passes=400)
    seeds_best = tiny_run(passes=2).train_accuracy[:, -1]
    assert np.all(result.final_train_accuracy > seeds_best)


def test_same_seed_same_result_and_chunking_does_not_matter():
    a = tiny_run(steps_per_call=7)
    b = tiny_run(steps_per_call=58)
    np.testing.assert_array_equal(a.test_accuracy, b.test_accuracy)
    chex.assert_trees_all_equal(a.state, b.state)


def test_vmap_over_runs_equals_lax_map():
    a = tiny_run()
    b = tiny_run(vectorize="vmap")
    np.testing.assert_allclose(a.train_accuracy, b.train_accuracy)
    chex.assert_trees_all_close(a.best_params, b.best_params, atol=1e-5)


def test_runs_differ_between_keys_and_match_single_runs():
    batched = tiny_run()
    single = mj.run(KEYS[1], SEEDS, SCORE_FN, TRAIN, 60, mj.make_method("m2n2", mutation_std=0.05),
                    test_data=TEST, log_every=10, progress=False)
    np.testing.assert_array_equal(single.test_accuracy[0], batched.test_accuracy[1])
    assert not np.array_equal(batched.state.scores[0], batched.state.scores[1])


def test_log_every_one_gives_per_pass_curve_and_last_pass_is_logged():
    result = mj.run(
        KEYS, SEEDS, SCORE_FN, TRAIN, 25, mj.Config(), test_data=TEST, log_every=1, progress=False)
    np.testing.assert_array_equal(result.passes, np.arange(2, 26))
    odd = mj.run(KEYS, SEEDS, SCORE_FN, TRAIN, 25, mj.Config(), log_every=10, progress=False)
    np.testing.assert_array_equal(odd.passes, [10, 20, 25])
    assert np.all(np.isnan(odd.test_accuracy))


def test_pretrained_seed_list_is_shared_by_runs():
    # Committed to one device, as arrays restored from a checkpoint are.
    models = [jax.device_put(random_params(jax.random.key(i), MODEL, 8, std=0.3), jax.devices()[0]) for i in range(2)]
    result = mj.run(KEYS, models, SCORE_FN, jax.device_put(TRAIN, jax.devices()[1]), 20, mj.Config(mutation_std=0.0), log_every=10, progress=False)
    assert result.train_accuracy.shape == (3, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"forward_passes": 1}, "forward_passes"),
        ({"forward_passes": 2.5}, "forward_passes"),
        ({"log_every": 0}, "log_every"),
        ({"vectorize": "pmap"}, "vectorize"),
        ({"data": (X[:90], Y[:80])}, "leading axis"),
        ({"data": (X[:90, :5], Y[:90])}, "wrong data shape"),
        ({"score_fn": lambda p, b: SCORE_FN(p, b)[:5]}, "shape"),
        ({"key": KEYS[:0]}, "at least one"),
    ],
)
def test_run_validates_input(kwargs, message):
    args = dict(key=KEYS, seed_models=SEEDS, score_fn=SCORE_FN, data=TRAIN, forward_passes=20)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        mj.run(**args, progress=False)


def test_budget_must_cover_the_seed_models():
    models = [random_params(jax.random.key(i), MODEL, 8) for i in range(3)]
    with pytest.raises(ValueError, match="seed models = 3"):
        mj.run(KEYS, models, SCORE_FN, TRAIN, 2, progress=False)


def test_non_finite_seed_model_or_scores_are_rejected():
    bad = random_params(jax.random.key(0), MODEL, 8)
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), bad)
    with pytest.raises(ValueError, match="non-finite"):
        mj.run(KEYS, [bad, bad], SCORE_FN, TRAIN, 10, progress=False)
    nan_scores = lambda p, b: SCORE_FN(p, b) * jnp.nan
    with pytest.raises(ValueError, match="non-finite"):
        mj.run(KEYS, SEEDS, nan_scores, TRAIN, 10, progress=False)
    too_big = lambda p, b: SCORE_FN(p, b) + 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mj.run(KEYS, SEEDS, too_big, TRAIN, 10, progress=False)


def test_invalid_child_is_reported_with_its_pass():
    # Scores turn NaN once a parameter exceeds a threshold that only children reach.
    def flaky(params, batch):
        s = SCORE_FN(params, batch)
        return jnp.where(jnp.abs(params["params"]["Dense_0"]["bias"]).max() > 0.75, jnp.nan, s)
    with pytest.raises(ValueError, match="run .* pass"):
        mj.run(KEYS, SEEDS, flaky, TRAIN, 300, mj.Config(mutation_std=0.5), progress=False)


def test_seed_models_must_match():
    a = random_params(jax.random.key(0), MODEL, 8)
    b = random_params(jax.random.key(1), MLP(features=(8, 4)), 8)
    with pytest.raises(ValueError, match="Dense_0"):
        mj.run(KEYS, [a, b], SCORE_FN, TRAIN, 10, progress=False)
    c = jax.tree.map(lambda x: x.astype(jnp.bfloat16), a)
    with pytest.raises(ValueError, match="bfloat16"):
        mj.run(KEYS, [a, c], SCORE_FN, TRAIN, 10, progress=False)
    d = {"other": a}
    with pytest.raises(ValueError, match="structure"):
        mj.run(KEYS, [a, d], SCORE_FN, TRAIN, 10, progress=False)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        mj.make_method("cma")
    with pytest.raises(ValueError, match="descriptor_fn"):
        mj.make_method("map-elites")


def test_runs_sharded_over_devices_equal_one_device():
    assert len(jax.devices()) == 2, "conftest forces two CPU devices"
    keys = jax.vmap(jax.random.key)(jnp.arange(4))
    algo = mj.make_method("m2n2", mutation_std=0.05)
    args = (keys, SEEDS, SCORE_FN, TRAIN, 60, algo)
    two = mj.run(*args, test_data=TEST, log_every=10, progress=False)
    one = mj.run(*args, test_data=TEST, log_every=10, progress=False, devices=jax.devices()[:1])
    assert len(two.state.scores.sharding.device_set) == 2
    np.testing.assert_allclose(two.test_accuracy, one.test_accuracy)
    chex.assert_trees_all_close(two.state, one.state, atol=1e-6)
    # An odd number of runs is padded to the devices and trimmed back.
    three = mj.run(keys[:3], *args[1:], test_data=TEST, log_every=10, progress=False)
    assert three.test_accuracy.shape == (3, 6) and three.state.scores.shape[0] == 3
    np.testing.assert_allclose(three.test_accuracy, one.test_accuracy[:3])


def test_capacity_vector_of_ones_changes_nothing_and_other_capacities_do():
    config = mj.Config(mutation_std=0.05)
    args = (KEYS, SEEDS, SCORE_FN, TRAIN, 60)
    plain = mj.run(*args, mj.m2n2(config), log_every=10, progress=False)
    ones = mj.run(*args, mj.m2n2(config, jnp.ones(90)), log_every=10, progress=False)
    chex.assert_trees_all_equal(plain.state, ones.state)
    weighted = mj.run(*args, mj.m2n2(config, jnp.linspace(0.1, 2.0, 90)), log_every=10, progress=False)
    assert not np.array_equal(plain.state.scores, weighted.state.scores)
