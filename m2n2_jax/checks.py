"""Validation at the library's boundaries: clear ValueErrors instead of silent NaNs or
errors deep inside a compiled program. Each names the leaf or argument at fault."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def stack_models(models: Sequence, donate: bool = False) -> object:
    """Stack model pytrees along a new leading axis, checking they match.

    `donate`: delete each leaf's jax.Arrays once it is stacked (as jit's donation), so
    that the stacking never holds more than one leaf twice.

    Raises:
      ValueError: no models, or models that differ in structure, shape or dtype
        (the message names the first leaf that differs).
    """
    if len(models) == 0:
        raise ValueError("need at least one seed model, got none")
    ref_leaves, ref_def = jax.tree.flatten_with_path(models[0])
    for i, model in enumerate(models[1:], start=1):
        leaves, treedef = jax.tree.flatten_with_path(model)
        if treedef != ref_def:
            raise ValueError(f"seed model {i} has a different pytree structure than model 0: "
                             f"{_structure_difference(ref_leaves, leaves, i)}")
        for (path, x), (_, y) in zip(leaves, ref_leaves):
            if jnp.shape(x) != jnp.shape(y) or jnp.result_type(x) != jnp.result_type(y):
                raise ValueError(
                    f"seed model {i} leaf {jax.tree_util.keystr(path)} is {jnp.result_type(x)}{list(jnp.shape(x))}, "
                    f"model 0 has {jnp.result_type(y)}{list(jnp.shape(y))}; all seed models must match"
                )
    if not donate:
        return jax.tree.map(lambda *xs: jnp.stack(xs), *models)

    columns = list(zip(*(jax.tree.leaves(m) for m in models)))  # leaf j of every model
    last = {id(x): j for j, xs in enumerate(columns) for x in xs}  # an array may fill several leaves
    stacked = []
    for j, xs in enumerate(columns):
        stacked.append(jax.block_until_ready(jnp.stack(xs)))
        for x in xs:
            if isinstance(x, jax.Array) and last[id(x)] == j and not x.is_deleted():
                x.delete()
    return jax.tree.unflatten(jax.tree.structure(models[0]), stacked)


def _structure_difference(leaves_0, leaves_i, i: int) -> str:
    """The first place where two flattened pytrees ([(path, leaf)]) differ, short: the
    shortest path in one model only, e.g. "['params']['layers_02'] only in model 1"."""
    paths = {0: [tuple(p) for p, _ in leaves_0], i: [tuple(p) for p, _ in leaves_i]}
    for own, other in ((0, i), (i, 0)):
        leaves = set(paths[other])
        prefixes = {p[:k] for p in paths[other] for k in range(len(p) + 1)}
        for path in paths[own]:
            if path in leaves:
                continue
            short = next((path[:k] for k in range(1, len(path) + 1) if path[:k] not in prefixes), None)
            if short is None:
                return f"{jax.tree_util.keystr(path)} is a leaf in model {own} and a subtree in model {other}"
            return f"{jax.tree_util.keystr(short)} only in model {own}"
    return "same paths, other node types (e.g. a tuple for a list, or another class)"


def check_float_leaves(tree, what: str) -> None:
    """Raise unless every leaf is a floating-point array: merging interpolates and
    mutation adds noise, which integer or boolean leaves cannot hold."""
    for path, leaf in jax.tree.flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(f"{what}: leaf {jax.tree_util.keystr(path)} is {jnp.result_type(leaf)}; every leaf "
                             "that is merged must be floating point (keep integer buffers out of the model, "
                             "e.g. in score_fn's closure)")


def check_contract(algorithm, seed_models, num_points: int, params):
    """Check, with `jax.eval_shape` (nothing computed), what the runner relies on
    (base.py): `ask` and `tell` keep the state's structure and every leaf's shape and
    dtype (the state is a `lax.scan` carry; a Python number in the state becomes a
    weakly typed array that `tell` must keep of the same dtype).

    Args:
      seed_models: one run's seeds, stacked (S, ...).
      params: one run's params.

    Returns:
      The state's shapes (`jax.ShapeDtypeStruct`s).

    Raises:
      ValueError naming the method and the offending leaf.
    """
    name = type(algorithm).__name__
    num_seeds = jax.tree.leaves(seed_models)[0].shape[0]
    key = jax.random.key(0)
    seed_scores = jax.ShapeDtypeStruct((num_seeds, num_points), jnp.float32)
    state = jax.eval_shape(algorithm.init, key, seed_models, seed_scores, params)
    children, asked = jax.eval_shape(algorithm.ask, key, state, params)
    _same_state(name + ".ask", asked, state)
    pop = algorithm.population_size
    scores = jax.ShapeDtypeStruct((pop, num_points), jnp.float32)
    for path, child in jax.tree.flatten_with_path(children)[0]:
        if child.shape[:1] != (pop,):
            raise ValueError(f"{name}.ask: child leaf {jax.tree_util.keystr(path)} has shape {child.shape}, "
                             f"expected a leading axis of population_size = {pop}")
    _same_state(name + ".tell", jax.eval_shape(algorithm.tell, key, state, children, scores, params), state)
    return state


def _same_state(what: str, new, old) -> None:
    if jax.tree.structure(new) != jax.tree.structure(old):
        raise ValueError(f"{what} changed the state's structure: "
                         f"{jax.tree.structure(new)} vs {jax.tree.structure(old)}")
    for (path, x), y in zip(jax.tree.flatten_with_path(new)[0], jax.tree.leaves(old)):
        if (x.shape, x.dtype) != (y.shape, y.dtype):
            raise ValueError(f"{what}: state leaf {jax.tree_util.keystr(path)} is {x.dtype}{list(x.shape)}, "
                             f"init gave {y.dtype}{list(y.shape)}; every leaf must keep its shape and dtype")


def check_finite_models(tree, what: str) -> None:
    """Raise if any leaf of `tree` holds NaN or inf."""
    for path, leaf in jax.tree.flatten_with_path(tree)[0]:
        if not np.all(np.isfinite(np.asarray(leaf, np.float32))):
            raise ValueError(f"{what}: leaf {jax.tree_util.keystr(path)} has non-finite values")


def check_scores(scores, expected_points: int, what: str) -> None:
    """Raise unless `scores` is (..., M) with finite values in [0, 1]."""
    scores = np.asarray(scores)
    if scores.shape[-1:] != (expected_points,):
        raise ValueError(f"{what}: score_fn must return shape ({expected_points},), got {scores.shape[-1:]}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{what}: score_fn returned non-finite scores")
    if scores.min() < 0 or scores.max() > 1:
        raise ValueError(f"{what}: scores must lie in [0, 1], got range [{scores.min()}, {scores.max()}]")


def valid_children(children, scores: jax.Array) -> jax.Array:
    """On device: True iff every child's parameters are finite and all scores finite in [0, 1].

    x * 0 is 0 where x is finite and NaN where it is not, so one float sum per leaf
    tells (a sum runs vectorised on XLA:CPU: a third of the time of `all(isfinite)`
    over booleans, on a SmolLM2 child)."""
    floats = [x for x in jax.tree.leaves(children) if jnp.issubdtype(x.dtype, jnp.inexact)]
    finite = jnp.isfinite(sum((jnp.sum(x * 0, dtype=jnp.float32) for x in floats), jnp.float32(0)))
    return finite & jnp.all((scores >= 0) & (scores <= 1))
