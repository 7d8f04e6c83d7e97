"""The contract every method satisfies, stated once.

An algorithm is a hashable, frozen value holding its *static* structure (archive size,
switches, population size: whatever changes shapes or control flow). Its dynamic
hyperparameters (alpha, mutation std, capacity, ...) are a `params` pytree passed as a
traced argument, as in evosax, so equal algorithms reuse compiled code and a sweep over
a hyperparameter is a `vmap` over params (`run` takes per-run params with a leading
axis R). Words: "params" always means an algorithm's hyperparameters; the weights
being merged are "models". All state is a pytree. Scores are maximised.

    params = algorithm.default_params()
    state = algorithm.init(key, seed_models, seed_scores, params)   # seeds stacked (S, ...)
    children, state = algorithm.ask(key, state, params)              # stacked (P, ...)
    state = algorithm.tell(key, state, children, scores, params)     # scores (P, M)
    model, train_score = algorithm.best(state, params)

What the runner relies on (`checks.check_contract` verifies it with `eval_shape` and
names the offending leaf):
- every state leaf is a JAX array whose shape and dtype `tell` keeps (the state is a
  `lax.scan` carry); no Python numbers, no None that `tell` fills in;
- `init`, `ask`, `tell` and `best` run traced (under `jit`, `vmap` and `shard_map`):
  they may check shapes, never values;
- `best` returns the model this method would return now and its mean training score,
  which is what `run` logs as `train_score`;
- `num_seeds` says how many seed models `init` takes (None: any number >= 1) and
  `population_size` how many children each `ask` returns.

`runner.step` is one ask / evaluate / tell; `runner.run` drives any algorithm. Adding a
method is one module in `m2n2_jax/algorithms/` and one line in its registry
(docs/add_a_method.md).
"""

from __future__ import annotations

import abc
from typing import Any

import jax

PyTree = Any
State = Any
Params = Any


class Algorithm(abc.ABC):
    """Base class of every method (M2N2, its baselines, the evosax adapter, yours).

    Subclasses are frozen dataclasses (hashable, so they are static arguments of
    `jax.jit`) and set `population_size`, the number P of children per `ask`, and
    `num_seeds`, the number of seed models `init` takes (None: any number >= 1).
    """

    population_size: int = 1
    num_seeds: int | None = None

    @abc.abstractmethod
    def default_params(self) -> Params:
        """The dynamic hyperparameters, a pytree of arrays (traced under jit), or None."""

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
    def best(self, state: State, params: Params) -> tuple[PyTree, jax.Array]:
        """The model this method would return now, and its mean training score."""

    def check_params(self, params: Params) -> None:
        """Raise ValueError, naming the field, for concrete hyperparameters that make no
        sense (e.g. alpha < 0). Called by `run` on the host before any work; values are
        NumPy arrays there (per-run params carry a leading axis R). Default: no checks."""
        del params

    def check_budget(self, num_children: int) -> None:
        """Raise ValueError, naming the setting, where this algorithm cannot ask for
        `num_children` children in all (a run's budget after the seeds). Called by `run`
        on the host before any work. Default: any number."""
        del num_children

    @classmethod
    def example(cls, model: PyTree, num_points: int) -> tuple[Algorithm, Params]:
        """A small working (algorithm, params) for models like `model` scored on
        `num_points` datapoints: what the contract tests run for every registered
        algorithm, and a starting point for users."""
        raise NotImplementedError(f"{cls.__name__} defines no example()")
