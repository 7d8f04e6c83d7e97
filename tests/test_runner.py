"""End-to-end runs of `mj.run` on the tiny problem of tests/problems.py.

What is checked: the logged curve of every kind of method (monotone only where the
method guarantees it), logging points, chunking invariance, that a run equals the
plain `init_state` + `evolve` of its key (an alpha sweep as one `vmap` over Params),
shared versus per-run seeds, custom metrics, the time limit, compilation reuse and
input validation.

Compilation dominates the time of these tests, so the M2N2 runs share two compiled
programs: a shared seed list, `counted_metrics` and 58 or 7 steps per call (budgets,
keys and Params are traced, so changing them compiles nothing). The other methods run
from per-run seeds (`seed_fn`) with the default metrics.
"""

import concurrent.futures
import dataclasses
import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import problems as P
import pytest

import m2n2_jax as mj
from experiments import methods
from m2n2_jax.checks import stack_models

ALGO, PARAMS = methods.make_method("m2n2", P.SETTINGS)  # M2N2(archive_size=20), mutation_std 0.05
N, S = ALGO.archive_size, 2  # archive slots, seed models per run

# The shared seed list committed to device 0 (as arrays restored from a checkpoint
# can be), the training data to device 1: the runner places both itself.
MODELS = [jax.device_put(P.init_model(jax.random.key(10 + i)), jax.devices()[0]) for i in range(2)]
STACKED = jax.tree.map(lambda *m: np.stack(m), *MODELS)
TRAIN_ON_1 = jax.device_put(P.TRAIN, jax.devices()[1])

TRACES = [0]  # how often counted_metrics was traced: it runs only while jax traces a program


def counted_metrics(state, params, test_data):
    """The default metrics plus the number of occupied slots; counts its traces."""
    TRACES[0] += 1
    model, _ = ALGO.best(state, params)
    return {"test_score": P.score_fn(model, test_data).mean(), "occupied": state.occupied.sum().astype(jnp.float32)}


def run(budget=60, steps_per_call=58, algorithm=ALGO, params=PARAMS, **kwargs):
    """An M2N2 run of the 3 keys from the shared seed list."""
    return mj.run(algorithm, P.KEYS, P.score_fn, TRAIN_ON_1, budget, params=params, seed_models=MODELS,
                  test_data=P.TEST, metrics_fn=counted_metrics, log_every=10, steps_per_call=steps_per_call,
                  progress=False, **kwargs)


@functools.cache
def base_run(budget=60, steps_per_call=58):
    return run(budget, steps_per_call)


@functools.cache
def _run_method(method):
    settings = P.SETTINGS
    if method == "map-elites":
        settings = dataclasses.replace(settings, map_elites=dataclasses.replace(settings.map_elites, bins=2))
    algorithm, params = methods.make_method(method, settings)
    return algorithm, mj.run(algorithm, P.KEYS, P.score_fn, P.TRAIN, 60, params=params, seed_fn=P.seed_fn,
                             test_data=P.TEST, log_every=10, progress=False)


OTHER_METHODS = ("map-elites", "slerp-grid", "sep-cma-es")
BACKGROUND = {}  # method -> Future of _run_method, computed on a second thread


def run_method(method):
    """(algorithm, result) of a 60-pass run of any method of the menu from per-run seeds
    (seed_fn), default metrics. MAP-Elites gets 2 x 2 cells, so that children often land
    in the best cell (with P.SETTINGS' 10 x 10 cells a best cell overwritten by a worse
    child would go unseen in 58 steps)."""
    return BACKGROUND[method].result() if method in BACKGROUND else _run_method(method)


@pytest.fixture(scope="module", autouse=True)
def compile_other_methods_on_a_second_thread(request):
    """XLA compiles with the GIL released: the other methods' programs compile on a
    second core while the M2N2 tests run (only those that the selected tests need)."""
    selected = [item.nodeid for item in request.session.items if item.nodeid.startswith(request.node.nodeid)]
    needed = [m for m in OTHER_METHODS if any(f"[{m}-" in n for n in selected)]
    if any("test_seed_fn_gives" in n for n in selected) and "slerp-grid" not in needed:
        needed.append("slerp-grid")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        BACKGROUND.update({m: executor.submit(_run_method, m) for m in needed})
        yield
        BACKGROUND.clear()


