"""The archive: N stacked models, their score matrix and which slots are occupied.

Memory: the stacked models hold N copies of the model (N * D * itemsize bytes) and the
scores N * M float32; insertion updates one slot in place. The models may live in host
memory (`run(archive_memory="pinned_host")`): `get` then brings a slot to the device
and `replace` writes one back, so algorithms built on these functions need no change.
A recipe archive (`recipes` set) stores each slot as a recipe over S seed models
(`m2n2_jax.recipes`): the seeds are the only models held, and `get` builds a slot's.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

from m2n2_jax import recipes as recipes_lib
from m2n2_jax.recipes import Recipes
from m2n2_jax.sharding import is_on_host, on_device


@struct.dataclass
class Archive:
    """Stacked archive state.

    Attributes:
      models: the model pytree with a leading axis N (slot) on every leaf.
      scores: S, float32 (N, M); all zeros in an empty slot.
      occupied: bool (N,); empty slots are never parents and are replaced first.
      asked: int32 scalar, the number of children asked for so far (M2N2's warm-up
        counts them; one per ask unless `M2N2.population_size` > 1).
      recipes: None, or the seeds and cut points of a recipe archive, whose `models`
        are then the slots' recipes, float32 (N, G, C + 1, S) (`m2n2_jax.recipes`).
    """

    models: object
    scores: jax.Array
    occupied: jax.Array
    asked: jax.Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
    recipes: Recipes | None = None

    @property
    def size(self) -> int:
        return self.scores.shape[0]


def empty(template, num_slots: int, num_points: int) -> Archive:
    """An archive of `num_slots` empty slots shaped like the model `template`."""
    models = jax.tree.map(lambda x: jnp.zeros((num_slots,) + x.shape, x.dtype), template)
    return Archive(
        models=models,
        scores=jnp.zeros((num_slots, num_points), jnp.float32),
        occupied=jnp.zeros((num_slots,), bool),
        asked=jnp.zeros((), jnp.int32),
    )


def empty_recipes(seeds, num_slots: int, num_points: int, groups: tuple[int, ...], capacity: int) -> Archive:
    """A recipe archive of `num_slots` empty slots over the stacked `seeds`, with room
    for `capacity` cut points per group."""
    recipes = recipes_lib.empty(seeds, groups, capacity)
    return Archive(
        models=jnp.zeros((num_slots,) + recipes.child.shape, jnp.float32),
        scores=jnp.zeros((num_slots, num_points), jnp.float32),
        occupied=jnp.zeros((num_slots,), bool),
        asked=jnp.zeros((), jnp.int32),
        recipes=recipes,
    )


def get(archive: Archive, index: jax.Array):
    """The model in slot `index`, a pytree without the slot axis, in device memory
    (built from its recipe in a recipe archive)."""
    if archive.recipes is not None:
        return archive.recipes.build(archive.models[index])
    return on_device(jax.tree.map(lambda p: p[index], archive.models))


def replace(archive: Archive, index: jax.Array, model, scores: jax.Array, accept: jax.Array) -> Archive:
    """Write `model` (a recipe in a recipe archive) and its `scores` into slot `index`
    if `accept`, else return as is.

    Only one slot is touched either way, so inside `lax.scan` the update happens in
    place. Leaves in device memory are written under a `lax.cond` on `accept`: a
    select between the new slot and the old one would copy the old slot out first (it
    is read and overwritten in one buffer), a whole model of fresh memory at every
    step (SmolLM2 on a 2-core CPU: 0.54 GB faulted in, 0.3 s of a 0.9 s step). Leaves
    in host memory rewrite a rejected slot with its own contents.
    """
    keep = lambda new, stack: jnp.where(accept, new, on_device(stack[index]))
    stacks, treedef = jax.tree.flatten(archive.models)
    news = jax.tree.leaves(model)
    device = [i for i, stack in enumerate(stacks) if not is_on_host(stack)]
    written = dict(zip(device, jax.lax.cond(
        accept, lambda s: [x.at[index].set(news[i]) for x, i in zip(s, device)], lambda s: s,
        [stacks[i] for i in device])))
    host_write = lambda stack, new: stack.at[index].set(jax.device_put(keep(new, stack), jax.memory.Space.Host))
    models = [written[i] if i in written else host_write(x, y) for i, (x, y) in enumerate(zip(stacks, news))]
    return archive.replace(
        models=jax.tree.unflatten(treedef, models),
        scores=archive.scores.at[index].set(keep(scores, archive.scores)),
        occupied=archive.occupied.at[index].set(archive.occupied[index] | accept),
    )


def insert_worst_leaves(archive: Archive, model, scores: jax.Array, fitness: jax.Array) -> tuple[Archive, jax.Array]:
    """N + 1 compete: the one with the lowest fitness leaves (docs/algorithm.md#step).

    Args:
      archive: N slots.
      model, scores: the candidate and its scores (M,).
      fitness: f of the N archive models followed by the candidate, shape (N + 1,),
        computed over all N + 1 together.

    Returns:
      (archive, dropped): `dropped` is the index that left, N when the candidate
      itself was rejected. Empty slots leave first (lowest index first); otherwise
      the lowest fitness, first index on ties.
    """
    n = archive.size
    contenders = jnp.concatenate([archive.occupied, jnp.ones((1,), bool)])
    dropped = jnp.argmin(jnp.where(contenders, fitness, -jnp.inf))
    accept = dropped < n
    slot = jnp.where(accept, dropped, 0)
    return replace(archive, slot, model, scores, accept), dropped


def best(archive: Archive):
    """(model, mean training score) of the occupied slot with the best mean score, first on ties."""
    means = jnp.where(archive.occupied, archive.scores.mean(axis=1), -jnp.inf)
    index = jnp.argmax(means)
    return get(archive, index), means[index]


def without_seeds(state):
    """`state` with the seeds of every recipe archive in it left out (None): what a
    checkpoint saves, since a run has its seeds already (`with_seeds` puts them back)."""
    drop = lambda s: s.replace(recipes=s.recipes.replace(seeds=None)) if _has_recipes(s) else s
    return jax.tree.map(drop, state, is_leaf=lambda x: isinstance(x, Archive))


def with_seeds(state, seeded):
    """`state` (from `without_seeds`) with the seeds of `seeded`, a state like it, back in."""
    put = lambda s, t: s.replace(recipes=s.recipes.replace(seeds=t.recipes.seeds)) if _has_recipes(s) else s
    return jax.tree.map(put, state, seeded, is_leaf=lambda x: isinstance(x, Archive))


def _has_recipes(node) -> bool:
    return isinstance(node, Archive) and node.recipes is not None


def insert_each(archive: Archive, models, scores: jax.Array, insert) -> Archive:
    """`insert(archive, model, scores (M,)) -> archive` applied to each of P stacked
    candidates in turn; checks at trace time that `scores` is (P, M) and the models are
    shaped like the archive's."""
    p = scores.shape[0]
    chex.assert_shape(scores, (p, archive.scores.shape[1]))
    expected = jax.tree.map(lambda x: jax.ShapeDtypeStruct((p,) + x.shape[1:], x.dtype), archive.models)
    chex.assert_trees_all_equal_shapes(models, expected)
    for i in range(p):
        archive = insert(archive, jax.tree.map(lambda x: x[i], models), scores[i].astype(jnp.float32))
    return archive
