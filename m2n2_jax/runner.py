"""One runner for every method: a jittable scan body and a thin host driver.

`step` (one ask / evaluate / tell) is the scan body of every run and can be called
inside a user's own `jit`; `evolve` scans it. `run` adds what a long run needs on the
host, in this order: validate the arguments, lay the run out on a ("runs", "data",
"model") mesh (`layout.Layout`), start (or resume from a checkpoint), loop over
compiled calls (progress, logging, checkpoints, a time limit), finish. `lower_step`
gives the step program of a layout to compile or inspect. Independent runs (one per
key) share one compiled call; each step's key is `fold_in(run_key, step)`, so results
do not depend on how steps are chunked into calls, and a resumed run ends
bit-identical. The budget counts forward passes: the S seed models cost S, each step
P (the algorithm's population size).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from tqdm.auto import tqdm

from m2n2_jax import host_memory
from m2n2_jax.base import Algorithm
from m2n2_jax.checkpoint import Checkpointing, Store
from m2n2_jax.checks import check_finite_models, check_float_leaves, check_scores, stack_models, valid_children
from m2n2_jax.layout import Layout, lay_out, pad_runs, pad_size
from m2n2_jax.scoring import evaluate, num_points
from m2n2_jax.sharding import check_mesh, default_mesh, from_process_0, on_device, to_host


def step(algorithm: Algorithm, score_fn: Callable, state, key: jax.Array, params, data):
    """One ask / evaluate / tell. Children with non-finite parameters or scores outside
    [0, 1] are not told; `ok` says whether they were all valid.

    Args:
      score_fn: (model, data) -> per-datapoint scores (M,) in [0, 1], maximised.

    Returns:
      (state, ok).
    """
    key_ask, key_tell = jax.random.split(key)
    children, state = algorithm.ask(key_ask, state, params)
    scores = jax.lax.map(lambda child: score_fn(child, data).astype(jnp.float32), children)
    ok = valid_children(children, scores)
    state = jax.lax.cond(ok, lambda s: algorithm.tell(key_tell, s, children, scores, params), lambda s: s, state)
    return state, ok


def init_state(algorithm: Algorithm, score_fn: Callable, key: jax.Array, seed_models, params, data):
    """(state, seed scores (S, M)): the seeds (stacked (S, ...)) scored and handed to `algorithm.init`."""
    scores = jax.lax.map(lambda m: score_fn(m, data).astype(jnp.float32), seed_models)
    return algorithm.init(key, seed_models, scores, params), scores


def evolve(algorithm: Algorithm, score_fn: Callable, state, key: jax.Array, params, data, num_steps: int):
    """`num_steps` steps of one run in a `lax.scan`; step i uses `fold_in(key, i)`."""
    body = lambda s, i: step(algorithm, score_fn, s, jax.random.fold_in(key, i), params, data)
    return jax.lax.scan(body, state, jnp.arange(num_steps))[0]


def test_score_metrics(algorithm: Algorithm, score_fn: Callable) -> Callable:
    """The default `metrics_fn`: {"test_score": the best-train model's mean score on
    the test data}, or nothing without test data."""

    def metrics_fn(state, params, test_data):
        if test_data is None:
            return {}
        model, _ = algorithm.best(state, params)
        return {"test_score": score_fn(model, test_data).mean().astype(jnp.float32)}

    return metrics_fn


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What `run` returns (host NumPy arrays but the state; R runs, L logged points).

    Attributes:
      passes: (L,) forward passes spent at each logged point.
      metrics: name -> (R, L) values at each logged point: always "train_score" (the
        mean training score that `algorithm.best` reports), and what `metrics_fn`
        returns (by default "test_score", the best-train model's mean score on the
        test data, when there are test data).
      state: final algorithm state of every run, stacked (leading axis R): jax Arrays
        sharded over the mesh's "runs" axis; with several processes (jax.distributed),
        host NumPy arrays gathered to every process.
      best_models: `algorithm.best`'s model of every run, stacked (leading axis R), placed like `state`.
      wall_seconds: time of the evolution, compilation included.
      log_wall_seconds: (L,) wall time when each logged point reached the host.
      stopped_by_time_limit: the run stopped before its budget (see `run`'s time_limit).
    """

    passes: np.ndarray
    metrics: dict
    state: Any
    best_models: Any
    wall_seconds: float
    log_wall_seconds: np.ndarray
    stopped_by_time_limit: bool = False

    def _metric(self, name: str) -> np.ndarray:
        if name not in self.metrics:
            raise ValueError(f"this run logged no {name!r} (its metrics: {sorted(self.metrics)}); "
                             "test_score needs test_data, and a custom metrics_fn must return it")
        return self.metrics[name]

    @property
    def train_score(self) -> np.ndarray:
        """(R, L) mean training score of the model `best` returns."""
        return self._metric("train_score")

    @property
    def test_score(self) -> np.ndarray:
        """(R, L) mean test score of the best-train model."""
        return self._metric("test_score")

    @property
    def final_train_score(self) -> np.ndarray:
        return self.train_score[:, -1]

    @property
    def final_test_score(self) -> np.ndarray:
        return self.test_score[:, -1]