def np_mlp_accuracy(model, data):
    """NumPy reference of P.score_fn's mean: argmax of the float64 MLP == label."""
    x, y = (np.asarray(a) for a in data)
    h = np.asarray(x, np.float64)
    for i, layer in enumerate(model):
        h = h @ np.asarray(layer.kernel, np.float64) + np.asarray(layer.bias, np.float64)
        if i < len(model) - 1:
            h = np.maximum(h, 0)
    return float(np.mean(h.argmax(-1) == y))


def np_logged_passes(num_seeds, pop, budget, log_every):
    """Pass counts logged: where the count reaches or crosses a multiple of log_every, and the end."""
    steps = (budget - num_seeds) // pop
    passes = [num_seeds + pop * k for k in range(steps + 1)]
    multiples = range(log_every, budget + 1, log_every)
    out = []
    for k, p in enumerate(passes):
        prev = passes[k - 1] if k else num_seeds - 1
        if any(prev < m <= p for m in multiples) or k == steps:
            out.append(p)
    return np.array(out)


def row(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_results_equal(a, b):
    np.testing.assert_array_equal(a.passes, b.passes)
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        np.testing.assert_array_equal(a.metrics[k], b.metrics[k], err_msg=k)
    assert_trees_equal(a.state, b.state)
    assert_trees_equal(a.best_models, b.best_models)


# ---------------------------------------------------------------- determinism and equivalences

def test_chunking_into_calls_does_not_change_anything():
    assert_results_equal(base_run(60, 7), base_run(60, 58))


def test_runs_differ_between_keys():
    state = base_run().state
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        assert not np.array_equal(state.scores[i], state.scores[j])


def one_run(params, key, num_steps=58):
    """What `run` does for one key, written with the public pieces: init_state + evolve."""
    init_key, evo_key = jax.random.split(key)
    state, _ = mj.init_state(ALGO, P.score_fn, init_key, STACKED, params, P.TRAIN)
    return mj.evolve(ALGO, P.score_fn, state, evo_key, params, P.TRAIN, num_steps)


@jax.jit
def alpha_sweep(alphas, key):
    """One program: a vmap over Params with alpha batched."""
    axes = jax.tree.map(lambda _: None, PARAMS).replace(alpha=0)
    return jax.vmap(one_run, (axes, None))(PARAMS.replace(alpha=alphas), key)


def test_alpha_sweep_as_one_vmap_equals_separate_runs():
    alphas = np.array([0.0, 0.5, 1.0, 2.0], np.float32)
    swept = alpha_sweep(jnp.asarray(alphas), P.KEYS[0])  # leaves (4 alphas, ...)
    for i, alpha in enumerate(alphas):
        separate = base_run() if alpha == 1 else run(params=PARAMS.replace(alpha=jnp.float32(alpha)))
        separate = row(separate.state, 0)
        mine = row(swept, i)
        # The archives hold the same models: identical scores and occupancy, parameters
        # equal up to float rounding (a vmapped program may fuse arithmetic differently).
        np.testing.assert_array_equal(mine.scores, separate.scores)
        np.testing.assert_array_equal(mine.occupied, separate.occupied)
        chex.assert_trees_all_close(mine.models, separate.models, rtol=1e-5, atol=1e-6)
    # Alpha matters here, so the sweep really evaluated different hyperparameters.
    assert not np.array_equal(swept.scores[0], swept.scores[2])
    assert not np.array_equal(swept.scores[2], swept.scores[3])


# ---------------------------------------------------------------- seeds: shared list vs seed_fn

def test_a_shared_seed_list_starts_every_run_from_the_same_models():
    # 16 steps: the archive (20 slots) still has empty slots, which a child always takes
    # first, so slots 0 and 1 still hold the initial archive's seeds, untouched.
    state = base_run(S + 16, 7).state
    for r in range(3):
        assert_trees_equal(jax.tree.map(lambda x: x[r, :S], state.models), STACKED)
    np.testing.assert_array_equal(np.asarray(state.occupied), np.broadcast_to(np.arange(N) < S + 16, (3, N)))
    # The children differ: each run has its own key.
    assert not np.array_equal(state.models[0].kernel[0, S], state.models[0].kernel[1, S])


def test_donated_seeds_are_deleted_once_stacked_and_change_nothing():
    """donate_seeds: the run equals base_run, and the given seeds' arrays are deleted
    (numpy leaves left alone); without it they are not (the counter-case). An array
    filling two leaves (a tied weight) is deleted only after its last leaf is stacked."""
    copies = [jax.tree.map(jnp.array, m) for m in MODELS]
    donated = mj.run(ALGO, P.KEYS, P.score_fn, TRAIN_ON_1, 60, params=PARAMS, seed_models=copies, donate_seeds=True,
                     test_data=P.TEST, metrics_fn=counted_metrics, log_every=10, steps_per_call=58, progress=False)
    assert_trees_equal(donated.state.models, base_run(60, 58).state.models)
    assert all(x.is_deleted() for x in jax.tree.leaves(copies))
    assert not any(x.is_deleted() for x in jax.tree.leaves(MODELS))  # base_run kept them
    tied = jnp.arange(3.0)
    models = [{"a": tied, "b": tied, "c": np.ones(2)}, {"a": jnp.zeros(3), "b": tied, "c": np.zeros(2)}]
    stacked = stack_models(models, donate=True)
    np.testing.assert_array_equal(np.asarray(stacked["b"]), [[0, 1, 2], [0, 1, 2]])
    assert tied.is_deleted() and isinstance(models[0]["c"], np.ndarray)
    with pytest.raises(ValueError, match="donate_seeds applies to seed_models"):
        mj.run(ALGO, P.KEYS, P.score_fn, P.TRAIN, 60, seed_fn=lambda k: STACKED, donate_seeds=True, progress=False)


def test_metrics_fn_is_logged_at_every_point():
    result = base_run()
    assert set(result.metrics) == {"train_score", "test_score", "occupied"}
    np.testing.assert_array_equal(result.passes, np.arange(10, 61, 10))
    for values in result.metrics.values():
        assert values.shape == (3, 6) and np.all(np.isfinite(values))
    # Every valid child takes an empty slot while there is one: min(S + steps, N) models.
    steps = (result.passes - S) // ALGO.population_size
    np.testing.assert_array_equal(result.metrics["occupied"], np.broadcast_to(np.minimum(S + steps, N), (3, 6)))


def test_an_equal_algorithm_value_reuses_the_compiled_program():
    base_run(S + 16, 7)
    traces = TRACES[0]
    assert traces > 0  # the counter sees tracing
    fresh, fresh_params = methods.make_method("m2n2", P.SETTINGS)  # new, equal values
    assert fresh is not ALGO and fresh == ALGO and fresh_params is not PARAMS
    run(S + 16, 7, algorithm=fresh, params=fresh_params)
    run(S + 30, 7, algorithm=fresh, params=fresh_params.replace(alpha=jnp.float32(0.5)))  # budget, alpha: traced
    assert TRACES[0] == traces


# ---------------------------------------------------------------- time limit

def test_time_limit_stops_early_at_the_passes_spent():
    stopped = run(60, 7, time_limit=1e-9)
    assert stopped.stopped_by_time_limit
    # Stopped after its first call of 7 steps: 2 + 7 passes; that point is measured and logged.
    np.testing.assert_array_equal(stopped.passes, [S + 7])
    assert np.all(np.isfinite(stopped.test_score))
    stamps = stopped.log_wall_seconds
    assert stamps.shape == (1,) and stamps[0] <= stopped.wall_seconds
    uninterrupted = base_run(S + 7, 7)  # the same 7 steps, to the end of its budget
    assert not uninterrupted.stopped_by_time_limit
    assert_results_equal(stopped, uninterrupted)
    # A limit that is never reached changes nothing.
    generous = run(60, 7, time_limit=1e6)
    assert not generous.stopped_by_time_limit
    assert_results_equal(generous, base_run(60, 7))


# ---------------------------------------------------------------- validation

def seed_list(n=2):
    return [P.init_model(jax.random.key(i)) for i in range(n)]


def with_nan(model):
    return jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), model)


