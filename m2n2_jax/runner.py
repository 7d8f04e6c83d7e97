"""A whole evolution on the device: `lax.scan` over ask / evaluate / tell.

Independent runs (one per key) share one compiled call (`lax.map` by default, `vmap`
as an option). The host only loops over chunks of steps to show progress and to check
that every child was valid; each step's PRNG key is `fold_in(run_key, step)`, so the
result does not depend on the chunking. The budget counts forward passes: the S seed
models cost S passes, then each step evaluates one child.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from m2n2_jax import algorithm as m2n2
from m2n2_jax import archive as archive_lib
from m2n2_jax.algorithm import Algorithm
from m2n2_jax.checks import check_finite_params, check_scores, stack_models, valid_child
from m2n2_jax.scoring import evaluate, num_points


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What `run` returns (host NumPy arrays; R runs, L logged points).

    Attributes:
      passes: (L,) forward passes spent at each logged point.
      test_accuracy: (R, L) mean test score of the archive's best-train model
        (NaN without test data).
      train_accuracy: (R, L) that model's mean training score.
      state: final algorithm state of every run, stacked (leading axis R).
      best_params: the best-train model of every run, stacked (leading axis R).
      wall_seconds: time of the evolution, compilation included.
      log_wall_seconds: (L,) wall time when each logged point was available on the
        host (the end of its compiled chunk), for time-to-accuracy plots.
    """

    passes: np.ndarray
    test_accuracy: np.ndarray
    train_accuracy: np.ndarray
    state: Any
    best_params: Any
    wall_seconds: float
    log_wall_seconds: np.ndarray | None = None

    @property
    def final_test_accuracy(self) -> np.ndarray:
        return self.test_accuracy[:, -1]

    @property
    def final_train_accuracy(self) -> np.ndarray:
        return self.train_accuracy[:, -1]


def log_mask(first_pass: int, forward_passes: int, log_every: int) -> np.ndarray:
    """Which pass counts in [first_pass, forward_passes] are logged: multiples of
    `log_every` and the last pass."""
    passes = np.arange(first_pass, forward_passes + 1)
    return (passes % log_every == 0) | (passes == forward_passes)