def run(
    algorithm: Algorithm,
    key,
    score_fn: Callable,
    data,
    forward_passes: int,
    *,
    params=None,
    seed_models: Sequence | None = None,
    seed_fn: Callable | None = None,
    donate_seeds: bool = False,
    test_data=None,
    metrics_fn: Callable | None = None,
    log_every: int = 100,
    chunk_size: int | None = None,
    steps_per_call: int | None = None,
    mesh: Mesh | None = None,
    model_specs=None,
    archive_memory: str = "device",
    checkpoint: Checkpointing | None = None,
    time_limit: float | None = None,
    progress: bool = True,
    name: str | None = None,
) -> RunResult:
    """Run `algorithm` for `forward_passes` forward passes, one run per key.

    Args:
      algorithm: any `Algorithm` (M2N2, MapElites, EvosaxES, SlerpGrid, yours).
      key: a typed PRNG key (`jax.random.key`) or raw uint32 key data, or a 1-D batch
        of R of them for R independent runs.
      score_fn: (model, batch) -> per-datapoint scores (M,) in [0, 1], maximised.
      data: training datapoints, a pytree whose leaves share a leading axis M >= 1.
      forward_passes: total budget, seeds included: S + k P for k >= 1 steps of P
        children (a remainder that is no whole step is not spent, with a warning).
      params: the algorithm's hyperparameters (default `algorithm.default_params()`):
        shared by the runs, or per run, when every leaf has a leading axis R (and the
        default's leaves one more dimension than `default_params()`'s), e.g. a sweep
        over alpha: `params.replace(alpha=jnp.array([0., .5, 1.]))` with 3 keys.
      seed_models: S model pytrees shared by every run (merging pre-trained models), or
      seed_fn: key -> models stacked (S, ...), each run's own seeds (from scratch).
      donate_seeds: delete `seed_models`' jax.Array leaves once they are stacked, as
        jit's donation does: the run then holds one copy of the seeds, not two (a
        135M-parameter pair: 1.08 GB less). The caller must not use them afterwards.
        Once the seeds are stacked, once the run has started, once the step has
        compiled (before its first call) and after that call, the pages of freed host
        heap are handed back to the system (`host_memory.release`).
      test_data: datapoints given to `metrics_fn` (like `data`).
      metrics_fn: (state, params, test_data) -> dict of scalars, logged besides
        "train_score" (default `test_score_metrics`: "test_score" when there are test
        data). It sees one run's state and params, and the whole test set on every device.
      log_every: log when the pass count reaches a multiple of this, and at the end.
      chunk_size: score datapoints this many at a time (`lax.map`), bounding memory.
      steps_per_call: steps per compiled call (progress and time-limit granularity).
      mesh: a Mesh with axes ("runs", "data", "model") (or ("runs", "data")), e.g.
        `jax.make_mesh((2, 2, 2), ("runs", "data", "model"))`: runs split over "runs",
        training datapoints over "data" (each device scores its slice; scores are
        gathered), every model's leaves over "model" (the archive, seeds, parents,
        child and noise; `score_fn` receives the child so sharded, and XLA partitions
        it). Default (`sharding.default_mesh`): runs over as many devices as there are
        runs, the rest share the datapoints, model axis 1. R and M are padded with
        copies of the last run / datapoint, dropped from the result. After
        `jax.distributed.initialize()` every process calls `run` alike, and the mesh
        must hold devices of every process (the default takes the global `jax.devices()`).
      model_specs: a PartitionSpec per model leaf (a pytree like one model, naming
        "model" or None per dimension, e.g. from flax's partitioning annotations);
        default `sharding.model_specs`: a matrix's largest dimension but the last
        that the model axis divides; vectors and leaves with none replicated.
      archive_memory: "device", or "pinned_host" to keep the archive's models in host
        memory (an `Archive` in the algorithm's state): each step brings the two
        parents to the device and writes the child back; results are unchanged.
      checkpoint: save the whole run with orbax when the pass count crosses a multiple
        of `checkpoint.every` (and at the end); with `resume`, continue from the
        latest, refused (naming what differs) unless the algorithm, each params field,
        the budget, the keys, the seeds, the training data and the score_fn's name match.
      time_limit: seconds; stop after the first call that ends past it (on process 0's
        clock). The result then ends at the passes actually spent, its last point measured there.
      progress: show a progress bar (on process 0 only): "compiling" until the first
        compiled call returns (its rate and ETA count the calls after it), then `name`
        and the best training score logged so far.
      name: the progress bar's label (default: the algorithm's class name).

    Returns:
      RunResult.
    """
    # Validate, and lay the run out on the devices.
    keys, params, per_run = _check_arguments(algorithm, key, params, data, test_data, log_every=log_every,
                                             steps_per_call=steps_per_call, chunk_size=chunk_size,
                                             time_limit=time_limit)
    mesh = check_mesh(default_mesh(keys.shape[0]) if mesh is None else mesh)
    run_keys = pad_runs(keys, pad_size(keys.shape[0], mesh.shape["runs"]))
    init_keys, evo_keys = jax.vmap(jax.random.split, out_axes=1)(run_keys)
    seeds, shared, one_run_seeds = _seeds(algorithm, seed_models, seed_fn, init_keys, donate_seeds)
    host_memory.release()  # the freed leaves of donated seeds, and what loading them left
    layout = lay_out(algorithm, score_fn, one_run_seeds, data, params=params, per_run=per_run, shared=shared,
                     num_runs=keys.shape[0], test_data=test_data, mesh=mesh, model_specs=model_specs,
                     archive_memory=archive_memory, chunk_size=chunk_size, metrics_fn=metrics_fn)
    num_seeds = jax.tree.leaves(one_run_seeds)[0].shape[0]
    del one_run_seeds  # shapes only from here: a copy of a model held through the run is memory the steps need
    plan = schedule(num_seeds, algorithm.population_size, forward_passes, log_every, steps_per_call,
                    None if checkpoint is None else checkpoint.every)
    algorithm.check_budget(plan.num_steps * algorithm.population_size)
    store = None if checkpoint is None else _store(checkpoint, layout, plan, forward_passes, log_every, run_keys,
                                                    data, params, seeds)
    params, seeds, data, test_data = layout.place(params, seeds, data, test_data)
    # Start or resume, then loop over compiled calls.
    state, log, done, saved = _start_or_resume(layout, plan, store, seeds, init_keys, run_keys, params, data,
                                               test_data)
    del seeds  # placed copies: with a large model, device memory the steps need
    host_memory.release()  # what compiling the start (init or resume) left
    bar = _Progress(tqdm(total=layout.num_runs * plan.passes(plan.num_steps),
                         initial=layout.num_runs * plan.passes(done), unit="pass",
                         disable=not progress or jax.process_index() != 0, desc="compiling"),
                    name or type(algorithm).__name__, log)
    state, done, stopped = _loop(layout, plan, store, state, log, done, saved, evo_keys, run_keys, params, data,
                                 test_data, time_limit, bar)
    bar.close()
    return _finish(layout, plan, state, log, done, stopped, params, test_data)


