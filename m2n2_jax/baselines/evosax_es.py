"""CMA-ES and Sep-CMA-ES from evosax on the same problem, budget and logging as M2N2.

The ES maximises the mean training score (evosax minimises, so it is told the
negative). One generation evaluates `population_size` models, so the budget is
population x generations forward passes exactly. The logged curve is the test score of
the best solution found so far (by training score), as evosax tracks it. All
generations of all runs are one `lax.scan` per chunk, runs over `lax.map`.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms import CMA_ES, Sep_CMA_ES
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

from m2n2_jax.runner import RunResult, _as_run_keys
from m2n2_jax.scoring import evaluate, num_points

STRATEGIES = {"cma-es": CMA_ES, "sep-cma-es": Sep_CMA_ES}


def es_log_mask(generations: int, population_size: int, log_every: int) -> np.ndarray:
    """Which generations are logged: those whose pass count reaches a new multiple of
    `log_every`, and the last one."""
    passes = population_size * np.arange(1, generations + 1)
    return (passes // log_every > (passes - population_size) // log_every) | (passes == passes[-1])


def run_es(
    key,
    name: str,
    init_fn: Callable,
    score_fn: Callable,
    data,
    forward_passes: int,
    *,
    population_size: int = 20,
    std_init: float = 0.01,
    test_data=None,
    log_every: int = 100,
    generations_per_call: int | None = None,
    time_limit: float | None = None,
    progress: bool = True,
) -> RunResult:
    """Run evosax's `name` ES for `forward_passes` passes, one run per key.

    Args:
      key: a PRNG key or a 1-D batch of R keys.
      name: "cma-es" or "sep-cma-es".
      init_fn: key -> model pytree, the initial mean (e.g. N(0, 0.01^2) params).
      score_fn, data, test_data, log_every: as in `m2n2_jax.run`.
      forward_passes: a multiple of `population_size`.
      std_init: the initial step size sigma_0.
      generations_per_call: generations per compiled call (also the granularity of
        the wall-time stamps and of `time_limit`).
      time_limit: seconds; if set, stop after the first call that ends past it. The
        result then covers only the generations done, and its last point (test score
        of the best solution so far) is at the passes actually spent. For honest
        bounded runs where the full budget is out of reach (full CMA-ES at large D).

    Returns:
      RunResult; `state` holds the final evosax states (leading axis R).
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown ES {name!r}; choose one of {', '.join(STRATEGIES)}")
    if not isinstance(population_size, int) or population_size < 2:
        raise ValueError(f"population_size must be an int >= 2, got {population_size!r}")
    if not isinstance(forward_passes, (int, np.integer)) or forward_passes < population_size \
            or forward_passes % population_size:
        raise ValueError(f"forward_passes must be a positive multiple of the population ({population_size}), "
                         f"got {forward_passes!r}")
    if not std_init > 0:
        raise ValueError(f"std_init must be > 0, got {std_init!r}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit!r}")
    if generations_per_call is not None and (not isinstance(generations_per_call, int) or generations_per_call < 1):
        raise ValueError(f"generations_per_call must be an int >= 1, got {generations_per_call!r}")
    keys = _as_run_keys(key)
    num_runs = keys.shape[0]
    num_points(data)
    generations = forward_passes // population_size
    call = max(1, min(generations, generations_per_call or max(10, -(-generations // 20))))
    start, advance, unravel = _program(name, init_fn, score_fn, population_size, float(std_init), call)
    t0 = time.perf_counter()
    states = start(keys)
    trains, tests, stamps = [], [], []
    bar = tqdm(total=num_runs * forward_passes, unit="pass", disable=not progress, desc=name)
    done = 0
    while done < generations:
        states, (train, test) = advance(states, keys, done, generations, log_every, data, test_data)
        step = min(call, generations - done)
        done += step
        trains.append(np.asarray(train)[:, :step])
        tests.append(np.asarray(test)[:, :step])
        stamps.append(np.full(step, time.perf_counter() - t0))
        bar.update(num_runs * population_size * step)
        if time_limit is not None and time.perf_counter() - t0 >= time_limit:
            break
    bar.close()
    train, test, stamp = (np.concatenate(a, axis=-1) for a in (trains, tests, stamps))
    mask = es_log_mask(generations, population_size, log_every)[:done]
    best = jax.vmap(unravel)(states.best_solution)
    if done < generations:  # stopped by time_limit: score the last generation too
        mask[-1] = True
        if test_data is not None:
            test[:, -1] = np.asarray(jax.jit(_mean_scores, static_argnums=0)(score_fn, best, test_data))
    jax.block_until_ready(best)
    return RunResult(
        passes=population_size * np.arange(1, done + 1)[mask],
        test_accuracy=test[:, mask],
        train_accuracy=train[:, mask],
        state=states,
        best_params=best,
        wall_seconds=time.perf_counter() - t0,
        log_wall_seconds=stamp[mask],
    )


def _mean_scores(score_fn, params, data):
    """(P,) mean score of each of P stacked models."""
    return jax.lax.map(lambda p: evaluate(score_fn, p, data).mean(), params)

@functools.lru_cache(maxsize=16)
def _program(name, init_fn, score_fn, population_size, std_init, call):
    """Jitted start(keys) and advance(states, keys, first, generations, log_every, data, test),
    cached so repeated runs reuse compilations; and the solution's unravel function."""
    template = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init_fn, jax.random.key(0)))
    unravel = ravel_pytree(template)[1]
    es = STRATEGIES[name](population_size=population_size, solution=template)
    params = es.default_params.replace(std_init=jnp.asarray(std_init))

    @jax.jit
    def start(keys):
        def one(k):
            k_mean, k_es = jax.random.split(k)
            return es.init(k_es, init_fn(k_mean), params)
        return jax.lax.map(one, keys)

    @jax.jit
    def advance(states, keys, first, generations, log_every, data, test):
        def one(args):
            state, k = args

            def generation(state, i):
                g = first + i
                k_ask, k_tell = jax.random.split(jax.random.fold_in(k, g))

                def step(state):
                    population, state = es.ask(k_ask, state, params)
                    scores = _mean_scores(score_fn, population, data)
                    state, _ = es.tell(k_tell, population, -scores, state, params)
                    return state

                state = jax.lax.cond(g < generations, step, lambda s: s, state)
                passes = (g + 1) * population_size
                logged = (passes // log_every > (passes - population_size) // log_every) | (g == generations - 1)
                test_acc = jnp.float32(jnp.nan) if test is None else jax.lax.cond(
                    logged, lambda s: evaluate(score_fn, unravel(s.best_solution), test).mean(),
                    lambda s: jnp.float32(jnp.nan), state)
                return state, (-state.best_fitness, test_acc)

            return jax.lax.scan(generation, state, jnp.arange(call))

        return jax.lax.map(one, (states, keys))

    return start, advance, unravel
