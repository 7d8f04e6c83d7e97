"""Task vectors: a fine-tuned model as its difference from a common base.

M2N2's task-vector mode (our extension, not in the paper) merges tau = model - base
instead of the models themselves, and may rescale each child's task vector per
parameter group, so children can leave the span of interpolations between the seeds
(e.g. reach base + tau_a + tau_b, which no interpolation of the two fine-tunes gives).
Task vectors are float32 (a difference of two bf16 models is not bf16-exact); the
child is cast back to the base's dtypes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def task_vector(model, base):
    """tau = model - base, leaf by leaf, in float32."""
    return jax.tree.map(lambda x, o: x.astype(jnp.float32) - o.astype(jnp.float32), model, base)


def add_task_vector(base, tau):
    """base + tau, computed in float32, each leaf in the base's dtype."""
    return jax.tree.map(lambda o, t: (o.astype(jnp.float32) + t).astype(o.dtype), base, tau)


def scale_groups(key: jax.Array, tau, std: jax.Array, groups: tuple[int, ...]):
    """tau with group g's leaves times s_g = exp(std * z_g), z_g ~ N(0, 1): a log-normal
    magnitude per group (median 1), so repeated children refine a task vector's length
    multiplicatively. std = 0 returns tau unchanged (s = 1 exactly)."""
    leaves, treedef = jax.tree.flatten(tau)
    scales = jnp.exp(std * jax.random.normal(key, (max(groups) + 1,)))
    return jax.tree.unflatten(treedef, [x * scales[g] for g, x in zip(groups, leaves)])
