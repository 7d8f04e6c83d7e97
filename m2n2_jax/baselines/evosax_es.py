"""Any evosax strategy (CMA-ES, Sep-CMA-ES, ...) as a value of the one contract.

The ES searches the model's parameters directly, maximising the mean training score
(evosax minimises, so it is told the negative). One `ask` is one generation of
`population_size` models, so the budget is counted exactly as for M2N2. The search
starts at the mean of the seed models, and the best seed counts as the best solution so
far; `best` returns the best solution found (by training score), as evosax tracks it.
Params are evosax's own (e.g. `std_init`, the initial step size sigma_0).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from m2n2_jax.base import Algorithm


@dataclasses.dataclass(frozen=True)
class EvosaxES(Algorithm):
    """Attributes:
      strategy: an evosax distribution-based class, e.g. `evosax.algorithms.CMA_ES`.
      solution: (treedef, leaf ShapeDtypeStructs) of the model; see `for_model`.
      population_size: models per generation.
    """

    strategy: type
    solution: tuple
    population_size: int = 20

    def __post_init__(self):
        if not isinstance(self.population_size, int) or self.population_size < 2:
            raise ValueError(f"population_size must be an int >= 2, got {self.population_size!r}")

    @classmethod
    def for_model(cls, strategy: type, model, population_size: int = 20) -> "EvosaxES":
        """The ES over the parameters of pytrees shaped like `model` (arrays or ShapeDtypeStructs)."""
        leaves, treedef = jax.tree.flatten(model)
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves)
        return cls(strategy, (treedef, shapes), population_size)

    @functools.cached_property  # one strategy object per value: evosax jits with it as a static argument
    def es(self) -> Any:
        treedef, shapes = self.solution
        template = jax.tree.unflatten(treedef, [jnp.zeros(s.shape, s.dtype) for s in shapes])
        return self.strategy(population_size=self.population_size, solution=template)

    def default_params(self):
        return self.es.default_params

    def init(self, key, seed_models, seed_scores, params):
        es = self.es
        mean = jax.tree.map(lambda x: x.mean(axis=0), seed_models)
        state = es.init(key, mean, params)
        best = jnp.argmax(seed_scores.mean(axis=1))
        flat = jax.vmap(es._ravel_solution)(seed_models)[best]
        return state.replace(best_solution=flat, best_fitness=-seed_scores[best].mean())

    def ask(self, key, state, params):
        return self.es.ask(key, state, params)

    def tell(self, key, state, children, scores, params):
        state, _ = self.es.tell(key, children, -scores.mean(axis=1), state, params)
        return state

    def best(self, state):
        return self.es._unravel_solution(state.best_solution), -state.best_fitness
