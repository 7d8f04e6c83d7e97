"""The merge operators of experiments/lm_skills.py by name, with their coefficient grids.

Each operator (`m2n2_jax.merge_ops`) merges the two specialists, the task-vector ones
relative to the base. An operator's coefficients are chosen on the training
questions: every combination of its grid (`GRIDS`) is one evaluation on them, and
`best_merges` keeps the best. DARE draws its drop masks from a key, so its merge
differs between runs; the others ignore the key.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from m2n2_jax import merge_ops

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


@dataclasses.dataclass(frozen=True)
class Operator:
    """merge(models, coeffs, key) -> params; `models` holds "base", "specialist_a" and
    "specialist_b"; grid: coefficient name -> the values tried."""

    merge: Callable
    grid: dict


def _pair(m):
    return [m["specialist_a"], m["specialist_b"]]


def _interpolation(w):
    """Weights (1 - w, w): with normalize=False, linear is (1 - w) a + w b."""
    w = jnp.asarray(w, jnp.float32)
    return jnp.stack([1 - w, w])


# The task-vector operators use both task vectors at weight 1 (scale multiplies their
# sum), M2N2's conventions and DARE's 1 / density rescale (merge_ops' defaults).
OPERATORS = {
    "linear": Operator(lambda m, c, k: merge_ops.linear(_pair(m), _interpolation(c["weight"]), normalize=False),
                       {"weight": np.linspace(0, 1, 11)}),
    "slerp": Operator(lambda m, c, k: merge_ops.slerp(m["specialist_a"], m["specialist_b"], c["weight"]),
                      {"weight": np.linspace(0, 1, 11)}),
    "task_arithmetic": Operator(
        lambda m, c, k: merge_ops.task_arithmetic(m["base"], _pair(m), [1.0, 1.0], scale=c["scale"]),
        {"scale": np.linspace(0.3, 1.5, 13)}),
    "ties": Operator(
        lambda m, c, k: merge_ops.ties(m["base"], _pair(m), [1.0, 1.0], c["density"], scale=c["scale"]),
        {"density": (0.1, 0.2, 0.4, 0.7, 1.0), "scale": SCALES}),
    # density is the fraction kept (drop rates 0.1 ... 0.9, in that order).
    "dare": Operator(
        lambda m, c, k: merge_ops.dare(k, m["base"], _pair(m), [1.0, 1.0], c["density"], scale=c["scale"]),
        {"density": (0.9, 0.7, 0.5, 0.3, 0.1), "scale": SCALES}),
}
BASELINES = tuple(OPERATORS)
GRIDS = {name: op.grid for name, op in OPERATORS.items()}


def merge(name: str, models: dict, coeffs: dict, key):
    """The merge of the two specialists by operator `name` with coefficients `coeffs`."""
    return OPERATORS[name].merge(models, coeffs, key)


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
