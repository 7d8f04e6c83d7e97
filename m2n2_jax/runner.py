"""One runner for every method: a jittable scan body and a thin host driver.

`step` (one ask / evaluate / tell) is the scan body of every run and can be called
inside a user's own `jit`; `evolve` scans it. `run` adds what a long run needs on the
host: validation, placement on a ("runs", "data") mesh, progress, logging, checkpoints
and a time limit. Independent runs (one per key) share one compiled call; each step's
key is `fold_in(run_key, step)`, so results do not depend on how steps are chunked
into calls, and a resumed run ends bit-identical. The budget counts forward passes:
the S seed models cost S, each step P (the algorithm's population size).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from m2n2_jax.base import Algorithm
from m2n2_jax.checkpoint import Checkpointing, Store
from m2n2_jax.checks import check_finite_params, check_scores, stack_models, valid_children
from m2n2_jax.scoring import evaluate, num_points
from m2n2_jax.sharding import check_mesh, default_mesh, from_process_0, pad_points, to_host


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


def best_model_metrics(algorithm: Algorithm, score_fn: Callable) -> Callable:
    """The default `metrics_fn`: the best-train model's mean training and test scores."""

    def metrics_fn(state, test_data):
        model, train = algorithm.best(state)
        test = jnp.float32(jnp.nan) if test_data is None else score_fn(model, test_data).mean()
        return {"train_accuracy": train.astype(jnp.float32), "test_accuracy": test.astype(jnp.float32)}

    return metrics_fn


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What `run` returns (host NumPy arrays but the state; R runs, L logged points).

    Attributes:
      passes: (L,) forward passes spent at each logged point.
      metrics: name -> (R, L) values of `metrics_fn` at each logged point (by default
        "train_accuracy" and "test_accuracy" of the best-train model; NaN without test data).
      state: final algorithm state of every run, stacked (leading axis R): jax Arrays
        sharded over the mesh's "runs" axis; with several processes (jax.distributed),
        host NumPy arrays gathered to every process.
      best_params: `algorithm.best` of every run, stacked (leading axis R), placed like `state`.
      wall_seconds: time of the evolution, compilation included.
      log_wall_seconds: (L,) wall time when each logged point reached the host.
      stopped_by_time_limit: the run stopped before its budget (see `run`'s time_limit).
    """

    passes: np.ndarray
    metrics: dict
    state: Any
    best_params: Any
    wall_seconds: float
    log_wall_seconds: np.ndarray
    stopped_by_time_limit: bool = False

    @property
    def test_accuracy(self) -> np.ndarray:
        return self.metrics["test_accuracy"]

    @property
    def train_accuracy(self) -> np.ndarray:
        return self.metrics["train_accuracy"]

    @property
    def final_test_accuracy(self) -> np.ndarray:
        return self.test_accuracy[:, -1]

    @property
    def final_train_accuracy(self) -> np.ndarray:
        return self.train_accuracy[:, -1]


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
    test_data=None,
    metrics_fn: Callable | None = None,
    log_every: int = 100,
    chunk_size: int | None = None,
    steps_per_call: int | None = None,
    mesh: Mesh | None = None,
    checkpoint: Checkpointing | None = None,
    time_limit: float | None = None,
    progress: bool = True,
) -> RunResult:
    """Run `algorithm` for `forward_passes` forward passes, one run per key.

    Args:
      algorithm: any `Algorithm` (M2N2, MapElites, EvosaxES, SlerpGrid, yours).
      key: a PRNG key, or a 1-D batch of R keys for R independent runs.
      score_fn: (model, batch) -> per-datapoint scores (M,) in [0, 1], maximised.
      data: training datapoints, a pytree whose leaves share a leading axis M.
      forward_passes: total budget, seeds included; at least S + P.
      params: the algorithm's `Params` (default `algorithm.default_params()`), shared by the runs.
      seed_models: S model pytrees shared by every run (merging pre-trained models), or
      seed_fn: key -> models stacked (S, ...), each run's own seeds (from scratch).
      test_data: datapoints given to `metrics_fn` (like `data`).
      metrics_fn: (state, test_data) -> dict of scalars, logged (default
        `best_model_metrics`). It sees the whole test set on every device.
      log_every: log when the pass count reaches a multiple of this, and at the end.
      chunk_size: score datapoints this many at a time (`lax.map`), bounding memory.
      steps_per_call: steps per compiled call (progress and time-limit granularity).
      mesh: a Mesh with axes ("runs", "data"), e.g. `jax.make_mesh((2, 2), ("runs",
        "data"))`: runs split over "runs", training datapoints over "data" (each device
        scores its slice; scores are gathered). Default: runs over as many devices as
        there are runs, the rest share the datapoints. R and M are padded with copies
        of the last run / datapoint, dropped from the result. After
        `jax.distributed.initialize()` every process calls `run` alike, and the mesh
        must hold devices of every process (the default takes the global `jax.devices()`).
      checkpoint: save the whole run with orbax when the pass count crosses a multiple
        of `checkpoint.every` (and at the end); with `resume`, continue from the latest.
      time_limit: seconds; stop after the first call that ends past it (on process 0's
        clock). The result then ends at the passes actually spent, its last point measured there.
      progress: show a progress bar (on process 0 only).

    Returns:
      RunResult.
    """
    if not isinstance(algorithm, Algorithm):
        raise ValueError(f"algorithm must be an m2n2_jax.Algorithm, got {type(algorithm).__name__}")
    params = algorithm.default_params() if params is None else params
    keys = _as_run_keys(key)
    num_runs = keys.shape[0]
    for name, value in (("log_every", log_every), ("steps_per_call", steps_per_call), ("chunk_size", chunk_size)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit!r}")
    m = num_points(data)
    if test_data is not None:
        num_points(test_data)
        if jax.tree.structure(test_data) != jax.tree.structure(data):
            raise ValueError("test_data must have the same pytree structure as data")
    mesh = check_mesh(default_mesh(num_runs) if mesh is None else mesh)
    runs_axis, data_axis = mesh.shape["runs"], mesh.shape["data"]
    padded = jnp.concatenate([keys, jnp.repeat(keys[-1:], -num_runs % runs_axis, axis=0)])
    init_keys, evo_keys = jax.vmap(jax.random.split, out_axes=1)(padded)

    if (seed_models is None) == (seed_fn is None):
        raise ValueError("pass exactly one of seed_models (shared) and seed_fn (key -> stacked seeds per run)")
    shared = seed_models is not None
    seeds = stack_models(list(seed_models)) if shared else _seed_models(seed_fn, init_keys)
    one_run_seeds = seeds if shared else jax.tree.map(lambda x: x[0], seeds)
    num_seeds = jax.tree.leaves(one_run_seeds)[0].shape[0]
    check_finite_params(seeds, "seed models")
    template = jax.tree.map(lambda x: x[0], one_run_seeds)
    try:
        out = jax.eval_shape(score_fn, template, data)
    except Exception as e:  # shape errors surface as TypeError, flax errors, ...
        raise ValueError(f"score_fn cannot evaluate a seed model on data (wrong data shape?): {e}") from e
    if out.shape != (m,):
        raise ValueError(f"score_fn must return per-datapoint scores of shape ({m},), got {out.shape}")
    pop = algorithm.population_size
    if not isinstance(forward_passes, (int, np.integer)) or forward_passes < num_seeds + pop:
        raise ValueError(f"forward_passes must be an int >= seeds + population = {num_seeds} + {pop}, "
                         f"got {forward_passes!r}")
    num_steps = (forward_passes - num_seeds) // pop
    call_steps = max(1, min(num_steps, steps_per_call or max(100, -(-num_steps // 20))))
    if checkpoint is not None:  # a checkpoint at least every `every` passes
        call_steps = max(1, min(call_steps, checkpoint.every // pop))

    statics = dict(algorithm=algorithm, score_fn=score_fn, metrics_fn=metrics_fn, chunk_size=chunk_size,
                   mesh=mesh, m=m, shared=shared)
    points, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    data = jax.device_put(pad_points(data, data_axis), points)
    test_data, params = jax.device_put((test_data, params), replicated)
    if shared:
        seeds = jax.device_put(seeds, replicated)
    store, resumed_at = None, None
    if checkpoint is not None:
        store = Store(checkpoint, {
            "algorithm": _describe(algorithm), "params": _digest(params), "forward_passes": int(forward_passes),
            "num_runs": int(num_runs), "num_seeds": int(num_seeds), "log_every": log_every,
            "runs_padded_to": int(padded.shape[0]),  # by the mesh's "runs" axis: resume on the same layout
            "models": [[list(x.shape), str(x.dtype)] for x in jax.tree.leaves(template)],
        })
        resumed_at = store.start()

    t0 = time.perf_counter()
    state, seed_scores, metrics0 = _start(seeds, init_keys, params, data, test_data, **statics)
    check_scores(to_host(seed_scores), m, "seed models")
    logs = {k: [to_host(v)[:, None]] for k, v in metrics0.items()}
    stamps = [np.full(1, time.perf_counter() - t0)]
    done = 0
    if resumed_at is not None:
        done = (resumed_at - num_seeds) // pop
        state, restored, wall = store.restore(resumed_at, state, padded, list(logs), done + 1)
        logs, stamps = {k: [v] for k, v in restored.items()}, [wall]
        t0 = time.perf_counter() - wall[-1]
    saved = resumed_at
    bar = tqdm(total=num_runs * (num_seeds + num_steps * pop), unit="pass",
               disable=not progress or jax.process_index() != 0,
               desc=type(algorithm).__name__)
    bar.update(num_runs * (num_seeds + done * pop))
    stopped = False
    while done < num_steps:
        state, metrics, ok = _advance(state, evo_keys, params, done, num_steps, data, test_data,
                                      num_seeds=num_seeds, log_every=log_every, call_steps=call_steps, **statics)
        count = min(call_steps, num_steps - done)
        ok = to_host(ok)[:, :count]
        if not ok.all():
            r, i = np.argwhere(~ok)[0]
            raise ValueError(f"run {r}: a child of step {done + i + 1} had non-finite parameters or scores "
                             "outside [0, 1]; check the model and score_fn")
        for k, v in metrics.items():
            logs[k].append(to_host(v)[:, :count])
        stamps.append(np.full(count, time.perf_counter() - t0))
        bar.update(num_runs * count * pop)
        done += count
        passes = num_seeds + done * pop
        stopped = time_limit is not None and done < num_steps and time.perf_counter() - t0 >= time_limit
        stopped = stopped if time_limit is None else from_process_0(stopped)  # processes stop together
        if store is not None and (stopped or passes // checkpoint.every > (passes - count * pop) // checkpoint.every):
            store.save(passes, state, padded, {k: np.concatenate(v, axis=1) for k, v in logs.items()},
                       np.concatenate(stamps))
            saved = passes
        if stopped:
            break
    bar.close()
    passes = num_seeds + pop * np.arange(done + 1)
    logs = {k: np.concatenate(v, axis=1) for k, v in logs.items()}
    if store is not None and saved != passes[-1]:  # the final state is always saved
        store.save(int(passes[-1]), state, padded, logs, np.concatenate(stamps))
    previous = np.concatenate([[num_seeds - 1], passes[:-1]])
    mask = (passes // log_every > previous // log_every) | (np.arange(done + 1) == num_steps)
    if stopped:  # measure the last state reached
        mask[-1] = True
        final = _measure(state, test_data, **statics)
        for k, v in final.items():
            logs[k][:, -1] = to_host(v)
    best_params = _best(state, algorithm=algorithm, mesh=mesh)
    jax.block_until_ready(best_params)
    # With several processes, no process can read the sharded arrays: gather them.
    gather = to_host if jax.process_count() > 1 else (lambda x: x)
    state, best_params = jax.tree.map(lambda x: gather(x)[:num_runs], (state, best_params))
    return RunResult(
        passes=passes[mask],
        metrics={k: v[:num_runs, mask] for k, v in logs.items()},
        state=state,
        best_params=best_params,
        wall_seconds=time.perf_counter() - t0,
        log_wall_seconds=np.concatenate(stamps)[mask],
        stopped_by_time_limit=stopped,
    )


def _as_run_keys(key) -> jax.Array:
    """Typed keys with one leading axis R, from one key or a batch (typed or raw)."""
    key = key if isinstance(key, jax.Array) else jnp.asarray(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key.astype(jnp.uint32))
    keys = key.reshape((1,)) if key.ndim == 0 else key
    if keys.ndim != 1 or keys.shape[0] < 1:
        raise ValueError(f"key must be one PRNG key or a 1-D batch of at least one, got shape {key.shape}")
    return keys


def _describe(algorithm: Algorithm) -> str:
    """repr of the algorithm with functions (e.g. M2N2.groups) named by module and
    qualified name, not by their address, which changes from process to process."""
    def name(value):
        if callable(value) and not isinstance(value, type) and not dataclasses.is_dataclass(value):
            return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
        return repr(value)

    if not dataclasses.is_dataclass(algorithm):
        return repr(algorithm)
    fields = ", ".join(f"{f.name}={name(getattr(algorithm, f.name))}" for f in dataclasses.fields(algorithm))
    return f"{type(algorithm).__name__}({fields})"


def _digest(tree) -> str:
    """A short hash of a pytree's values, to tell checkpoints of other hyperparameters apart."""
    h = hashlib.sha1()
    for leaf in jax.tree.leaves(tree):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()[:16]


def _scorer(score_fn, chunk_size, m, split_data: bool):
    """(model, data slice) -> (m,) scores; with split data, every device's slice gathered."""

    def scores(model, batch):
        s = evaluate(score_fn, model, batch, chunk_size)
        return jax.lax.all_gather(s, "data", tiled=True)[:m] if split_data else s

    return scores


def _metrics(algorithm, score_fn, metrics_fn, chunk_size):
    test_scores = lambda model, test: evaluate(score_fn, model, test, chunk_size)
    return metrics_fn or best_model_metrics(algorithm, test_scores)


def _sharded(fn, mesh, in_specs):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec("runs"), check_vma=False)


