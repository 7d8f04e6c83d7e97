"""(1 + lambda) random search: the simplest baseline, and the worked example of
docs/add_a_method.md.

Keep one model, the best so far by mean training score; each `ask` draws lambda
children, the model plus N(0, std^2) noise; `tell` keeps the best child if it is
strictly better. No merging: it measures what mutation alone finds within a budget.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from m2n2_jax.base import Algorithm
from m2n2_jax.mutation import gaussian_mutation


@struct.dataclass
class Params:
    """Attributes:
      std: std of the Gaussian noise of each child.
    """

    std: jax.Array = 0.01


@struct.dataclass
class State:
    """Attributes:
      model: the best model so far.
      score: its mean training score, float32 scalar.
    """

    model: object
    score: jax.Array


@dataclasses.dataclass(frozen=True)
class RandomSearch(Algorithm):
    """Attributes:
      population_size: lambda, the children per `ask`.
    """

    population_size: int = 4

    def __post_init__(self):
        if not isinstance(self.population_size, int) or self.population_size < 1:
            raise ValueError(f"population_size must be an int >= 1, got {self.population_size!r}")

    @classmethod
    def example(cls, model, num_points: int):
        del model, num_points
        return cls(population_size=3), Params(std=jnp.float32(0.1))

    def default_params(self) -> Params:
        return Params(std=jnp.float32(0.01))

    def check_params(self, params: Params) -> None:
        if not np.all(np.asarray(params.std) >= 0):
            raise ValueError(f"RandomSearch params.std must be >= 0, got {np.asarray(params.std)}")

    def init(self, key, seed_models, seed_scores, params: Params) -> State:
        """Start from the best seed."""
        best = jnp.argmax(seed_scores.mean(axis=1))
        return State(jax.tree.map(lambda x: x[best], seed_models), seed_scores[best].mean())

    def ask(self, key, state: State, params: Params):
        keys = jax.random.split(key, self.population_size)
        return jax.vmap(lambda k: gaussian_mutation(k, state.model, params.std))(keys), state

    def tell(self, key, state: State, children, scores, params: Params) -> State:
        means = scores.mean(axis=1)
        i = jnp.argmax(means)
        better = means[i] > state.score
        model = jax.tree.map(lambda c, m: jnp.where(better, c[i], m), children, state.model)
        return State(model, jnp.where(better, means[i], state.score))

    def best(self, state: State, params: Params):
        return state.model, state.score