@pytest.mark.parametrize("kwargs, message", [
    ({"log_every": 0}, "log_every must be an int >= 1"),
    ({"log_every": 2.5}, "log_every must be an int >= 1"),
    ({"steps_per_call": 0}, "steps_per_call"),
    ({"chunk_size": -1}, "chunk_size"),
    ({"time_limit": 0}, "time_limit"),
    ({"forward_passes": 2}, r"forward_passes must be an int >= seeds \+ population = 2 \+ 1, got 2"),
    ({"forward_passes": 2.5}, "forward_passes"),
    ({"seed_models": seed_list()}, "exactly one of seed_models"),  # and seed_fn
    ({"seed_fn": None}, "exactly one of seed_models"),  # neither
    ({"seed_fn": None, "seed_models": []}, "at least one seed model"),
    ({"seed_fn": None, "seed_models": [with_nan(seed_list()[0])] * 2}, "non-finite"),
    ({"score_fn": lambda p, b: P.score_fn(p, b)[:5]}, r"shape \(90,\), got \(5,\)"),
    ({"score_fn": lambda p, b: P.score_fn(p, b)[None]}, r"shape \(90,\)"),
    ({"data": (P.X[:90], P.Y[:80])}, "leading axis"),
    ({"data": (P.X[:90, :5], P.Y[:90])}, "wrong data shape"),
    ({"test_data": P.TEST[0]}, "same pytree structure"),
    ({"key": P.KEYS[:0]}, "at least one"),
    ({"key": jnp.zeros((2, 2, 2), jnp.uint32)}, "1-D batch"),
    ({"algorithm": "m2n2"}, "must be an m2n2_jax.Algorithm"),
])
def test_run_rejects_bad_input_with_a_clear_message(kwargs, message):
    args = dict(algorithm=ALGO, key=P.KEYS, score_fn=P.score_fn, data=P.TRAIN, forward_passes=20, params=PARAMS,
                seed_fn=P.seed_fn, test_data=P.TEST, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        mj.run(**args)


def test_budget_must_cover_the_seeds_and_one_population():
    es, params = methods.make_method("sep-cma-es", P.SETTINGS)  # population 4
    with pytest.raises(ValueError, match=r"seeds \+ population = 3 \+ 4, got 6"):
        mj.run(es, P.KEYS, P.score_fn, P.TRAIN, 6, params=params, seed_models=seed_list(3), progress=False)


def test_an_invalid_child_is_reported_with_its_run_and_step():
    # mutation_std is traced: an infinite one makes the first child non-finite (base program).
    with pytest.raises(ValueError, match=r"run 0: a child of step 1 had non-finite parameters"):
        run(params=PARAMS.replace(mutation_std=jnp.float32(jnp.inf)))


def test_seed_models_must_match():
    a = P.init_model(jax.random.key(0))
    b = P.init_model(jax.random.key(1))
    wide = (b[0]._replace(kernel=jnp.zeros((8, 17))), b[1])
    with pytest.raises(ValueError, match=r"seed model 1 leaf \[0\]\.kernel is float32\[8, 17\]"):
        mj.run(ALGO, P.KEYS, P.score_fn, P.TRAIN, 10, seed_models=[a, wide], progress=False)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), a)
    with pytest.raises(ValueError, match="bfloat16"):
        mj.run(ALGO, P.KEYS, P.score_fn, P.TRAIN, 10, seed_models=[a, half], progress=False)
    with pytest.raises(ValueError, match="structure"):
        mj.run(ALGO, P.KEYS, P.score_fn, P.TRAIN, 10, seed_models=[a, {"other": a}], progress=False)


