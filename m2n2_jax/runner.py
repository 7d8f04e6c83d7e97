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
from m2n2_jax.checkpoint import Checkpointing, Store
from m2n2_jax.checks import check_finite_params, check_scores, stack_models, valid_child
from m2n2_jax.scoring import evaluate, num_points
from m2n2_jax.sharding import check_mesh, default_mesh, make_mesh, pad_points, to_host


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
    mesh: Mesh | None = None,
    checkpoint: Checkpointing | None = None,
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
      devices: devices to spread the runs over (one per run at most; default
        `jax.devices()`). On a CPU, forcing one XLA device per core
        (XLA_FLAGS=--xla_force_host_platform_device_count=N, set before importing
        jax) lets runs use every core.
      mesh: instead of `devices`, a Mesh with axes ("runs", "data") (`make_mesh`):
        runs are split over "runs" and the datapoints over "data" (each device
        scores its slice; the scores are gathered). By default, runs take as many
        devices as there are runs and the rest share the datapoints. R is padded to
        a multiple of the "runs" axis with copies of the last run, dropped from the
        result; M with copies of the last datapoint, whose scores are dropped.
        Results do not depend on the mesh (up to float rounding).
      checkpoint: `Checkpointing(directory, every, resume)`: save the full run state
        with orbax when the pass count crosses a multiple of `every` (and at the end);
        with resume=True, continue from the latest checkpoint. A resumed run ends
        bit-identical to an uninterrupted one (steps draw keys by index); its wall
        stamps continue from the checkpoint's, excluding the downtime.

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
    if mesh is not None and devices is not None:
        raise ValueError("pass devices or mesh, not both")
    if mesh is not None:
        mesh = check_mesh(mesh)
    else:  # `devices` spreads runs only, one device per run at most
        mesh = default_mesh(num_runs) if devices is None else make_mesh(1, list(devices)[:num_runs])
    run_devices, data_devices = mesh.shape["runs"], mesh.shape["data"]
    # Pad the runs to a multiple of the devices with copies of the last run; dropped at the end.
    padded = keys if num_runs % run_devices == 0 else jnp.concatenate(
        [keys, jnp.repeat(keys[-1:], -num_runs % run_devices, axis=0)])
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
    if checkpoint is not None:  # a checkpoint at least every `every` passes
        call_steps = min(call_steps, checkpoint.every)
    m_test = None if test_data is None else num_points(test_data)
    start, advance = _program(algo, score_fn, num_seeds, call_steps, log_every, chunk_size, vectorize,
                              shared_seeds is not None, mesh, m, m_test)
    # Inputs may be committed to one device (e.g. restored from a checkpoint): place
    # them on the mesh, the datapoints split over "data", the shared seeds replicated.
    points = NamedSharding(mesh, PartitionSpec("data"))
    data, test_data = jax.device_put((pad_points(data, data_devices), pad_points(test_data, data_devices)), points)
    if shared_seeds is not None:
        shared_seeds = jax.device_put(shared_seeds, NamedSharding(mesh, PartitionSpec()))
    store = None
    if checkpoint is not None:
        store = Store(checkpoint, {
            "forward_passes": int(forward_passes), "num_runs": int(num_runs), "num_seeds": int(num_seeds),
            "log_every": log_every,
            "params": [[list(x.shape[1:]), str(x.dtype)] for x in jax.tree.leaves(stacked)],
        })
        store.check_fresh()
    t0 = time.perf_counter()
    state, seed_scores, (train0, test0) = start(shared_seeds if seeds is None else seeds, init_keys, data, test_data)
    check_scores(to_host(seed_scores), m, "seed models")
    trains, tests = [to_host(train0)[:, None]], [to_host(test0)[:, None]]
    stamps = [np.full(1, time.perf_counter() - t0)]
    done = 0
    saved = resumed_at = store.latest() if store is not None and checkpoint.resume else None
    if resumed_at is not None:
        done = resumed_at - num_seeds
        state, train, test, wall = store.restore(resumed_at, state, padded, done + 1)
        trains, tests, stamps = [train], [test], [wall]
        t0 = time.perf_counter() - wall[-1]
    bar = tqdm(total=num_runs * forward_passes, unit="pass", disable=not progress, desc="evolving")
    bar.update(num_runs * (num_seeds + done))
    while done < num_steps:
        state, (train, test, ok) = advance(state, evo_keys, done, num_steps, data, test_data)
        step = min(call_steps, num_steps - done)
        ok = to_host(ok)[:, :step]
        if not ok.all():
            r, i = np.argwhere(~ok)[0]
            raise ValueError(
                f"run {r}: the child at pass {num_seeds + done + i + 1} had non-finite parameters "
                "or scores outside [0, 1]; check the model and score_fn"
            )
        trains.append(to_host(train)[:, :step])
        tests.append(to_host(test)[:, :step])
        stamps.append(np.full(step, time.perf_counter() - t0))
        bar.update(num_runs * step)
        passes, done = num_seeds + done + step, done + step
        if store is not None and passes // checkpoint.every > (passes - step) // checkpoint.every:
            store.save(passes, state, padded, np.concatenate(trains, axis=1), np.concatenate(tests, axis=1),
                       np.concatenate(stamps))
            saved = passes
    if store is not None and saved != forward_passes:  # the final state is always saved
        store.save(forward_passes, state, padded, np.concatenate(trains, axis=1), np.concatenate(tests, axis=1),
                   np.concatenate(stamps))
    bar.close()
    mask = log_mask(num_seeds, forward_passes, log_every)
    train_all = np.concatenate(trains, axis=1)[:num_runs, mask]
    test_all = np.concatenate(tests, axis=1)[:num_runs, mask]
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
        log_wall_seconds=np.concatenate(stamps)[mask],
    )


