"""The merge operators of experiments/lm_skills.py, with their coefficient grids.

Each operator of the registry (`m2n2_jax.merge_ops.OPERATORS`, by its name there) that
has a coefficient grid here merges the two specialists: linear and slerp move from
specialist a (weight 0) to b (weight 1); the task-vector ones add both task vectors, at
weight 1, to the base (scale multiplies their sum), with M2N2's conventions and DARE's
1 / density rescale (the registry's "m2n2" defaults). An operator's coefficients are
chosen on the training questions: every combination of its grid (`GRIDS`: coefficient
name -> the values tried; "weight", or the registry's `density` and `scale`) is one
evaluation on them, and `best_merges` keeps the best. DARE draws its drop masks from a
key, so its merge differs between runs; the others ignore the key.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from m2n2_jax import merge_ops


def checked_grids(grids: dict) -> dict:
    """`grids`, after a ValueError if one is keyed by a name that is not a merge operator
    of the registry."""
    unknown = sorted(set(grids) - set(merge_ops.OPERATORS))
    if unknown:
        raise ValueError(f"coefficient grids for {unknown}, not merge operators; "
                         f"the registry: {', '.join(merge_ops.OPERATORS)}")
    return grids


SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
# density is the fraction kept (DARE: drop rates 0.1 ... 0.9, in that order).
GRIDS = checked_grids({
    "linear": {"weight": np.linspace(0, 1, 11)},
    "slerp": {"weight": np.linspace(0, 1, 11)},
    "task_arithmetic": {"scale": np.linspace(0.3, 1.5, 13)},
    "ties": {"density": (0.1, 0.2, 0.4, 0.7, 1.0), "scale": SCALES},
    "dare": {"density": (0.9, 0.7, 0.5, 0.3, 0.1), "scale": SCALES},
})
BASELINES = tuple(name for name in merge_ops.OPERATORS if name in GRIDS)  # the registry's order


def merge(name: str, models: dict, coeffs: dict, key):
    """The merge of the two specialists by operator `name` with coefficients `coeffs`;
    `models` holds "base", "specialist_a" and "specialist_b"."""
    op = merge_ops.operator(name)
    if "weight" in coeffs:  # from specialist a (weight 0) to specialist b (weight 1)
        return op(key, models["specialist_a"], [models["specialist_b"]], jnp.reshape(coeffs["weight"], (1,)))
    return op(key, models["base"], [models["specialist_a"], models["specialist_b"]], jnp.ones(2), **coeffs)


def grid(name: str) -> dict[str, np.ndarray]:
    """Every combination of the operator's coefficients, as float32 arrays of one length."""
    names = list(GRIDS[name])
    combos = list(itertools.product(*(GRIDS[name][n] for n in names)))
    return {n: np.asarray([c[i] for c in combos], np.float32) for i, n in enumerate(names)}


def best_merges(name: str, models: dict, evaluate: Callable, train, keys) -> list[tuple]:
    """For each key: (merged params, chosen coefficients, mean training score of every
    grid point) of operator `name` (the key only matters to DARE). The first grid point
    wins a tie.

    evaluate(params, data) -> mean score, jitted: one compilation of it serves every
    operator and grid point; each operator compiles only its merge (once for all keys).
    """
    coeffs = grid(name)
    points = [{n: v[i] for n, v in coeffs.items()} for i in range(len(next(iter(coeffs.values()))))]
    # The models are arguments, not constants, so XLA does not constant-fold the merge.
    merge_fn = jax.jit(functools.partial(merge, name))
    found = []
    for key in keys:
        scores = np.asarray([float(evaluate(merge_fn(models, c, key), train)) for c in points], np.float32)
        i = int(np.argmax(scores))
        chosen = {n: round(float(v), 4) for n, v in points[i].items()}
        found.append((merge_fn(models, points[i], key), chosen, scores))
    return found
