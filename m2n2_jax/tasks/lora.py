"""Low-rank adapters (LoRA) on the (out, in) weight matrices of a model pytree.

An adapter for weight W (out, in) is a pair A (rank, in), B (out, rank); the adapted
weight is W + (alpha / rank) B A. B starts at zero, so training starts at the base
model. Adapters are a pytree of their own, {path string: {"a": A, "b": B}} keyed by
`mj.leaf_path`, so they save as safetensors as they are and train with optax while
the base stays frozen; `merge` folds them into a full model, the form M2N2 merges.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from m2n2_jax.merge import leaf_path


def targets(model, select: Callable[[str], bool]) -> dict[str, tuple]:
    """{path: shape} of the 2-d leaves whose path `select` accepts."""
    found = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(model):
        name = leaf_path(path)
        if jnp.ndim(leaf) == 2 and select(name):
            found[name] = tuple(leaf.shape)
    if not found:
        raise ValueError("no 2-d weight matched the LoRA target selector")
    return found


def init(key: jax.Array, model, rank: int, select: Callable[[str], bool], dtype=jnp.float32) -> dict:
    """Adapters for every selected (out, in) leaf: A ~ N(0, 1/in) (rank, in), B = 0."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    shapes = targets(model, select)
    keys = jax.random.split(key, len(shapes))
    return {name: {"a": jax.random.normal(k, (rank, shape[1]), dtype) / jnp.sqrt(shape[1]).astype(dtype),
                   "b": jnp.zeros((shape[0], rank), dtype)}
            for k, (name, shape) in zip(keys, sorted(shapes.items()))}


def delta(adapter: dict, alpha: float) -> jax.Array:
    """(out, in): (alpha / rank) B A of one adapter, in float32."""
    a, b = adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32)
    return (alpha / a.shape[0]) * (b @ a)


def merge(model, adapters: dict, alpha: float):
    """params with every adapted leaf W replaced by W + (alpha / rank) B A (W's dtype).

    Every adapter must name a leaf of `model` with its shape.
    """
    seen = set()

    def add(path, leaf):
        name = leaf_path(path)
        if name not in adapters:
            return leaf
        seen.add(name)
        d = delta(adapters[name], alpha)
        if d.shape != leaf.shape:
            raise ValueError(f"adapter {name}: delta {d.shape} for a leaf of shape {leaf.shape}")
        return (leaf.astype(jnp.float32) + d).astype(leaf.dtype)

    merged = jax.tree_util.tree_map_with_path(add, model)
    if seen != set(adapters):
        raise ValueError(f"adapters name no leaf of the model: {sorted(set(adapters) - seen)[:4]}")
    return merged