@functools.lru_cache(maxsize=32)
def _program(algo, score_fn, num_seeds, call_steps, log_every, chunk_size, vectorize, shared, mesh, m, m_test):
    """The two jitted functions of a run, cached so repeated runs reuse compilations.

    Both are wrapped in `shard_map` over `mesh` (axes "runs", "data"): each group of
    devices along "data" evolves its share of the runs, each member scoring its slice
    of the M (padded) datapoints; step counters are replicated.

    start(seeds, run_keys, data, test) -> (states, seed_scores, (train, test))
    advance(states, run_keys, first_step, num_steps, data, test)
        -> (states, (train, test, ok)), each (R, call_steps)
    """
    split_data = mesh.shape["data"] > 1

    def evaluate_fn(params, batch, total):
        """(total,) scores; with split data, this device's slice gathered from all."""
        scores = evaluate(score_fn, params, batch, chunk_size)
        if not split_data:
            return scores
        return jax.lax.all_gather(scores, "data", tiled=True)[:total]
    batch = jax.lax.map if vectorize == "map" else (lambda f, xs: jax.vmap(f)(xs))
    nan = jnp.float32(jnp.nan)

    def log(state, test):
        b = algo.best(state)
        train = state.scores[b].mean()
        if test is None:
            return train, nan
        return train, evaluate_fn(archive_lib.get(state, b), test, m_test).mean()

    def start(seeds, run_keys, data, test):
        def one(args):
            run_seeds, k = args
            run_seeds = seeds if shared else run_seeds
            scores = jax.vmap(evaluate_fn, in_axes=(0, None, None))(run_seeds, data, m)
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
                    scores = evaluate_fn(child, data, m)
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

    runs, replicated, points = PartitionSpec("runs"), PartitionSpec(), PartitionSpec("data")
    seeds_spec = replicated if shared else runs
    start = jax.shard_map(start, mesh=mesh, in_specs=(seeds_spec, runs, points, points),
                          out_specs=runs, check_vma=False)
    advance = jax.shard_map(advance, mesh=mesh, in_specs=(runs, runs, replicated, replicated, points, points),
                            out_specs=runs, check_vma=False)
    return jax.jit(start), jax.jit(advance)
