"""Gaussian mutation (docs/algorithm.md#mutation)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# JAX PRNG implementations the noise can be drawn with (docs/throughput.md, "Mutation
# RNG"): threefry2x32 is JAX's default and ours; threefry4x32 and rbg (XLA's
# RngBitGenerator, JAX's fastest on TPU) are options, neither faster in the loop on
# our CPU. Left out: philox4x32 and philox2x32 (jax 0.10.2 cannot compile them inside
# `shard_map`, where `run` evolves), unsafe_rbg (it differs from rbg only in split /
# fold_in, which the noise key never uses: the same noise).
MUTATION_RNGS = ("threefry2x32", "threefry4x32", "rbg")


def noise_key(key: jax.Array, rng: str = "threefry2x32") -> jax.Array:
    """The key the noise is drawn with: `key` itself for "threefry2x32", else a key of
    the JAX PRNG implementation `rng` whose words are drawn from `key` (so the noise is
    still a pure function of `key`)."""
    if rng not in MUTATION_RNGS:
        raise ValueError(f"rng must be one of {MUTATION_RNGS}, got {rng!r}")
    if rng == "threefry2x32":
        return key
    words = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=rng))).shape
    return jax.random.wrap_key_data(jax.random.bits(key, words, jnp.uint32), impl=rng)


def gaussian_mutation(key: jax.Array, tree, std: float, rng: str = "threefry2x32"):
    """Add N(0, std^2) noise to every coordinate of `tree`; leaves keep their dtype.

    The noise is one draw of D float32 normals laid out in `ravel_pytree` order, so
    mutating a pytree equals mutating its flat vector with the same key. (One draw
    of D values runs about 1.3x faster on CPU than one draw per leaf.) `rng` is one
    of `MUTATION_RNGS` (`noise_key`).
    """
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [math.prod(x.shape) for x in leaves]
    noise = std * jax.random.normal(noise_key(key, rng), (sum(sizes),), jnp.float32)
    out, offset = [], 0
    for x, size in zip(leaves, sizes):
        delta = noise[offset : offset + size].reshape(x.shape)
        out.append((x.astype(jnp.float32) + delta).astype(x.dtype))
        offset += size
    return jax.tree.unflatten(treedef, out)
