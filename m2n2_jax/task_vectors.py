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
    return _times_groups(tau, jnp.exp(std * jax.random.normal(key, (max(groups) + 1,))), groups)


def _times_groups(tau, scales: jax.Array, groups: tuple[int, ...]):
    """tau with group g's leaves times scales[g]."""
    leaves, treedef = jax.tree.flatten(tau)
    return jax.tree.unflatten(treedef, [x * scales[g] for g, x in zip(groups, leaves)])


def group_dots(a, b, groups: tuple[int, ...]) -> jax.Array:
    """(G,) float32: <a_g, b_g>, the dot product of two pytrees within each group."""
    dots = [jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return jnp.zeros(max(groups) + 1, jnp.float32).at[jnp.asarray(groups)].add(jnp.stack(dots))


def union_norms(tau_a, tau_b, groups: tuple[int, ...]) -> jax.Array:
    """(G,): U_g = sqrt(|a_g|^2 + |b_g|^2 - max(<a_g, b_g>, 0)), the norm of the union
    of two parents' skills if each task vector is a sum of orthogonal unit skills
    (|a|^2 counts a's skills, <a, b> the shared ones): |a + b| for orthogonal parents,
    |a| for equal ones, |a| when b's skills are a subset of a's."""
    aa, bb, ab = group_dots(tau_a, tau_a, groups), group_dots(tau_b, tau_b, groups), group_dots(tau_a, tau_b, groups)
    return jnp.sqrt(jnp.maximum(aa + bb - jnp.maximum(ab, 0.0), 0.0))


def rescale_groups(tau, norms: jax.Array, groups: tuple[int, ...]):
    """tau with each group g scaled to norm norms[g] (a zero group stays zero)."""
    current = jnp.sqrt(group_dots(tau, tau, groups))
    return _times_groups(tau, jnp.where(current > 0, norms / jnp.where(current > 0, current, 1.0), 0.0), groups)