def test_seeds_of_another_structure_name_the_first_path_that_differs():
    """2 vs 3 layers: the message names the layer, not two whole tree definitions."""
    layer = {"attn": {"weight": jnp.zeros((2, 2))}, "norm": {"weight": jnp.ones(2)}}
    three = {"params": {"embed": jnp.zeros((3, 2)), **{f"layers_{i:02d}": layer for i in range(3)}}}
    two = {"params": {k: v for k, v in three["params"].items() if k != "layers_02"}}
    for models, message in [([two, three], "seed model 1 has a different pytree structure than model 0: "
                                           "['params']['layers_02'] only in model 1"),
                            ([three, three, two], "seed model 2 has a different pytree structure than model 0: "
                                                  "['params']['layers_02'] only in model 0")]:
        with pytest.raises(ValueError) as error:
            stack_models(models)
        assert str(error.value) == message
    with pytest.raises(ValueError, match=r"\['b'\] is a leaf in model 0 and a subtree in model 1"):
        stack_models([{"a": jnp.zeros(1), "b": jnp.zeros(1)}, {"a": jnp.zeros(1), "b": {"c": jnp.zeros(1)}}])
    with pytest.raises(ValueError, match="same paths, other node types") as error:
        stack_models([(jnp.zeros(1), jnp.zeros(1)), [jnp.zeros(1), jnp.zeros(1)]])
    assert len(str(error.value)) < 300