class _Progress:
    """`run`'s progress bar: "compiling" until the first compiled call returns, whose
    time (mostly compilation) is then kept out of the rate and the ETA; the best
    training score logged so far (over the runs) in the postfix."""

    def __init__(self, bar, desc: str, log: _Log):
        self.bar, self.desc, self.log, self.best, self.compiling = bar, desc, log, -np.inf, True
        self._note(np.concatenate(log.metrics["train_score"], axis=1))  # the seeds' (or the resumed run's)

    def _note(self, train_scores) -> None:
        finite = np.asarray(train_scores)[np.isfinite(train_scores)]
        self.best = max(self.best, float(finite.max())) if finite.size else self.best
        self.bar.set_postfix_str(f"best {self.best:.4f}", refresh=False)

    def update(self, passes: int) -> None:
        """After each compiled call (`log` already holds its metrics)."""
        self._note(self.log.metrics["train_score"][-1])
        if not self.compiling:
            self.bar.update(passes)
            return
        self.compiling = False  # the clock restarts here: the rate counts the calls after this one
        self.bar.set_description_str(self.desc, refresh=False)
        self.bar.n = self.bar.initial = self.bar.last_print_n = self.bar.n + passes
        if not self.bar.disable:  # tqdm's own clock (a disabled bar has none)
            self.bar.start_t = self.bar.last_print_t = self.bar._time()
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _check_arguments(algorithm, key, params, data, test_data, **settings):
    """(keys (R,), params as host NumPy, per_run), or ValueError naming the argument."""
    if not isinstance(algorithm, Algorithm):
        raise ValueError(f"algorithm must be an m2n2_jax.Algorithm, got {type(algorithm).__name__}")
    keys = _as_run_keys(key)
    for arg in ("log_every", "steps_per_call", "chunk_size"):
        value = settings[arg]
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
    if settings["time_limit"] is not None and not settings["time_limit"] > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {settings['time_limit']!r}")
    num_points(data, "data")
    if test_data is not None:
        num_points(test_data, "test_data")
        if jax.tree.structure(test_data) != jax.tree.structure(data):
            raise ValueError("test_data must have the same pytree structure as data")
    params, per_run = check_params(algorithm, algorithm.default_params() if params is None else params, keys.shape[0])
    return keys, params, per_run


