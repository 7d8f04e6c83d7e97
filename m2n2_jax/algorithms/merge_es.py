"""An evolution strategy over merge coefficients: the evolutionary merges of the field.

Instead of the model's parameters (`EvosaxES`), the ES searches a few coefficients per
parameter group (`m2n2_jax.merge.leaf_groups`, e.g. one group per layer) and every
candidate is a merge of fixed seed models with those coefficients. The seeds are a base
and K models (M_1 .. M_K); the genome (K, G) holds the weight of model k in group g,
and each group's leaves are merged by the operator `operator` of the registry
`m2n2_jax.merge_ops.OPERATORS`, called with the group's weights (K,):

- "slerp": K = 1, one slerp ratio per group from the base (A, ratio 0) to M_1 (B,
  ratio 1), each group with its own angle (the M2N2 paper's LLM baseline: CMA-ES over
  32 per-layer coefficients, population 25).
- "linear", "task_arithmetic", "ties", "dare": weights of the K models (of their task
  vectors on the base), merged with mergekit's conventions and defaults (as
  mergekit-evolve and the evolutionary model-merge recipes do: TIES normalised, DARE as
  mergekit's `dare_linear` with its l1 rescale), TIES and DARE with the density in
  `Params`.

Coefficients are clipped to [0, `max_weight`] before merging (the ES keeps its unclipped
samples; slerp's ratios need `max_weight` <= 1). DARE's drop masks are drawn once per
run (at init, per group), so a genome's model is a function of the genome: `best`
returns exactly the model that was scored (with the same params). Any evosax
distribution-based strategy works; it minimises, so it is told the negative mean
training score. The best seed counts as the best solution so far (its genome: all 0 for
the base, model k's row all 1 for model k).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.flatten_util import ravel_pytree

from m2n2_jax import merge_ops
from m2n2_jax.base import Algorithm
from m2n2_jax.merge import GroupFn, PathPrefix, leaf_groups


@struct.dataclass
class Params:
    """Attributes:
      es: the evosax strategy's own params (e.g. `std_init`, sigma_0).
      density: the kept fraction of each task vector (TIES and DARE).
      slerp_eps: linear-interpolation threshold of the slerp operator.
      min_std: a floor on the ES's step size sigma. With a few coefficients CMA-ES
        converges in ~100 generations and sigma then shrinks geometrically until it
        underflows to NaN (measured on the digits specialists: 1e-37 after 320
        generations); with the floor a converged ES keeps sampling near its mean.
    """

    es: Any
    density: jax.Array = 0.5
    slerp_eps: jax.Array = 1e-6
    min_std: jax.Array = 1e-6


@struct.dataclass
class State:
    """Attributes:
      es: the evosax state (its mean, covariance, best genome so far, ...).
      seeds: the seed models, stacked (S, ...).
      asked: the genomes of the last ask, (P, K, G).
      mask_key: key data of the run's DARE masks.
    """

    es: Any
    seeds: Any
    asked: jax.Array
    mask_key: jax.Array


@dataclasses.dataclass(frozen=True)
class MergeES(Algorithm):
    """Attributes:
      strategy: an evosax distribution-based class, e.g. `evosax.algorithms.CMA_ES`.
      operator: a name of `merge_ops.OPERATORS` ("slerp", "task_arithmetic", ...).
      leaf_groups: the group index of each leaf, a tuple in `jax.tree.leaves` order
        (see `for_model`).
      num_models: K, the models merged on top of the base (1 for slerp).
      population_size: candidates per generation.
      init_weight: the ES's starting genome (every coefficient); 0.5 is the midpoint.
      max_weight: the upper clip of the coefficients (<= 1 for slerp's ratios).
    """

    strategy: type
    operator: str
    leaf_groups: tuple
    num_models: int = 1
    population_size: int = 25
    init_weight: float = 0.5
    max_weight: float = 1.0

    def __post_init__(self):
        merge_ops.operator(self.operator)  # a ValueError naming the registry
        if not isinstance(self.population_size, int) or self.population_size < 2:
            raise ValueError(f"population_size must be an int >= 2, got {self.population_size!r}")
        if (not isinstance(self.num_models, int) or self.num_models < 1
                or (self.operator == "slerp" and self.num_models != 1)):
            raise ValueError(f"num_models must be an int >= 1 (1 for slerp), got {self.num_models!r}")
        if self.operator == "slerp" and self.max_weight > 1:
            raise ValueError(f"slerp's coefficients are ratios in [0, 1]: max_weight must be <= 1, "
                             f"got {self.max_weight!r}")

    @classmethod
    def example(cls, model, num_points: int):
        """CMA-ES over TIES weights of two models on a base, one per top-level leaf group."""
        from evosax.algorithms import CMA_ES  # evosax: the experiments extra

        del num_points
        algorithm = cls.for_model(CMA_ES, "ties", model, PathPrefix(1), num_models=2, population_size=4)
        params = algorithm.default_params()
        return algorithm, params.replace(es=params.es.replace(std_init=jnp.float32(0.3)))

    def check_params(self, params: Params) -> None:
        density = np.asarray(params.density)
        if not np.all((density >= 0) & (density <= 1)):
            raise ValueError(f"MergeES params.density (the kept fraction) must lie in [0, 1], got {density}")
        for name in ("slerp_eps", "min_std"):
            if not np.all(np.asarray(getattr(params, name)) >= 0):
                raise ValueError(f"MergeES params.{name} must be >= 0, got {np.asarray(getattr(params, name))}")
        if not np.all(np.asarray(params.es.std_init) > 0):
            raise ValueError(f"MergeES params.es.std_init must be > 0, got {np.asarray(params.es.std_init)}")

    @classmethod
    def for_model(cls, strategy: type, operator: str, model, group_fn: GroupFn | None, num_models: int = 1,
                  population_size: int = 25, **kwargs) -> MergeES:
        """The ES for models shaped like `model`, one coefficient per group of `group_fn`
        (a function of the leaf path; None: one group) and per merged model."""
        return cls(strategy, operator, leaf_groups(model, group_fn), num_models, population_size, **kwargs)

    @property
    def num_groups(self) -> int:
        return max(self.leaf_groups) + 1

    @property
    def num_seeds(self) -> int:
        return self.num_models + 1

    @property
    def genome_shape(self) -> tuple[int, int]:
        return (self.num_models, self.num_groups)

    @functools.cached_property  # one strategy object per value: evosax jits with it as a static argument
    def es(self) -> Any:
        return self.strategy(population_size=self.population_size, solution=jnp.zeros(self.genome_shape, jnp.float32))

    def default_params(self) -> Params:
        return Params(es=self.es.default_params, density=jnp.float32(0.5), slerp_eps=jnp.float32(1e-6),
                      min_std=jnp.float32(1e-6))

    def merge(self, state: State, genome, params: Params):
        """The model of one genome (K, G), merged from the state's seeds group by group."""
        op = merge_ops.OPERATORS[self.operator]
        weights = jnp.clip(genome, 0.0, self.max_weight)
        leaves, treedef = jax.tree.flatten(state.seeds)
        out = [None] * len(leaves)
        for g in range(self.num_groups):
            members = [i for i, gi in enumerate(self.leaf_groups) if gi == g]
            base = [leaves[i][0] for i in members]
            models = [[leaves[i][k] for i in members] for k in range(1, self.num_models + 1)]
            key = jax.random.fold_in(jax.random.wrap_key_data(state.mask_key), g)  # DARE's masks
            merged = op(key, base, models, weights[:, g], density=params.density, eps=params.slerp_eps,
                        convention="mergekit")
            for i, leaf in zip(members, merged):
                out[i] = leaf
        return jax.tree.unflatten(treedef, out)

    def init(self, key, seed_models, seed_scores, params: Params) -> State:
        if seed_scores.shape[0] != self.num_seeds:
            models = f"{self.num_models} model{'s' if self.num_models > 1 else ''}"
            raise ValueError(f"the {self.operator} operator merges the base and {models}: "
                             f"{self.num_seeds} seeds, got {seed_scores.shape[0]}")
        key_es, key_masks = jax.random.split(key)
        state = self.es.init(key_es, jnp.full(self.genome_shape, self.init_weight, jnp.float32), params.es)
        means = seed_scores.mean(axis=1)
        best = jnp.argmax(means)
        # The base is the zero genome; model k alone is its row of ones (slerp: ratio 1).
        genome = (jnp.arange(1, self.num_models + 1)[:, None] == best) * jnp.ones(self.genome_shape, jnp.float32)
        state = state.replace(best_solution=ravel_pytree(genome)[0], best_fitness=-means[best])
        asked = jnp.zeros((self.population_size,) + self.genome_shape, jnp.float32)
        return State(state, seed_models, asked, jax.random.key_data(key_masks))

    def ask(self, key, state: State, params: Params):
        genomes, es_state = self.es.ask(key, state.es, params.es)
        children = jax.vmap(lambda g: self.merge(state, g, params))(genomes)
        return children, state.replace(es=es_state, asked=genomes)

    def tell(self, key, state: State, children, scores, params: Params) -> State:
        es_state, _ = self.es.tell(key, state.asked, -scores.mean(axis=1), state.es, params.es)
        return state.replace(es=es_state.replace(std=jnp.maximum(es_state.std, params.min_std)))

    def best(self, state: State, params: Params):
        """The merge of the best genome found (by training score), and that score."""
        genome = state.es.best_solution.reshape(self.genome_shape)  # ravel_pytree's inverse for one array
        return self.merge(state, genome, params), -state.es.best_fitness