def test_unknown_method_and_missing_settings():
    with pytest.raises(ValueError, match="unknown method 'cma'"):
        methods.make_method("cma")
    with pytest.raises(ValueError, match="descriptor"):
        methods.make_method("map-elites", methods.Settings())


# ---------------------------------------------------------------- every kind of method

def np_best_train(algorithm, state):
    """NumPy reference of the training score `best` reports, from the final state."""
    if isinstance(algorithm, (mj.M2N2, mj.MapElites)):
        means = np.asarray(state.scores, np.float64).mean(-1)
        return np.where(np.asarray(state.occupied), means, -np.inf).max(-1)
    if isinstance(algorithm, mj.SlerpGrid):
        return np.asarray(state.best_score)
    return -np.asarray(state.best_fitness)  # evosax minimises -score


# (method, is its best training score guaranteed never to decrease?)
METHOD_CASES = [
    ("m2n2", False),  # no: the best-train model can leave, fitness is resource-normalised
    ("map-elites", True),  # a filled cell only ever takes a strictly better model
    ("slerp-grid", True),  # the best ratio so far
    ("sep-cma-es", True),  # evosax's best-so-far
]


@pytest.mark.parametrize("method, monotone", METHOD_CASES)
def test_every_kind_of_method_runs_end_to_end(method, monotone):
    algorithm, result = (ALGO, base_run()) if method == "m2n2" else run_method(method)
    np.testing.assert_array_equal(result.passes, np_logged_passes(S, algorithm.population_size, 60, 10))
    if method == "sep-cma-es":  # population 4: passes 2, 6, 10, ...; 22 and 42 are where 20 and 40 are crossed
        np.testing.assert_array_equal(result.passes, [10, 22, 30, 42, 50, 58])
    R, L = 3, len(result.passes)
    for name in ("train_score", "test_score"):
        values = result.metrics[name]
        assert values.shape == (R, L) and np.all((values >= 0) & (values <= 1)), name
    stamps = result.log_wall_seconds
    assert stamps.shape == (L,) and np.all(np.diff(stamps) >= 0) and stamps[-1] <= result.wall_seconds
    assert not result.stopped_by_time_limit
    chex.assert_tree_all_finite(result.best_models)
    # The last logged point is the final state: train from the state, test from best_models.
    np.testing.assert_allclose(result.final_train_score, np_best_train(algorithm, result.state), rtol=1e-6)
    np.testing.assert_allclose(result.final_test_score,
                               [np_mlp_accuracy(row(result.best_models, r), P.TEST) for r in range(R)])
    if monotone:
        assert np.all(np.diff(result.train_score, axis=1) >= 0), result.train_score


def test_evolution_improves_on_the_best_seed():
    result = base_run(S + 58 * 4)  # the base program, four calls
    best_seed = max(np_mlp_accuracy(m, P.TRAIN) for m in MODELS)
    assert np.all(result.final_train_score > best_seed), (result.final_train_score, best_seed)


def test_seed_fn_gives_every_run_its_own_seeds():
    _, result = run_method("slerp-grid")  # its state keeps the two seeds
    init_keys = jax.vmap(lambda k: jax.random.split(k)[0])(P.KEYS)
    for r in range(3):
        assert_trees_equal(row(result.state.seeds, r), jax.jit(P.seed_fn)(init_keys[r]))
    assert not np.array_equal(result.state.seeds[0].kernel[0], result.state.seeds[0].kernel[1])