def _store(checkpoint: Checkpointing, layout: Layout, plan: Schedule, forward_passes: int, log_every: int,
           run_keys, data, params, seeds) -> Store:
    """The run's checkpoint store; its metadata (digests of the host values, before
    placing: of each shared seed too, so a resume names the seed that differs) must
    match for a resume."""
    return Store(checkpoint, {
        "algorithm": _describe(layout.algorithm), "forward_passes": int(forward_passes),
        "training_data": _digest(data), "params": _field_digests(layout.padded_params(params)),
        "num_runs": int(layout.num_runs), "num_seeds": int(plan.num_seeds), "log_every": log_every,
        "runs_padded_to": int(run_keys.shape[0]),  # by the mesh's "runs" axis: resume on the same layout
        "models": [[list(x.shape), str(x.dtype)] for x in jax.tree.leaves(layout.model)],
        "seeds": {f"model {i}": _digest(jax.tree.map(lambda x: x[i], seeds)) for i in range(plan.num_seeds)}
        if layout.shared else "drawn by seed_fn from the keys",
        "score_fn": _qualified_name(layout.score_fn),
    })


@dataclasses.dataclass
class _Log:
    """What a run has logged so far: {metric: [(R, n) host arrays]} and the wall
    seconds since `t0` of each logged point, one entry per compiled call."""

    t0: float
    metrics: dict
    stamps: list

    def add(self, metrics: dict, count: int) -> None:
        for k, v in metrics.items():
            self.metrics[k].append(to_host(v)[:, :count])
        self.stamps.append(np.full(count, time.perf_counter() - self.t0))

    def arrays(self) -> tuple[dict, np.ndarray]:
        return {k: np.concatenate(v, axis=1) for k, v in self.metrics.items()}, np.concatenate(self.stamps)


def _start_or_resume(layout: Layout, plan: Schedule, store: Store | None, seeds, init_keys, run_keys, params, data,
                     test_data) -> tuple[Any, _Log, int, int | None]:
    """(state, log, steps done, passes resumed at or None): every run's `init` on the
    scored seeds, or the latest checkpoint when `store` resumes one."""
    resumed_at = None if store is None else store.start()
    t0 = time.perf_counter()
    state, seed_scores, metrics = _init_program(seeds, init_keys, params, data, test_data, layout=layout)
    check_scores(to_host(seed_scores), layout.num_points, "seed models")
    log = _Log(t0, {k: [to_host(v)[:, None]] for k, v in metrics.items()}, [np.full(1, time.perf_counter() - t0)])
    if resumed_at is None:
        return state, log, 0, None
    done = plan.steps_at(resumed_at)
    state, restored, wall = store.restore(resumed_at, state, run_keys, list(log.metrics), done + 1)
    return state, _Log(time.perf_counter() - wall[-1], {k: [v] for k, v in restored.items()}, [wall]), done, resumed_at


