"""A deliberately naive M2N2: a Python loop with one jitted call per step and host
(NumPy) sampling, the way a straightforward port of the paper's code runs. It exists
only as the reference point of benchmarks/throughput.py; use `m2n2_jax.run` instead.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np

import m2n2_jax as mj


@functools.partial(jax.jit, static_argnames=("score_fn", "mutation"))
def make_child(a, b, ratio, split, noise_key, std, data, *, score_fn, mutation: bool):
    """The merged (and mutated) child and its scores. Module level, so that a warm-up
    call compiles it once for every later run (a jit defined inside `naive_run` would
    recompile on every call)."""
    child = mj.split_point_slerp(a, b, ratio, split)
    if mutation:
        child = mj.gaussian_mutation(noise_key, child, std)
    return child, score_fn(child, data)


def naive_run(key, seed_models, score_fn, data, forward_passes, algorithm: mj.M2N2, params: mj.M2N2Params,
              seed: int = 0):
    """One run of `algorithm`'s archive size and mutation switch with `params`' alpha and
    mutation std (two seeds, stacked (2, ...)); returns (archive models, scores (N, M),
    wall seconds)."""
    rng = np.random.default_rng(seed)
    alpha, std = float(params.alpha), float(params.mutation_std)
    evaluate = jax.jit(score_fn)
    t0 = time.perf_counter()
    models = [jax.tree.map(lambda x: x[i], seed_models) for i in range(2)]
    scores = [np.asarray(evaluate(m, data)) for m in models]
    d = mj.num_params(models[0])
    for step in range(forward_passes - 2):
        s = np.stack(scores)
        per_point, f = (np.asarray(x) for x in mj.resource_fitness(s, alpha))
        a = rng.choice(len(models), p=f / f.sum())
        g = np.maximum(per_point - per_point[a], 0).sum(1)
        b = rng.choice(len(models), p=g / g.sum()) if g.sum() > 0 else rng.choice(len(models), p=f / f.sum())
        child, child_scores = make_child(models[a], models[b], rng.uniform(), rng.integers(d),
                                         jax.random.fold_in(key, step), std, data, score_fn=score_fn,
                                         mutation=algorithm.mutation)
        models.append(child)
        scores.append(np.asarray(child_scores))
        if len(models) > algorithm.archive_size:
            _, f = mj.resource_fitness(np.stack(scores), alpha)
            drop = int(np.argmin(np.asarray(f)))
            del models[drop], scores[drop]
    jax.block_until_ready(models)
    return models, np.stack(scores), time.perf_counter() - t0
