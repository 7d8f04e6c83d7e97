"""M2N2, Model Merging of Natural Niches (Abrantes, Lange, Tang, GECCO 2025, arXiv 2508.16204).

A steady-state evolution over an archive of N models (docs/algorithm.md): parents are sampled by
resource-normalised fitness and attraction, merged with the split-point slerp, mutated
when evolving from scratch, and the child competes with the N archive models; the one
with the lowest fitness leaves. The switches that give the paper's ablations, and the
options of its real-model experiments (capacity rule, worst subtraction, parameter
groups), are static fields of `M2N2`; the numbers (alpha, eps, warm-up steps, ...) are
`Params`, traced. The defaults are the paper's digits code.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from m2n2_jax import archive as archive_lib
from m2n2_jax import recipes
from m2n2_jax.archive import Archive
from m2n2_jax.base import Algorithm
from m2n2_jax.fitness import CAPACITY_RULES, resource_fitness
from m2n2_jax.merge import (
    coefficients_from_reductions,
    group_sizes,
    leaf_groups,
    once,
    random_split,
    slerp,
    split_point_slerp,
    split_words,
)
from m2n2_jax.mutation import MUTATION_RNGS, gaussian_mutation
from m2n2_jax.selection import proportional, sample, sample_parents
from m2n2_jax.task_vectors import add_task_vector, rescale_groups, scale_groups, task_vector, union_norms


@struct.dataclass
class Params:
    """Dynamic hyperparameters of M2N2 (traced; a sweep is a `vmap` over them).

    Attributes:
      alpha: exponent of the resource normaliser z_j = (sum_i S[i, j])**alpha; 0 turns
        competition off (plain summed score, an ordinary GA).
      mutation_std: std of the Gaussian noise added to every child coordinate (used
        when `M2N2.mutation` is on; the paper: 0.01 from scratch).
      slerp_eps: below this sin(Omega) the merge falls back to linear interpolation.
      capacity: c, shape (M,), the supply of each resource (`M2N2.capacity_rule`
        "fixed"); None means all ones.
      eps: added to the normaliser, z_j^alpha + eps (the paper's equation); 0 keeps
        the digits code's zero guard only.
      warmup: W, the number of first children whose parents are both drawn uniformly
        among the occupied slots (the paper: at most 50 with pre-trained seeds; one
        child per step unless `M2N2.population_size` > 1). No effect without
        crossover (`M2N2.crossover=False`: the copied parent is always drawn by f).
      slerp_dot_threshold: the merge is linear where |cos(Omega)| exceeds it; 1 is
        the paper's rule (near-antiparallel parents give children far outside the
        parents' scale), mergekit's guard is 0.9995.
      base: the common base model (`M2N2.task_vectors`), a pytree like the seeds.
      magnitude_std: in task-vector mode, each child's task vector is scaled per
        parameter group by exp(magnitude_std * N(0, 1)); 0: no rescaling.
    """

    alpha: jax.Array = 1.0
    mutation_std: jax.Array = 0.01
    slerp_eps: jax.Array = 1e-6
    capacity: jax.Array | None = None
    eps: jax.Array = 0.0
    warmup: jax.Array = 0
    slerp_dot_threshold: jax.Array = 1.0
    base: object = None
    magnitude_std: jax.Array = 0.0


TASK_VECTOR_NORMS = ("merge", "union")
ARCHIVES = ("models", "recipes")


@dataclasses.dataclass(frozen=True)
class M2N2(Algorithm):
    """M2N2 and its ablations (static structure; hashable).

    Attributes:
      archive_size: N, the number of models kept (>= 2).
      attraction: sample parent B by complementarity to A (else B ~ f, like A).
      crossover: merge two parents; if False the child is a copy of parent A (then
        mutated): the "no crossover" ablations.
      split_point: use the split-point slerp; if False a plain slerp with one ratio.
      mutation: add N(0, mutation_std^2) noise to each child (off when merging
        pre-trained models).
      capacity_rule: "fixed" (c = `Params.capacity`, ones by default) or "max"
        (c_j = max_i S'[i, j] over the competing models: the paper's rule for
        continuous scores), recomputed wherever fitness is.
      subtract_worst: subtract each datapoint's lowest score among the competing
        models before fitness (the paper's image-generation fitness).
      groups: a function of a leaf's path string (`m2n2_jax.merge.leaf_path`, e.g.
        "layers/0/attn/kernel") to a group label; each group gets its own ratio,
        split point and slerp angle. None: one group. Pass a module-level function
        (an equal function reuses compiled code; a new lambda recompiles).
      task_vectors: our extension, not the paper's: merge the task vectors
        tau = model - `Params.base` instead of the models (child = base +
        merge(tau_A, tau_B)), and rescale each child's tau per group by a log-normal
        magnitude (`Params.magnitude_std`), so children can extrapolate (reach e.g.
        base + tau_a + tau_b) and refine a task vector's length.
      task_vector_norm: in task-vector mode, "merge" keeps the merge's norm (an
        interpolation of tau_a and tau_b: about |tau_a + tau_b| / sqrt(2) for
        orthogonal parents at w = 1/2) and "union" rescales each group of the merge
        to `task_vectors.union_norms` of the parents (|tau_a + tau_b| for orthogonal
        ones, the parents' norm for equal ones), before the log-normal magnitude.
      mutation_rng: the JAX PRNG implementation the mutation noise is drawn with (one
        of `mutation.MUTATION_RNGS`; its key derived from the step key). The default
        "threefry2x32" is JAX's; "threefry4x32", or "rbg" (JAX's fastest on TPU, with
        caveats) may draw the D normals faster on other devices; on our CPU neither
        speeds the loop up by more than 5 % (docs/throughput.md, "Mutation RNG").
      population_size: P, the children of one `ask` (one step): each
        drawn independently from the same archive (its own parents, ratio, split
        point and noise, from `jax.random.split(key, P)`; P = 1 uses `key` itself),
        then told one after another. P > 1 shares a step's fixed work (fitness of
        the archive, the loop) among P children; the archive then changes only every
        P children (docs/throughput.md, "Children per step").
      archive: "models" (each slot holds its model) or "recipes" (each slot holds its
        recipe over the seeds, `m2n2_jax.recipes`; the seeds are the only models
        kept: docs/recipes.md). Recipes need no mutation, no task vectors and one
        child per step.
      max_children: with recipes and a split point, the children a run may ask for
        (each adds one cut point per group; static storage of that many cuts). `run`
        refuses a budget above it; past it, a manual loop's children are NaN.
    """

    archive_size: int = 20
    attraction: bool = True
    crossover: bool = True
    split_point: bool = True
    mutation: bool = True
    capacity_rule: str = "fixed"
    subtract_worst: bool = False
    groups: Callable[[str], Hashable] | None = None
    task_vectors: bool = False
    task_vector_norm: str = "merge"
    mutation_rng: str = "threefry2x32"
    population_size: int = 1
    archive: str = "models"
    max_children: int | None = None

    def __post_init__(self):
        if self.task_vector_norm not in TASK_VECTOR_NORMS:
            raise ValueError(f"task_vector_norm must be one of {TASK_VECTOR_NORMS}, got {self.task_vector_norm!r}")
        if not isinstance(self.archive_size, int) or self.archive_size < 2:
            raise ValueError(f"archive_size must be an int >= 2, got {self.archive_size!r}")
        if self.capacity_rule not in CAPACITY_RULES:
            raise ValueError(f"capacity_rule must be one of {CAPACITY_RULES}, got {self.capacity_rule!r}")
        if self.groups is not None and not callable(self.groups):
            raise ValueError(f"groups must be a function of a leaf path, got {self.groups!r}")
        if self.mutation_rng not in MUTATION_RNGS:
            raise ValueError(f"mutation_rng must be one of {MUTATION_RNGS}, got {self.mutation_rng!r}")
        if not isinstance(self.population_size, int) or self.population_size < 1:
            raise ValueError(f"population_size must be an int >= 1, got {self.population_size!r}")
        if self.archive not in ARCHIVES:
            raise ValueError(f"archive must be one of {ARCHIVES}, got {self.archive!r}")
        if self.archive == "recipes":
            self._check_recipes()

    def _check_recipes(self) -> None:
        """What a recipe archive cannot hold, refused by name (docs/recipes.md)."""
        refused = {"mutation=True": self.mutation, "task_vectors=True": self.task_vectors,
                   f"population_size={self.population_size}": self.population_size != 1}
        for name, bad in refused.items():
            if bad:
                raise ValueError(f"M2N2(archive='recipes') does not support {name}: mutation noise and task-vector "
                                 "magnitudes leave the seeds' span, and a recipe archive tells one child per step")
        if self.split_point and self.crossover and (
                not isinstance(self.max_children, int) or self.max_children < 1):
            raise ValueError("M2N2(archive='recipes') with a split point needs max_children, an int >= 1: the "
                             f"children a run may ask for (each stores one cut point per group), got "
                             f"{self.max_children!r}")

    @property
    def cut_capacity(self) -> int:
        """C, the cut points a recipe archive stores per group (0 without split points)."""
        return self.max_children if self.split_point and self.crossover else 0

    def check_budget(self, num_children: int) -> None:
        if self.archive == "recipes" and self.cut_capacity and num_children > self.cut_capacity:
            raise ValueError(f"M2N2.max_children = {self.max_children} is below the {num_children} children this "
                             "budget asks for: a recipe archive stores one cut point per child and group; raise it")

    @classmethod
    def example(cls, model, num_points: int):
        del model, num_points
        algorithm = cls(archive_size=10)
        return algorithm, algorithm.default_params().replace(mutation_std=jnp.float32(0.05))

    def check_params(self, params: Params) -> None:
        """alpha, eps, the stds, warm-up and slerp_eps must be >= 0, the capacity finite
        and >= 0, slerp_dot_threshold in (0, 1]."""
        for name in ("alpha", "mutation_std", "slerp_eps", "eps", "warmup", "magnitude_std", "capacity"):
            value = getattr(params, name)
            if value is not None and not np.all(np.asarray(value) >= 0):
                raise ValueError(f"M2N2Params.{name} must be finite and >= 0, got {np.asarray(value)}")
        if params.capacity is not None and not np.all(np.isfinite(np.asarray(params.capacity))):
            raise ValueError("M2N2Params.capacity must be finite")
        threshold = np.asarray(params.slerp_dot_threshold)
        if not np.all((threshold > 0) & (threshold <= 1)):
            raise ValueError(f"M2N2Params.slerp_dot_threshold must lie in (0, 1], got {threshold}")

    def default_params(self) -> Params:
        return Params(alpha=jnp.float32(1.0), mutation_std=jnp.float32(0.01), slerp_eps=jnp.float32(1e-6),
                      eps=jnp.float32(0.0), warmup=jnp.int32(0), slerp_dot_threshold=jnp.float32(1.0),
                      magnitude_std=jnp.float32(0.0))

    def fitness(self, scores, competing, params: Params):
        """(F (N, M), f (N,)) of the `competing` rows of `scores` under this variant's rules."""
        return resource_fitness(scores, params.alpha, params.capacity, eps=params.eps, competing=competing,
                                capacity_rule=self.capacity_rule, subtract_worst=self.subtract_worst)

    def init(self, key, seed_models, seed_scores, params: Params) -> Archive:
        """An archive of `archive_size` slots with the seeds inserted in order by the tell rule."""
        num_seeds, m = seed_scores.shape
        if num_seeds == 1 and not self.mutation:
            warnings.warn("M2N2 from one seed model without mutation: every child merges that model with "
                          "itself, a copy of it; give two or more seeds or turn mutation on", stacklevel=2)
        if params.capacity is not None and jnp.shape(params.capacity) != (m,):
            raise ValueError(f"Params.capacity must have shape ({m},), one per datapoint, "
                             f"got {jnp.shape(params.capacity)}")
        template = jax.tree.map(lambda x: x[0], seed_models)
        if self.archive == "recipes":
            groups = leaf_groups(template, self.groups)
            state = archive_lib.empty_recipes(seed_models, self.archive_size, m, groups, self.cut_capacity)
            seeds = jax.vmap(lambda i: recipes.seed_recipe(i, num_seeds, max(groups) + 1, self.cut_capacity))(
                jnp.arange(num_seeds))
            return self._insert_each(state, seeds, seed_scores, params)
        if self.task_vectors:
            if params.base is None:
                raise ValueError("M2N2(task_vectors=True) needs Params.base, the common base model")
            if jax.tree.structure(params.base) != jax.tree.structure(template) or any(
                    jnp.shape(o) != x.shape for o, x in zip(jax.tree.leaves(params.base), jax.tree.leaves(template))):
                raise ValueError("Params.base must be a model of the seeds' structure and leaf shapes")
        state = archive_lib.empty(template, self.archive_size, m)
        return self.tell(key, state, seed_models, seed_scores, params)

    def ask(self, key, state: Archive, params: Params):
        """Sample parents, merge them, mutate: P = `population_size` children,
        stacked (P, ...), each from the same archive with its own key.

        `state.asked` counts children: child i of this ask is in warm-up while
        state.asked + i < `params.warmup`, and then both its parents are drawn
        uniformly among the occupied slots, distinct when two or more are occupied.
        """
        p = self.population_size
        if self.archive == "recipes":
            child, state = self.recipe_child(key, state, params)
            return jax.tree.map(lambda x: x[None], child), state.replace(asked=state.asked + 1)
        if p == 1:
            children = jax.tree.map(lambda x: x[None], self.child(key, state, state.asked, params))
        else:
            children = jax.vmap(lambda k, asked: self.child(k, state, asked, params))(
                jax.random.split(key, p), state.asked + jnp.arange(p, dtype=state.asked.dtype))
        return children, state.replace(asked=state.asked + p)

    def child(self, key, state: Archive, asked, params: Params):
        """One child (unstacked) of the archive `state`; `asked` is its warm-up count."""
        key_parents, key_ratio, key_split, key_noise = jax.random.split(key, 4)
        if self.crossover:
            a, b = self.parents(key_parents, state, asked, params)
            parent_a, parent_b = archive_lib.get(state, a), archive_lib.get(state, b)
            if self.task_vectors:
                parent_a, parent_b = task_vector(parent_a, params.base), task_vector(parent_b, params.base)
            child = self.merge(key_ratio, key_split, parent_a, parent_b, params)
            if self.task_vectors and self.task_vector_norm == "union":
                groups = leaf_groups(child, self.groups)
                child = rescale_groups(child, union_norms(parent_a, parent_b, groups), groups)
        else:
            child = archive_lib.get(state, self.copied_parent(key_parents, state, params))
            if self.task_vectors:
                child = task_vector(child, params.base)
        if self.task_vectors:
            groups = leaf_groups(child, self.groups)
            child = scale_groups(jax.random.fold_in(key_noise, 1), child, params.magnitude_std, groups)
            child = add_task_vector(params.base, child)
        if self.mutation:
            child = gaussian_mutation(key_noise, child, params.mutation_std, self.mutation_rng)
        return child

    def recipe_child(self, key, state: Archive, params: Params):
        """(child, state) of a recipe archive: the parents drawn as `child` draws them
        and built from their recipes, the child's recipe their merge's coefficients on
        every segment (the new split point inserted as each group's cut), kept in
        `state.recipes.child` for `tell`, and the child built from it."""
        key_parents, key_ratio, key_split, _ = jax.random.split(key, 4)
        book = state.recipes
        if not self.crossover:
            recipe = state.models[self.copied_parent(key_parents, state, params)]
            return book.build(recipe), state.replace(recipes=book.replace(child=recipe))
        a, b = self.parents(key_parents, state, state.asked, params)
        sizes = group_sizes(jax.tree.map(lambda x: x[0], book.seeds), book.groups)
        shape = () if self.groups is None else (len(sizes),)
        ratio = jax.random.uniform(key_ratio, shape).reshape(-1)
        # The angle from parents built in float32 and reduced as they are built: neither
        # parent is ever held whole (docs/recipes.md).
        dot, aa, bb = recipes.reductions(book, state.models[a], state.models[b])
        c_a, c_b = once(coefficients_from_reductions, dot[:, None], aa[:, None], bb[:, None],
                        jnp.stack([ratio, 1.0 - ratio], -1), params.slerp_eps, params.slerp_dot_threshold)
        models, cuts, position = state.models, book.cuts, None
        if self.split_point:
            hi, lo = split_words(random_split(key_split, sizes, shape), len(sizes))
            cuts, position, full = recipes.insert_cuts(book.cuts, hi, lo)
            models = recipes.split_segments(models, position)
        else:
            c_a, c_b = c_a[:, 0], c_b[:, 0]
        recipe = recipes.child_recipe(models[a], models[b], c_a, c_b, position)
        if self.split_point:  # past max_children: a NaN child, never a silent approximation
            recipe = jnp.where(full.any(), jnp.nan, recipe)
        book = book.replace(cuts=cuts, child=recipe)
        return book.build(recipe), state.replace(models=models, recipes=book)

    def parents(self, key, state: Archive, asked, params: Params):
        """Slots (a, b) of the child counted `asked`: by fitness and attraction, uniform
        while asked < warm-up (a branch: no cost after warm-up, unless vmapped)."""
        per_point, fitness = self.fitness(state.scores, state.occupied, params)
        a, b = sample_parents(key, per_point, fitness, state.occupied, self.attraction)
        return jax.lax.cond(asked < params.warmup, lambda: uniform_pair(key, state.occupied), lambda: (a, b))

    def copied_parent(self, key, state: Archive, params: Params) -> jax.Array:
        """The slot a child without crossover copies, drawn by fitness."""
        _, fitness = self.fitness(state.scores, state.occupied, params)
        return sample(key, proportional(fitness, state.occupied))

    def merge(self, key_ratio, key_split, parent_a, parent_b, params: Params):
        """The split-point slerp (or plain slerp) of two parents with w ~ U(0, 1) and
        k ~ U{0, .., D - 1}, one of each per parameter group."""
        groups = None if self.groups is None else leaf_groups(parent_a, self.groups)
        sizes = group_sizes(parent_a, groups or (0,) * len(jax.tree.leaves(parent_a)))
        shape = () if groups is None else (len(sizes),)
        ratio = jax.random.uniform(key_ratio, shape)
        if not self.split_point:
            return slerp(parent_a, parent_b, ratio, params.slerp_eps, params.slerp_dot_threshold, groups)
        split = random_split(key_split, sizes, shape)
        return split_point_slerp(parent_a, parent_b, ratio, split, params.slerp_eps, params.slerp_dot_threshold,
                                 groups)

    def tell(self, key, state: Archive, children, scores, params: Params) -> Archive:
        """Each child in turn competes with the N archive models; the lowest fitness leaves
        (in a recipe archive, the recipe of the child last asked for competes)."""
        del key
        if self.archive == "recipes":
            children = state.recipes.child[None]
        return self._insert_each(state, children, scores, params)

    def _insert_each(self, state: Archive, children, scores, params: Params) -> Archive:
        """`insert` of each of the stacked children (models, or recipes) in turn."""
        return archive_lib.insert_each(state, children, scores, lambda s, c, x: self.insert(s, c, x, params)[0])

    def insert(self, state: Archive, child, child_scores, params: Params) -> tuple[Archive, jax.Array]:
        """One child (unstacked) with scores (M,) competes: (archive, index that left,
        N for the child itself). The N occupied models and the child compete under
        this variant's fitness (computed over all of them together); empty slots are
        filled first, else the lowest fitness leaves, first index on ties."""
        competing = jnp.concatenate([state.occupied, jnp.ones((1,), bool)])
        _, fitness = self.fitness(jnp.concatenate([state.scores, child_scores[None]]), competing, params)
        return archive_lib.insert_worst_leaves(state, child, child_scores, fitness)

    def best(self, state: Archive, params: Params):
        """The occupied model with the best plain training score (first on ties)."""
        return archive_lib.best(state)


def uniform_pair(key: jax.Array, occupied: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two slots drawn uniformly among the occupied ones, distinct when >= 2 are."""
    key_a, key_b = jax.random.split(key)
    a = sample(key_a, proportional(jnp.ones(occupied.shape), occupied))
    others = occupied & (jnp.arange(occupied.shape[0]) != a)
    b = sample(key_b, proportional(jnp.ones(occupied.shape), jnp.where(others.any(), others, occupied)))
    return a, b
