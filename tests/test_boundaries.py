"""What a new user's own code met (issue 23): each defect, a test that fails without its fix.

Resume with other data or another score_fn, sweeps through `run`, honest metric names,
the evosax adapter's start and budget, inputs accepted silently or refused deep, the
contract check, one version, and the progress label.
"""

import dataclasses
import importlib.metadata
import io
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import problems as P
import pytest
from evosax.algorithms import Sep_CMA_ES

import m2n2_jax as mj

ALGO = mj.M2N2(archive_size=10)
PARAMS = ALGO.default_params().replace(mutation_std=jnp.float32(0.05))
BUDGET = 14


def run(**kwargs):
    """A short M2N2 run of the 3 keys; calls of 4 steps in every test (one compiled step program)."""
    args = dict(params=PARAMS, seed_fn=P.seed_fn, test_data=P.TEST, log_every=4, steps_per_call=4, progress=False)
    return mj.run(kwargs.pop("algorithm", ALGO), kwargs.pop("keys", P.KEYS), kwargs.pop("score_fn", P.score_fn),
                  kwargs.pop("data", P.TRAIN), kwargs.pop("budget", BUDGET), **{**args, **kwargs})


# --- resume refuses another run, naming what differs ----------------------------------


def other_score_fn(model, batch):  # the same values under another name
    return P.score_fn(model, batch)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("resume") / "ckpt"
    run(budget=8, checkpoint=mj.Checkpointing(str(directory), 4))
    return directory