def _as_run_keys(key) -> jax.Array:
    """Typed keys with one leading axis R, from one key or a batch (typed or raw)."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key.astype(jnp.uint32))
    keys = key.reshape((1,)) if key.ndim == 0 else key
    if keys.ndim != 1 or keys.shape[0] < 1:
        raise ValueError(f"key must be one PRNG key or a 1-D batch of at least one, got shape {key.shape}")
    return keys


def run(
    key,
    seed_models: Sequence | Callable,
    score_fn: Callable,
    data,
    forward_passes: int,
    config: m2n2.Config | Algorithm = None,
    *,
    test_data=None,
    log_every: int = 100,
    chunk_size: int | None = None,
    steps_per_call: int | None = None,
    vectorize: str = "map",
    devices: Sequence[jax.Device] | None = None,
    progress: bool = True,
) -> RunResult:
    """Evolve for `forward_passes` forward passes, one run per key.

    Args:
      key: a PRNG key, or a 1-D batch of R keys for R independent runs.
      seed_models: a sequence of S model pytrees shared by all runs (pre-trained
        merging), or a function key -> pytree stacked (S, ...) giving each run its own
        seeds (evolution from scratch).
      score_fn: (params, batch) -> per-datapoint scores (M,) in [0, 1], maximised.
      data: training datapoints, a pytree whose leaves share a leading axis M.
      forward_passes: total budget, seeds included; at least max(2, S).
      config: an M2N2 `Config` (default `Config()`), or any `Algorithm`
        (e.g. `baselines.map_elites.map_elites(...)`).
      test_data: datapoints for the logged test accuracy (like `data`).
      log_every: log every this many passes (the last pass is always logged).
      chunk_size: evaluate datapoints in chunks of this many (memory bound).
      steps_per_call: steps per compiled call (progress granularity).
      vectorize: "map" (lax.map over runs) or "vmap".
      devices: devices to spread the runs over (default `jax.local_devices()`), with
        `shard_map` over a one-axis Mesh; R is padded to a multiple of their number
        with copies of the last run, which are dropped from the result. On a CPU, forcing one XLA device per core
        (XLA_FLAGS=--xla_force_host_platform_device_count=N, set before importing
        jax) lets runs use every core.

    Returns:
      RunResult.
    """
    config = m2n2.Config() if config is None else config
    algo = config if isinstance(config, Algorithm) else m2n2.m2n2(config)
    keys = _as_run_keys(key)
    num_runs = keys.shape[0]
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be an int >= 1, got {log_every!r}")
    if vectorize not in ("map", "vmap"):
        raise ValueError(f"vectorize must be 'map' or 'vmap', got {vectorize!r}")
    m = num_points(data)
    if test_data is not None:
        num_points(test_data)
        if jax.tree.structure(test_data) != jax.tree.structure(data):
            raise ValueError("test_data must have the same pytree structure as data")
    devices = tuple(jax.local_devices() if devices is None else devices)[:num_runs]
    # Pad the runs to a multiple of the devices with copies of the last run; dropped at the end.
    padded = keys if num_runs % len(devices) == 0 else jnp.concatenate(
        [keys, jnp.repeat(keys[-1:], -num_runs % len(devices), axis=0)])
    init_keys, evo_keys = jax.vmap(jax.random.split, out_axes=1)(padded)

    if callable(seed_models):
        seeds = jax.jit(jax.vmap(seed_models))(init_keys)
        shared_seeds = None
    else:
        shared_seeds = stack_models(list(seed_models))
        seeds = None
    stacked = shared_seeds if seeds is None else jax.tree.map(lambda x: x[0], seeds)
    num_seeds = jax.tree.leaves(stacked)[0].shape[0]
    if not isinstance(forward_passes, (int, np.integer)) or forward_passes < max(2, num_seeds):
        raise ValueError(
            f"forward_passes must be an int >= max(2, number of seed models = {num_seeds}), got {forward_passes!r}"
        )
    check_finite_params(stacked if seeds is None else seeds, "seed models")
    try:
        out = jax.eval_shape(score_fn, jax.tree.map(lambda x: x[0], stacked), data)
    except Exception as e:  # shape errors surface as TypeError, flax errors, ...
        raise ValueError(f"score_fn cannot evaluate a seed model on data (wrong data shape?): {e}") from e
    if out.shape != (m,):
        raise ValueError(f"score_fn must return per-datapoint scores of shape ({m},), got {out.shape}")

    num_steps = forward_passes - num_seeds
    call_steps = max(1, min(num_steps, steps_per_call or max(100, -(-num_steps // 20))))
    num_calls = -(-num_steps // call_steps) if num_steps else 0
    start, advance = _program(algo, score_fn, num_seeds, call_steps, log_every, chunk_size, vectorize,
                              shared_seeds is not None, devices)
    # Inputs may be committed to one device (e.g. restored from a checkpoint): place
    # the shared ones on every device of the mesh, replicated.
    replicated = NamedSharding(Mesh(np.array(devices), ("runs",)), PartitionSpec())
    data, test_data = jax.device_put((data, test_data), replicated)
    if shared_seeds is not None:
        shared_seeds = jax.device_put(shared_seeds, replicated)
    t0 = time.perf_counter()
    state, seed_scores, (train0, test0) = start(shared_seeds if seeds is None else seeds, init_keys, data, test_data)
    check_scores(seed_scores, m, "seed models")
    trains, tests = [np.asarray(train0)[:, None]], [np.asarray(test0)[:, None]]
    stamps = [np.full(1, time.perf_counter() - t0)]
    bar = tqdm(total=num_runs * forward_passes, unit="pass", disable=not progress, desc="evolving")
    bar.update(num_runs * num_seeds)
    for c in range(num_calls):
        state, (train, test, ok) = advance(state, evo_keys, c * call_steps, num_steps, data, test_data)
        ok = np.asarray(ok)
        if not ok.all():
            r, i = np.argwhere(~ok)[0]
            raise ValueError(
                f"run {r}: the child at pass {num_seeds + c * call_steps + i + 1} had non-finite parameters "
                "or scores outside [0, 1]; check the model and score_fn"
            )
        trains.append(np.asarray(train))
        tests.append(np.asarray(test))
        stamps.append(np.full(call_steps, time.perf_counter() - t0))
        bar.update(num_runs * min(call_steps, num_steps - c * call_steps))
    bar.close()
    mask = log_mask(num_seeds, forward_passes, log_every)
    train_all = np.concatenate(trains, axis=1)[:num_runs, : num_steps + 1][:, mask]
    test_all = np.concatenate(tests, axis=1)[:num_runs, : num_steps + 1][:, mask]
    state = jax.tree.map(lambda x: x[:num_runs], state)
    best_params = jax.vmap(lambda s: archive_lib.get(s, algo.best(s)))(state)
    jax.block_until_ready(best_params)
    return RunResult(
        passes=np.arange(num_seeds, forward_passes + 1)[mask],
        test_accuracy=test_all,
        train_accuracy=train_all,
        state=state,
        best_params=best_params,
        wall_seconds=time.perf_counter() - t0,
        log_wall_seconds=np.concatenate(stamps)[: num_steps + 1][mask],
    )


@functools.lru_cache(maxsize=32)
def _program(algo, score_fn, num_seeds, call_steps, log_every, chunk_size, vectorize, shared, devices):
    """The two jitted functions of a run, cached so repeated runs reuse compilations.

    Both are wrapped in `shard_map` over a Mesh of `devices` with one axis "runs":
    each device evolves its share of the runs; data and step counters are replicated.

    start(seeds, run_keys, data, test) -> (states, seed_scores, (train, test))
    advance(states, run_keys, first_step, num_steps, data, test)
        -> (states, (train, test, ok)), each (R, call_steps)
    """
    evaluate_fn = lambda params, batch: evaluate(score_fn, params, batch, chunk_size)
    batch = jax.lax.map if vectorize == "map" else (lambda f, xs: jax.vmap(f)(xs))
    nan = jnp.float32(jnp.nan)

    def log(state, test):
        b = algo.best(state)
        train = state.scores[b].mean()
        if test is None:
            return train, nan
        return train, evaluate_fn(archive_lib.get(state, b), test).mean()

    def start(seeds, run_keys, data, test):
        def one(args):
            run_seeds, k = args
            run_seeds = seeds if shared else run_seeds
            scores = jax.vmap(evaluate_fn, in_axes=(0, None))(run_seeds, data)
            state = algo.init(k, run_seeds, scores)
            return state, scores, log(state, test)

        return batch(one, (None if shared else seeds, run_keys))

    def advance(states, run_keys, first_step, num_steps, data, test):
        forward_passes = num_seeds + num_steps

        def one(args):
            state, key = args

            def body(state, i):
                step = first_step + i
                active = step < num_steps
                k = jax.random.fold_in(key, step)

                def evolve(state):
                    child = algo.ask(k, state)
                    scores = evaluate_fn(child, data)
                    ok = valid_child(child, scores)
                    state = jax.lax.cond(ok, lambda s: algo.tell(s, child, scores), lambda s: s, state)
                    return state, ok

                state, ok = jax.lax.cond(active, evolve, lambda s: (s, jnp.bool_(True)), state)
                passes = num_seeds + step + 1
                logged = active & ((passes % log_every == 0) | (passes == forward_passes))
                train, test_acc = jax.lax.cond(logged, lambda s: log(s, test), lambda s: (nan, nan), state)
                return state, (train, test_acc, ok)

            return jax.lax.scan(body, state, jnp.arange(call_steps))

        return batch(one, (states, run_keys))

    mesh = Mesh(np.array(devices), ("runs",))
    runs, replicated = PartitionSpec("runs"), PartitionSpec()
    seeds_spec = replicated if shared else runs
    start = jax.shard_map(start, mesh=mesh, in_specs=(seeds_spec, runs, replicated, replicated),
                          out_specs=runs, check_vma=False)
    advance = jax.shard_map(advance, mesh=mesh, in_specs=(runs, runs, replicated, replicated, replicated, replicated),
                            out_specs=runs, check_vma=False)
    return jax.jit(start), jax.jit(advance)