def _loop(layout: Layout, plan: Schedule, store: Store | None, state, log: _Log, done: int, saved: int | None,
          evo_keys, run_keys, params, data, test_data, time_limit: float | None, bar) -> tuple[Any, int, bool]:
    """(state, steps done, stopped by the time limit): compiled calls until the budget
    is spent or the time limit passed, checkpointing as `plan` says and at the end
    (`saved`: the passes of the latest checkpoint)."""
    stopped, first = False, True
    while done < plan.num_steps and not stopped:
        active, logged = plan.call(done)
        if first:  # compiled apart, so that what compiling left is handed back before the call's temporaries
            _step_program.lower(state, evo_keys, params, done, active, logged, data, test_data,
                                layout=layout).compile()
            host_memory.release()
        state, metrics, ok = _step_program(state, evo_keys, params, done, active, logged, data, test_data,
                                           layout=layout)
        count = int(active.sum())
        ok = to_host(ok)[:, :count]
        if first:  # and what the first call left
            host_memory.release()
            first = False
        if not ok.all():
            r, i = np.argwhere(~ok)[0]
            raise ValueError(f"run {r}: a child of step {done + i + 1} had non-finite parameters or scores "
                             "outside [0, 1]; check the model and score_fn")
        log.add(metrics, count)
        bar.update(layout.num_runs * count * plan.population)
        done += count
        stopped = time_limit is not None and done < plan.num_steps and time.perf_counter() - log.t0 >= time_limit
        stopped = stopped if time_limit is None else from_process_0(stopped)  # processes stop together
        if store is not None and (stopped or plan.checkpoint[done - count + 1: done + 1].any()):
            store.save(plan.passes(done), state, run_keys, *log.arrays())
            saved = plan.passes(done)
    if store is not None and saved != plan.passes(done):  # the final state is always saved
        store.save(plan.passes(done), state, run_keys, *log.arrays())
    return state, done, stopped


def _finish(layout: Layout, plan: Schedule, state, log: _Log, done: int, stopped: bool, params,
            test_data) -> RunResult:
    """The RunResult: the logged points (and, stopped by the time limit, the last state
    measured), each run's best model, every value gathered where several processes run."""
    metrics, stamps = log.arrays()
    mask = plan.log[: done + 1].copy()
    if stopped:  # measure the last state reached
        mask[-1] = True
        for k, v in _measure_program(state, params, test_data, layout=layout).items():
            metrics[k][:, -1] = to_host(v)
    best_models = _best_program(state, params, layout=layout)
    jax.block_until_ready(best_models)
    # With several processes, no process can read the sharded arrays: gather them.
    gather = to_host if jax.process_count() > 1 else (lambda x: x)
    state, best_models = jax.tree.map(lambda x: gather(x)[: layout.num_runs], (state, best_models))
    return RunResult(
        passes=plan.passes(np.arange(done + 1))[mask],
        metrics={k: v[: layout.num_runs, mask] for k, v in metrics.items()},
        state=state,
        best_models=best_models,
        wall_seconds=time.perf_counter() - log.t0,
        log_wall_seconds=stamps[mask],
        stopped_by_time_limit=stopped,
    )


def _seeds(algorithm: Algorithm, seed_models, seed_fn, init_keys, donate: bool = False):
    """(seeds, shared, one run's seeds (S, ...)), checked: shared seeds stacked, or each
    run's drawn by `seed_fn`; floating-point, finite, as many as the algorithm takes.
    `donate`: the given seeds' jax.Array leaves are deleted once stacked."""
    if (seed_models is None) == (seed_fn is None):
        raise ValueError("pass exactly one of seed_models (shared) and seed_fn (key -> stacked seeds per run)")
    if donate and seed_models is None:
        raise ValueError("donate_seeds applies to seed_models; seed_fn's seeds are the run's own already")
    shared = seed_models is not None
    seeds = stack_models(list(seed_models), donate) if shared else _seed_models(seed_fn, init_keys)
    one_run = seeds if shared else jax.tree.map(lambda x: x[0], seeds)
    check_float_leaves(one_run, "seed models")
    check_finite_models(seeds, "seed models")
    num_seeds = jax.tree.leaves(one_run)[0].shape[0]
    if algorithm.num_seeds is not None and num_seeds != algorithm.num_seeds:
        raise ValueError(f"{type(algorithm).__name__} takes {algorithm.num_seeds} seed models, got {num_seeds}")
    return seeds, shared, one_run