def test_checkpoint_metadata_names_functions_not_addresses():
    """M2N2(groups=fn) is described by fn's module and name (a fresh process that resumes
    gets another address for the same function), and two functions differ."""
    from m2n2_jax.runner import _describe
    from m2n2_jax.tasks.digits import layer_of

    def other(path):
        return path

    described = _describe(mj.M2N2(groups=layer_of))
    assert "groups=m2n2_jax.tasks.digits.layer_of" in described and "0x" not in described
    assert _describe(mj.M2N2(groups=other)) != described
    assert "0x" in repr(mj.M2N2(groups=layer_of))  # what the plain repr would have stored
    assert "groups=PathPrefix(depth=2)" in _describe(mj.M2N2(groups=mj.PathPrefix(2)))


# --- the schedule: decided once on the host --------------------------------------------


@pytest.mark.parametrize("seeds,pop,budget,log_every,every",
                         [(2, 1, 60, 10, None), (1, 4, 83, 7, 12), (3, 5, 53, 100, 5)])
def test_schedule_logs_and_checkpoints_where_the_pass_count_crosses_a_multiple(seeds, pop, budget, log_every, every):
    """Against a plain loop over the steps: step i ends at S + i P passes; it is logged
    when [S + (i - 1) P, S + i P] crossed a multiple of log_every (the seeds: when S is
    one), and the last step always; likewise checkpoints."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # budgets that are no whole step
        plan = mj.schedule(seeds, pop, budget, log_every, None, every)
    steps = (budget - seeds) // pop
    passes = [seeds + i * pop for i in range(steps + 1)]
    crossed = lambda i, n: any(p % n == 0 for p in range(passes[i] - (pop if i else 1) + 1, passes[i] + 1))
    assert plan.num_steps == steps and list(plan.passes(np.arange(steps + 1))) == passes
    assert list(plan.log) == [crossed(i, log_every) or i == steps for i in range(steps + 1)]
    if every is not None:
        assert list(plan.checkpoint[1:]) == [crossed(i, every) for i in range(1, steps + 1)]
        assert plan.call_steps <= max(1, every // pop)
    active, logged = plan.call(steps - 1)  # the last call: one step left
    assert active.sum() == 1 and logged[0] and not logged[1:].any()


def test_run_logs_exactly_the_schedules_points():
    result = base_run()
    plan = mj.schedule(2, 1, 60, 10)
    np.testing.assert_array_equal(result.passes, plan.passes(np.flatnonzero(plan.log)))


def test_progress_shows_compilation_as_its_own_phase_and_the_best_train_score(monkeypatch):
    """The bar says "compiling" until the first compiled call returns; then its clock
    restarts and its initial count is the passes of that call, so the rate and the
    ETA leave the compilation out. Its postfix is the best training score so far."""
    import io

    from tqdm.std import tqdm as plain_tqdm

    from m2n2_jax import runner

    bars = []

    def recording_tqdm(**kwargs):
        bar = plain_tqdm(file=io.StringIO(), mininterval=0, **kwargs)
        bars.append((bar, bar.start_t))
        return bar

    monkeypatch.setattr(runner, "tqdm", recording_tqdm)
    result = mj.run(ALGO, P.KEYS, P.score_fn, TRAIN_ON_1, 60, params=PARAMS, seed_models=MODELS, test_data=P.TEST,
                    metrics_fn=counted_metrics, log_every=10, steps_per_call=7)
    (bar, created), text = bars[0], bars[0][0].fp.getvalue()
    assert text.index("compiling") < text.index("M2N2") and "compiling" not in text[text.index("M2N2"):]
    assert bar.initial == 3 * (S + 7) and bar.n == 3 * 60  # 3 runs; the first call's 7 steps left out
    assert bar.start_t > created
    best = max(result.train_score.max(), max(np_mlp_accuracy(m, P.TRAIN) for m in MODELS))
    assert bar.postfix == f"best {best:.4f}" and text.rstrip().endswith(f"best {best:.4f}]")
