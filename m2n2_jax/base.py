"""The contract every method satisfies, stated once.

An algorithm is a hashable, frozen value holding its *static* structure (archive size,
switches, population size: whatever changes shapes or control flow). Its dynamic
hyperparameters (alpha, mutation std, capacity, ...) are a `Params` pytree passed as a
traced argument, so equal algorithms reuse compiled code and a sweep over a
hyperparameter is a `vmap` over `Params`. All state is a pytree. Scores are maximised.

    params = algorithm.default_params()
    state = algorithm.init(key, seed_models, seed_scores, params)   # seeds stacked (S, ...)
    children, state = algorithm.ask(key, state, params)              # stacked (P, ...)
    state = algorithm.tell(key, state, children, scores, params)     # scores (P, M)
    model, train_score = algorithm.best(state)

`runner.step` is one ask / evaluate / tell; `runner.run` drives any algorithm.
"""

from __future__ import annotations

import abc
from typing import Any

import jax

PyTree = Any
State = Any
Params = Any


class Algorithm(abc.ABC):
    """Base class of M2N2, its baselines and the evosax adapter.

    Subclasses are frozen dataclasses (hashable, so they are static arguments of
    `jax.jit`) and define `population_size`, the number P of children per `ask`.
    """

    population_size: int = 1

    @abc.abstractmethod
    def default_params(self) -> Params:
        """The dynamic hyperparameters, a pytree of arrays (traced under jit)."""

    @abc.abstractmethod
    def init(self, key: jax.Array, seed_models: PyTree, seed_scores: jax.Array, params: Params) -> State:
        """The state after seeing the S seed models (leading axis S) and their (S, M) scores."""

    @abc.abstractmethod
    def ask(self, key: jax.Array, state: State, params: Params) -> tuple[PyTree, State]:
        """P children to evaluate, stacked along a leading axis, and the state."""

    @abc.abstractmethod
    def tell(self, key: jax.Array, state: State, children: PyTree, scores: jax.Array, params: Params) -> State:
        """The state after the children's per-datapoint scores (P, M) in [0, 1]."""

    @abc.abstractmethod
    def best(self, state: State) -> tuple[PyTree, jax.Array]:
        """The model this method would return now, and its mean training score."""
