"""Classic model-merging operators over pytrees, usable alone or as M2N2's baselines.

Models are pytrees of one structure; every function is pure and jittable (its
coefficients may be traced, so a grid of them is one `lax.map`), computes in float32
and returns leaves in the dtype of the first model. For the operators that use the
common base model, tau = model - base is a model's task vector.

- `linear`:           (1 - w) a + w b
- `slerp`:            spherical interpolation (`m2n2_jax.merge.slerp`)
- `task_arithmetic`:  base + scale (tau_a + tau_b)              (Ilharco et al. 2023)
- `ties`:             trim, elect sign, disjoint mean          (Yadav et al. 2023)
- `dare`:             drop and rescale, then task arithmetic   (Yu et al. 2024)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2n2_jax.merge import slerp

__all__ = ["dare", "linear", "slerp", "task_arithmetic", "ties"]


def _f32(x):
    return x.astype(jnp.float32)


def linear(a, b, weight):
    """(1 - weight) a + weight b, leaf by leaf; weight 0 gives a, 1 gives b."""
    w = jnp.asarray(weight, jnp.float32)
    return jax.tree.map(lambda x, y: ((1 - w) * _f32(x) + w * _f32(y)).astype(x.dtype), a, b)


def task_arithmetic(base, a, b, scale):
    """base + scale (tau_a + tau_b); scale 0.5 is the plain average of a and b."""
    s = jnp.asarray(scale, jnp.float32)
    return jax.tree.map(lambda o, x, y: (_f32(o) + s * (_f32(x) - _f32(o) + _f32(y) - _f32(o))).astype(o.dtype),
                        base, a, b)


def _trim(tau, density):
    """tau with all but its k = round(density n) largest-magnitude entries zeroed
    (at least one kept; entries tied with the k-th largest are kept too)."""
    n = tau.size
    k = jnp.clip(jnp.round(density * n).astype(jnp.int32), 1, n)
    threshold = jnp.sort(jnp.abs(tau).ravel())[n - k]
    return jnp.where(jnp.abs(tau) >= threshold, tau, 0.0)


def ties(base, a, b, density, scale):
    """TIES merging, leaf by leaf (each tensor trimmed on its own, as mergekit does).

    1. Trim: keep the `density` fraction of largest-magnitude entries of each task
       vector (see `_trim`), zero the rest.
    2. Elect: per entry, the sign of the sum of the trimmed task vectors.
    3. Disjoint mean: per entry, the mean of the non-zero trimmed values with the
       elected sign (0 where there are none).
    Result: base + scale * that mean.
    """
    density = jnp.asarray(density, jnp.float32)
    s = jnp.asarray(scale, jnp.float32)

    def leaf(o, x, y):
        taus = jnp.stack([_trim(_f32(x) - _f32(o), density), _trim(_f32(y) - _f32(o), density)])
        sign = jnp.sign(taus.sum(0))
        agree = (jnp.sign(taus) == sign) & (taus != 0)
        count = agree.sum(0)
        mean = jnp.where(agree, taus, 0.0).sum(0) / jnp.maximum(count, 1)
        return (_f32(o) + s * mean).astype(o.dtype)

    return jax.tree.map(leaf, base, a, b)


def dare(key, base, a, b, drop_rate, scale):
    """DARE: drop each task-vector entry with probability `drop_rate` (independently
    for a and b), rescale the kept ones by 1 / (1 - drop_rate), then
    base + scale (tau_a' + tau_b'). drop_rate 0 is `task_arithmetic`; drop_rate < 1."""
    p = jnp.asarray(drop_rate, jnp.float32)
    s = jnp.asarray(scale, jnp.float32)
    leaves, treedef = jax.tree.flatten(base)
    keys = jax.random.split(key, (len(leaves), 2))

    def leaf(k, o, x, y):
        keep_a = jax.random.bernoulli(k[0], 1 - p, o.shape)
        keep_b = jax.random.bernoulli(k[1], 1 - p, o.shape)
        tau = jnp.where(keep_a, _f32(x) - _f32(o), 0.0) + jnp.where(keep_b, _f32(y) - _f32(o), 0.0)
        return (_f32(o) + s * tau / (1 - p)).astype(o.dtype)

    out = [leaf(k, o, x, y) for k, o, x, y in zip(keys, leaves, jax.tree.leaves(a), jax.tree.leaves(b))]
    return jax.tree.unflatten(treedef, out)
