"""Any evosax strategy (CMA-ES, Sep-CMA-ES, ...) as a value of the one contract.

The ES searches the model's parameters directly, maximising the mean training score
(evosax minimises, so it is told the negative). One `ask` is one generation of
`population_size` models, so the budget is counted exactly as for M2N2: S seeds, then
P passes per generation (`run` warns when the budget is not S + k P).

Where it starts: the search distribution's mean is the average of the S seed models
(one seed: that model), and the best seed counts as the best solution so far, so `best`
never returns worse than the best seed. Its step size is params.std_init, sigma_0, in
the units of the model's parameters: `default_params` sets it to 0.01 (the paper's
CMA-ES from scratch, and a step that moves pre-trained seeds), not evosax's 1.0, which
assumes unit-scale solutions (a user's Sep-CMA-ES from two pre-trained digits
specialists stayed at 0.499 test score with 1.0 and reached 0.87-0.89 with 0.01, issue
23). The other params are evosax's own.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from m2n2_jax.base import Algorithm

STD_INIT = 0.01


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
    def for_model(cls, strategy: type, model, population_size: int = 20) -> EvosaxES:
        """The ES over the parameters of pytrees shaped like `model` (arrays or ShapeDtypeStructs)."""
        leaves, treedef = jax.tree.flatten(model)
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves)
        return cls(strategy, (treedef, shapes), population_size)

    @classmethod
    def example(cls, model, num_points: int):
        from evosax.algorithms import Sep_CMA_ES  # evosax: the experiments extra

        del num_points
        algorithm = cls.for_model(Sep_CMA_ES, model, population_size=4)
        return algorithm, algorithm.default_params().replace(std_init=jnp.float32(0.3))

    @property
    def template(self):
        """A model of zeros shaped like the solution."""
        treedef, shapes = self.solution
        return jax.tree.unflatten(treedef, [jnp.zeros(s.shape, s.dtype) for s in shapes])

    @functools.cached_property  # one strategy object per value: evosax jits with it as a static argument
    def es(self) -> Any:
        return self.strategy(population_size=self.population_size, solution=self.template)

    @functools.cached_property
    def unravel(self):
        """A flat solution (D,) -> the model: the inverse of `ravel_pytree`, which is how
        evosax flattens (its state's mean and best solution are flat)."""
        return ravel_pytree(self.template)[1]

    def default_params(self):
        """evosax's params of the strategy with std_init = `STD_INIT` (module docstring)."""
        return self.es.default_params.replace(std_init=jnp.float32(STD_INIT))

    def check_params(self, params) -> None:
        if not np.all(np.asarray(params.std_init) > 0):
            raise ValueError(f"EvosaxES params.std_init (sigma_0) must be > 0, got {np.asarray(params.std_init)}")

    def init(self, key, seed_models, seed_scores, params):
        """The search starts at the seeds' average; the best seed is the best so far."""
        es = self.es
        mean = jax.tree.map(lambda x: x.mean(axis=0), seed_models)
        state = es.init(key, mean, params)
        best = jnp.argmax(seed_scores.mean(axis=1))
        flat = jax.vmap(lambda model: ravel_pytree(model)[0])(seed_models)[best]  # evosax's flat solution
        return state.replace(best_solution=flat, best_fitness=-seed_scores[best].mean())

    def ask(self, key, state, params):
        return self.es.ask(key, state, params)

    def tell(self, key, state, children, scores, params):
        state, _ = self.es.tell(key, children, -scores.mean(axis=1), state, params)
        return state

    def best(self, state, params):
        """The best solution found (by mean training score), as evosax tracks it."""
        return self.unravel(state.best_solution), -state.best_fitness