@pytest.mark.parametrize("change,named", [
    (dict(data=(P.TRAIN[0] + 1.0, P.TRAIN[1])), "training_data"),
    (dict(score_fn=other_score_fn), "score_fn"),
    (dict(params=PARAMS.replace(alpha=jnp.float32(0.5))), ".alpha"),
])
def test_resume_with_other_data_score_fn_or_params_is_refused_naming_it(checkpointed, change, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        run(budget=8, checkpoint=mj.Checkpointing(str(checkpointed), 4, resume=True), **change)
    resumed = run(budget=8, checkpoint=mj.Checkpointing(str(checkpointed), 4, resume=True))  # the same run resumes
    assert resumed.passes[-1] == 8


# --- sweeps: per-run params through run ------------------------------------------------


def test_per_run_params_equal_one_run_per_value():
    """alpha (0, 0.5, 1) for the three keys in one call == three calls, one alpha each:
    run r of the sweep is run r of the call with alpha[r], bit for bit."""
    alphas = np.array([0.0, 0.5, 1.0], np.float32)
    swept = jax.tree.map(lambda x: jnp.broadcast_to(x, (3,) + x.shape), PARAMS).replace(alpha=jnp.asarray(alphas))
    sweep = run(params=swept)
    for r, alpha in enumerate(alphas):
        alone = run(params=PARAMS.replace(alpha=jnp.float32(alpha)))
        np.testing.assert_array_equal(sweep.train_score[r], alone.train_score[r])
        np.testing.assert_array_equal(sweep.test_score[r], alone.test_score[r])
        for x, y in zip(jax.tree.leaves(sweep.state), jax.tree.leaves(alone.state)):
            np.testing.assert_array_equal(np.asarray(x)[r], np.asarray(y)[r])
    assert not np.array_equal(np.asarray(sweep.state.scores[0]), np.asarray(run().state.scores[0]))


def test_per_run_params_need_the_runs_axis_on_every_leaf():
    two = PARAMS.replace(alpha=jnp.zeros(2))  # 2 values for 3 keys
    with pytest.raises(ValueError, match=r"leading axis R = 3.*\.alpha"):
        run(params=two)
    half = PARAMS.replace(alpha=jnp.zeros(3))  # alpha per run, the rest shared
    with pytest.raises(ValueError, match=r"\.mutation_std"):
        run(params=half)


# --- metric names say what they hold ---------------------------------------------------


def test_default_metrics_are_scores_and_custom_metrics_keep_the_properties():
    result = run()
    assert set(result.metrics) == {"train_score", "test_score"}
    np.testing.assert_array_equal(result.final_train_score, result.train_score[:, -1])
    custom = run(metrics_fn=lambda state, params, test: {"occupied": state.occupied.sum().astype(jnp.float32)})
    assert set(custom.metrics) == {"train_score", "occupied"}
    np.testing.assert_array_equal(custom.train_score, result.train_score)
    with pytest.raises(ValueError, match="no 'test_score'"):
        _ = custom.final_test_score
    assert set(run(test_data=None).metrics) == {"train_score"}


# --- the evosax adapter ----------------------------------------------------------------

ES = mj.EvosaxES.for_model(Sep_CMA_ES, P.init_model(jax.random.key(0)), population_size=4)


def test_evosax_starts_at_the_seeds_average_with_a_step_in_the_models_units():
    params = ES.default_params()
    assert params.std_init == np.float32(0.01)
    seeds = P.seed_fn(jax.random.key(3))
    state = ES.init(jax.random.key(0), seeds, jnp.zeros((2, 90)), params)
    average = jax.tree.map(lambda x: x.mean(0), seeds)
    np.testing.assert_allclose(ES.unravel(state.mean)[0].kernel, average[0].kernel, rtol=1e-6)


def test_a_budget_that_is_no_whole_generation_warns_with_what_is_spent():
    with pytest.warns(UserWarning, match="spends 98"):
        result = run(algorithm=ES, params=ES.default_params(), budget=100, log_every=50, keys=P.KEYS[:1])
    assert result.passes[-1] == 98
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(algorithm=ES, params=ES.default_params(), budget=98, log_every=50, keys=P.KEYS[:1])


# --- inputs refused early, naming the argument -----------------------------------------


def integer_seeds(key):
    models = P.seed_fn(key)
    return (models[0], models[1]._replace(bias=models[1].bias.astype(jnp.int32)))


@pytest.mark.parametrize("kwargs,message", [
    (dict(seed_fn=integer_seeds), r"leaf \[1\]\.bias is int32"),
    (dict(keys=jnp.zeros((3, 2), jnp.float32)), "PRNG key"),
    (dict(data=(P.TRAIN[0][:0], P.TRAIN[1][:0])), "data holds no datapoints"),
    (dict(test_data=(P.TEST[0][:0], P.TEST[1][:0])), "test_data holds no datapoints"),
    (dict(params=PARAMS.replace(alpha=jnp.float32(-1))), r"alpha must be finite and >= 0"),
    (dict(params=PARAMS.replace(mutation_std=jnp.float32(np.nan))), r"mutation_std must be finite"),
])
def test_bad_run_inputs_are_refused_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(**kwargs)


def list_label(path):
    return [path.split("/")[0]]


def test_unhashable_group_labels_are_refused_naming_the_leaf():
    with pytest.raises(ValueError, match="hashable.*leaf"):
        mj.leaf_groups(P.init_model(jax.random.key(0)), list_label)


def test_merge_ops_refuse_out_of_range_density_and_t():
    a, b, c = ({"w": jnp.full(4, float(i))} for i in range(1, 4))
    with pytest.raises(ValueError, match="density"):
        mj.merge_ops.ties(a, [b, c], jnp.ones(2), 1.5)
    with pytest.raises(ValueError, match="t must lie in"):
        mj.merge_ops.slerp(a, b, 2.0)
    mj.merge_ops.ties(a, [b, c], jnp.ones(2), 1.0)  # the ends stay legal
    mj.merge_ops.slerp(a, b, 1.0)


def test_one_seed_without_mutation_warns_every_child_is_a_copy():
    """init warns (while tracing: `run` calls it so) for one seed without mutation, not with two."""
    seeds = P.seed_fn(jax.random.key(5))
    one = jax.tree.map(lambda x: x[:1], seeds)
    init = lambda algorithm, models: jax.eval_shape(algorithm.init, jax.random.key(0), models,
                                                    jnp.zeros((jax.tree.leaves(models)[0].shape[0], 90)), PARAMS)
    with pytest.warns(UserWarning, match="copy"):
        init(mj.M2N2(mutation=False), one)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        init(mj.M2N2(mutation=False), seeds)
        init(mj.M2N2(mutation=True), one)


# --- the contract check names the leaf -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PythonIntScore(mj.RandomSearch):
    """A random search whose init stores its score as a Python int: tell makes it float32."""

    def init(self, key, seed_models, seed_scores, params):
        state = super().init(key, seed_models, seed_scores, params)
        return state.replace(score=0)


def test_a_state_leaf_that_changes_dtype_is_named_before_compiling():
    algorithm, params = mj.RandomSearch.example(None, 90)
    with pytest.raises(ValueError, match=r"PythonIntScore\.tell: state leaf \.score is float32\[\], init gave int32"):
        run(algorithm=PythonIntScore(population_size=3), params=params)


# --- one version, and runs labelled by their name --------------------------------------


def test_one_version():
    assert mj.__version__ == importlib.metadata.version("m2n2_jax")


@pytest.mark.parametrize("name,label", [(None, "M2N2"), ("ga", "ga")])
def test_progress_is_labelled_by_the_name(name, label, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    run(progress=True, name=name)
    shown = err.getvalue().lstrip("\r")
    assert shown.startswith("compiling:") and "\r" + label + ":" in shown, shown[:160]