STATIC = ("algorithm", "score_fn", "metrics_fn", "chunk_size", "mesh", "m", "shared")


@functools.partial(jax.jit, static_argnums=0)
def _seed_models(seed_fn, keys):
    return jax.vmap(seed_fn)(keys)


@functools.partial(jax.jit, static_argnames=STATIC)
def _start(seeds, run_keys, params, data, test, *, algorithm, score_fn, metrics_fn, chunk_size, mesh, m, shared):
    """(states, seed scores, metrics) of every run after `init`."""
    scorer = _scorer(score_fn, chunk_size, m, mesh.shape["data"] > 1)
    measure = _metrics(algorithm, score_fn, metrics_fn, chunk_size)

    def runs(seeds, run_keys, params, data, test):
        def one(args):
            run_seeds, k = args
            state, scores = init_state(algorithm, scorer, k, seeds if shared else run_seeds, params, data)
            return state, scores, measure(state, test)

        return jax.lax.map(one, (None if shared else seeds, run_keys))

    R, P = PartitionSpec("runs"), PartitionSpec()
    specs = (P if shared else R, R, P, PartitionSpec("data"), P)
    return _sharded(runs, mesh, specs)(seeds, run_keys, params, data, test)


@functools.partial(jax.jit, static_argnames=STATIC + ("num_seeds", "log_every", "call_steps"))
def _advance(states, run_keys, params, first_step, num_steps, data, test, *, algorithm, score_fn, metrics_fn,
             chunk_size, mesh, m, shared, num_seeds, log_every, call_steps):
    """`call_steps` steps of every run from `first_step`: (states, metrics, ok), each (R, call_steps).
    Metrics are NaN where nothing is logged; steps past `num_steps` do nothing."""
    scorer = _scorer(score_fn, chunk_size, m, mesh.shape["data"] > 1)
    measure = _metrics(algorithm, score_fn, metrics_fn, chunk_size)
    pop = algorithm.population_size

    def runs(states, run_keys, params, first_step, num_steps, data, test):
        nan = jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype),
                           jax.eval_shape(measure, jax.tree.map(lambda x: x[0], states), test))

        def one(args):
            state, key = args

            def body(state, i):
                n = first_step + i
                active = n < num_steps
                state, ok = jax.lax.cond(
                    active, lambda s: step(algorithm, scorer, s, jax.random.fold_in(key, n), params, data),
                    lambda s: (s, jnp.bool_(True)), state)
                passes = num_seeds + (n + 1) * pop
                logged = active & ((passes // log_every > (passes - pop) // log_every) | (n + 1 == num_steps))
                metrics = jax.lax.cond(logged, lambda s: measure(s, test), lambda s: nan, state)
                return state, (metrics, ok)

            state, (metrics, ok) = jax.lax.scan(body, state, jnp.arange(call_steps))
            return state, metrics, ok

        return jax.lax.map(one, (states, run_keys))

    R, P = PartitionSpec("runs"), PartitionSpec()
    return _sharded(runs, mesh, (R, R, P, P, P, PartitionSpec("data"), P))(
        states, run_keys, params, first_step, num_steps, data, test)


@functools.partial(jax.jit, static_argnames=STATIC)
def _measure(states, test, *, algorithm, score_fn, metrics_fn, chunk_size, mesh, m, shared):
    measure = _metrics(algorithm, score_fn, metrics_fn, chunk_size)
    runs = lambda states, test: jax.lax.map(lambda s: measure(s, test), states)
    return _sharded(runs, mesh, (PartitionSpec("runs"), PartitionSpec()))(states, test)


@functools.partial(jax.jit, static_argnames=("algorithm", "mesh"))
def _best(states, *, algorithm, mesh):
    runs = lambda states: jax.lax.map(lambda s: algorithm.best(s)[0], states)
    return _sharded(runs, mesh, (PartitionSpec("runs"),))(states)