def _power_of_two(n: int, up: bool) -> int:
    return 1 << ((n - 1).bit_length() if up else n.bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which steps a run takes, logs and checkpoints after, decided once on the host.

    Step i (1-based) spends passes(i) = S + i P forward passes in all; index 0 is the
    seeds. `log[i]` / `checkpoint[i]`: the pass count crossed a multiple of log_every /
    the checkpoint interval during step i (or i is the last step, for `log`).
    """

    num_seeds: int
    population: int
    num_steps: int
    call_steps: int
    log: np.ndarray
    checkpoint: np.ndarray

    def passes(self, steps):
        return self.num_seeds + np.asarray(steps) * self.population

    def steps_at(self, passes: int) -> int:
        return (passes - self.num_seeds) // self.population

    def call(self, done: int) -> tuple[np.ndarray, np.ndarray]:
        """(active, logged), bool (call_steps,), of the call that starts after `done` steps."""
        index = done + 1 + np.arange(self.call_steps)
        active = index <= self.num_steps
        return active, active & self.log[np.minimum(index, self.num_steps)]


def schedule(num_seeds: int, population: int, forward_passes: int, log_every: int,
             steps_per_call: int | None = None, checkpoint_every: int | None = None) -> Schedule:
    """The `Schedule` of a budget: as many whole steps as fit after the seeds (a
    remainder is not spent, with a warning); `steps_per_call` steps per compiled call,
    by default about a 20th of the run (at least 100) rounded up to a power of two, so
    that runs of nearby budgets share one compiled program (steps past the end do
    nothing); with checkpoints, at most one checkpoint interval per call."""
    if not isinstance(forward_passes, (int, np.integer)) or forward_passes < num_seeds + population:
        raise ValueError(f"forward_passes must be an int >= seeds + population = {num_seeds} + {population}, "
                         f"got {forward_passes!r}")
    num_steps, left = divmod(forward_passes - num_seeds, population)
    if left:
        warnings.warn(f"forward_passes {forward_passes} is not seeds + k x population ({num_seeds} + k x {population}):"
                      f" the run spends {forward_passes - left} (the last {left} would be no whole step)", stacklevel=3)
    if steps_per_call is None:
        call_steps = _power_of_two(min(num_steps, max(100, -(-num_steps // 20))), up=True)
        if checkpoint_every is not None:
            call_steps = min(call_steps, _power_of_two(max(1, checkpoint_every // population), up=False))
    else:
        call_steps = min(num_steps, steps_per_call)
        if checkpoint_every is not None:
            call_steps = max(1, min(call_steps, checkpoint_every // population))
    passes = num_seeds + np.arange(num_steps + 1) * population
    previous = np.concatenate([[num_seeds - 1], passes[:-1]])
    crossed = lambda every: passes // every > previous // every
    log = crossed(log_every) | (np.arange(num_steps + 1) == num_steps)
    checkpoint = crossed(checkpoint_every) if checkpoint_every is not None else np.zeros(num_steps + 1, bool)
    return Schedule(num_seeds, population, num_steps, call_steps, log, checkpoint)


def _as_run_keys(key) -> jax.Array:
    """Typed keys with one leading axis R, from one key or a batch (typed, or raw uint32 key data)."""
    key = key if isinstance(key, jax.Array) else jnp.asarray(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32:
            raise ValueError(f"key must be a PRNG key (jax.random.key) or raw uint32 key data "
                             f"(jax.random.PRNGKey), got an array of {key.dtype}")
        key = jax.random.wrap_key_data(key)
    keys = key.reshape((1,)) if key.ndim == 0 else key
    if keys.ndim != 1 or keys.shape[0] < 1:
        raise ValueError(f"key must be one PRNG key or a 1-D batch of at least one, got shape {key.shape}")
    return keys


def check_params(algorithm: Algorithm, params, num_runs: int):
    """(params as host NumPy, per_run): per-run when every leaf has a leading axis R
    that the default's matching leaves lack. Then `algorithm.check_params`."""
    default = jax.tree.leaves_with_path(algorithm.default_params())
    given = jax.tree.leaves_with_path(params)
    ranks = dict((jax.tree_util.keystr(p), np.ndim(x)) for p, x in default)
    batched = {jax.tree_util.keystr(p): np.ndim(x) == ranks[jax.tree_util.keystr(p)] + 1
               for p, x in given if jax.tree_util.keystr(p) in ranks}
    per_run = any(batched.values())
    if per_run:
        bad = [k for k, b in batched.items() if not b]
        bad += [jax.tree_util.keystr(p) for p, x in given if np.ndim(x) == 0 or np.shape(x)[0] != num_runs]
        if bad:
            raise ValueError(f"per-run params need a leading axis R = {num_runs} (the number of keys) on every "
                             f"leaf; {', '.join(sorted(set(bad)))} lack it")
    try:
        params = jax.tree.map(np.asarray, params)
    except Exception as e:
        raise ValueError(f"params must be a pytree of arrays: {e}") from e
    algorithm.check_params(params)
    return params, per_run


def _describe(algorithm: Algorithm) -> str:
    """repr of the algorithm with functions (e.g. M2N2.groups) named by module and
    qualified name, not by their address, which changes from process to process."""
    def name(value):
        if callable(value) and not isinstance(value, type) and not dataclasses.is_dataclass(value):
            return _qualified_name(value)
        return repr(value)

    if not dataclasses.is_dataclass(algorithm):
        return repr(algorithm)
    fields = ", ".join(f"{f.name}={name(getattr(algorithm, f.name))}" for f in dataclasses.fields(algorithm))
    return f"{type(algorithm).__name__}({fields})"


def _qualified_name(fn) -> str:
    """module.qualname of a function (of the wrapped one for a functools.partial)."""
    fn = getattr(fn, "func", fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _digest(tree) -> str:
    """A short hash of a pytree's structure, shapes, dtypes and values."""
    h = hashlib.sha1(str(jax.tree.structure(tree)).encode())
    for leaf in jax.tree.leaves(tree):
        leaf = np.asarray(leaf)
        h.update(f"{leaf.shape}{leaf.dtype}".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()[:16]


def _field_digests(params) -> dict:
    """{params field path: digest}, so a refused resume names the field that differs."""
    return {jax.tree_util.keystr(path) or "params": _digest(leaf) for path, leaf in jax.tree.leaves_with_path(params)}


def lower_step(layout: Layout, steps_per_call: int = 1) -> jax.stages.Lowered:
    """The compiled call of `steps_per_call` steps of every run that `run` makes for
    `layout`, lowered from shapes alone (nothing allocated): `.compile()` it to read
    `memory_analysis()` or `as_text()`. The state is donated and updated in place."""
    return _step_program.lower(*layout.abstract_step_arguments(steps_per_call), layout=layout)


def _scorer(layout: Layout):
    """(model, data slice) -> (M,) scores; with split data, every device's slice
    gathered. The model reaches score_fn in device memory, split over "model"."""

    def scores(model, batch):
        s = evaluate(layout.score_fn, layout.placement.constrain(on_device(model)), batch, layout.chunk_size)
        return jax.lax.all_gather(s, "data", tiled=True)[: layout.num_points] if layout.split_data else s

    return scores


def _metrics(layout: Layout):
    """(state, params, test) -> {"train_score": best's, **metrics_fn(...)}."""
    algorithm = layout.algorithm
    extra = layout.metrics_fn or test_score_metrics(
        algorithm, lambda model, test: evaluate(layout.score_fn, model, test, layout.chunk_size))

    def measure(state, params, test):
        return {"train_score": algorithm.best(state, params)[1].astype(jnp.float32), **extra(state, params, test)}

    return measure


def _sharded(fn, mesh, in_specs):
    """fn over the devices: "runs" and "data" manual; "model" left to XLA when it splits anything."""
    manual = {"runs", "data"} if mesh.shape["model"] > 1 else set(mesh.axis_names)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec("runs"), check_vma=False,
                         axis_names=manual)


@functools.partial(jax.jit, static_argnums=0)
def _seed_models(seed_fn, keys):
    return jax.vmap(seed_fn)(keys)


def _map_runs(fn, per_run: bool, params, *per_run_args):
    """`lax.map` of fn(params, *args) over the runs of this device's shard."""
    if per_run:
        return jax.lax.map(lambda args: fn(*args), (params,) + per_run_args)
    return jax.lax.map(lambda args: fn(params, *args), per_run_args)


def _specs(layout: Layout, *names: str) -> tuple:
    """PartitionSpecs of a program's arguments by kind: "runs" (split over runs),
    "params" and "seeds" (split over runs when per run), "data", "all" (replicated)."""
    runs, everywhere = PartitionSpec("runs"), PartitionSpec()
    kinds = {"runs": runs, "params": runs if layout.per_run else everywhere,
             "seeds": everywhere if layout.shared else runs, "data": PartitionSpec("data"), "all": everywhere}
    return tuple(kinds[n] for n in names)


@functools.partial(jax.jit, static_argnames="layout")
def _init_program(seeds, run_keys, params, data, test, *, layout: Layout):
    """(states, seed scores, metrics) of every run after `init`."""
    scorer, measure = _scorer(layout), _metrics(layout)

    def runs(seeds, run_keys, params, data, test):
        def one(params, run_seeds, k):
            state, scores = init_state(layout.algorithm, scorer, k, seeds if layout.shared else run_seeds, params,
                                       data)
            return state, scores, measure(state, params, test)

        if layout.shared:
            return _map_runs(lambda p, k: one(p, None, k), layout.per_run, params, run_keys)
        return _map_runs(one, layout.per_run, params, seeds, run_keys)

    specs = _specs(layout, "seeds", "runs", "params", "data", "all")
    states, scores, metrics = _sharded(runs, layout.mesh, specs)(seeds, run_keys, params, data, test)
    return layout.place_state(states), scores, metrics


@functools.partial(jax.jit, static_argnames="layout", donate_argnames="states")
def _step_program(states, run_keys, params, first_step, active, logged, data, test, *, layout: Layout):
    """One call of every run: step first_step + i where active[i], metrics where
    logged[i] (the host's `Schedule`), else the state as is and NaN metrics.
    Returns (states, metrics, ok), each (R, call_steps); the states are updated in
    place (donated)."""
    scorer, measure = _scorer(layout), _metrics(layout)

    def runs(states, run_keys, params, first_step, active, logged, data, test):
        def one(params, state, key):
            nan = jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype),
                               jax.eval_shape(measure, state, params, test))

            def body(state, i):
                state, ok = jax.lax.cond(
                    active[i], lambda s: step(layout.algorithm, scorer, s, jax.random.fold_in(key, first_step + i),
                                              params, data),
                    lambda s: (s, jnp.bool_(True)), state)
                metrics = jax.lax.cond(logged[i], lambda s: measure(s, params, test), lambda s: nan, state)
                return state, (metrics, ok)

            state, (metrics, ok) = jax.lax.scan(body, state, jnp.arange(active.shape[0]))
            return state, metrics, ok

        return _map_runs(one, layout.per_run, params, states, run_keys)

    specs = _specs(layout, "runs", "runs", "params", "all", "all", "all", "data", "all")
    states, metrics, ok = _sharded(runs, layout.mesh, specs)(states, run_keys, params, first_step, active, logged,
                                                             data, test)
    return layout.place_state(states), metrics, ok


@functools.partial(jax.jit, static_argnames="layout")
def _measure_program(states, params, test, *, layout: Layout):
    measure = _metrics(layout)
    runs = lambda states, params, test: _map_runs(lambda p, s: measure(s, p, test), layout.per_run, params, states)
    return _sharded(runs, layout.mesh, _specs(layout, "runs", "params", "all"))(states, params, test)


@functools.partial(jax.jit, static_argnames="layout")
def _best_program(states, params, *, layout: Layout):
    best = lambda p, s: layout.algorithm.best(s, p)[0]
    runs = lambda states, params: _map_runs(best, layout.per_run, params, states)
    return _sharded(runs, layout.mesh, _specs(layout, "runs", "params"))(states, params)
