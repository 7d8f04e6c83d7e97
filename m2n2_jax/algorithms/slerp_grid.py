"""Brute-force baseline: the best single slerp ratio between two seed models.

The ratios are linspace(0, 1, num_ratios): the two ends are the seeds themselves
(scored at init), and each step scores the next interior ratio (one forward pass). The
best ratio by mean training score is kept, the smallest ratio on ties, so a budget of
`num_ratios` passes searches exactly the grid.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from m2n2_jax.base import Algorithm
from m2n2_jax.merge import slerp


@struct.dataclass
class State:
    """Attributes:
      seeds: the two models, stacked (2, ...).
      step: how many interior ratios were asked.
      best_ratio, best_score: the best ratio so far and its mean training score.
    """

    seeds: object
    step: jax.Array
    best_ratio: jax.Array
    best_score: jax.Array


@dataclasses.dataclass(frozen=True)
class SlerpGrid(Algorithm):
    """No dynamic hyperparameters (`default_params()` is None).

    Attributes:
      num_ratios: grid size (>= 2), seeds included.
      slerp_eps: linear-interpolation threshold of the slerp.
    """

    num_ratios: int = 10_000
    slerp_eps: float = 1e-6
    num_seeds = 2

    @classmethod
    def example(cls, model, num_points: int):
        del model, num_points
        return cls(num_ratios=60), None

    def __post_init__(self):
        if not isinstance(self.num_ratios, int) or self.num_ratios < 2:
            raise ValueError(f"num_ratios must be an int >= 2, got {self.num_ratios!r}")

    def default_params(self) -> None:
        return None

    def ratio(self, i: jax.Array) -> jax.Array:
        """Ratio i of linspace(0, 1, num_ratios), clipped to the grid."""
        return jnp.linspace(0.0, 1.0, self.num_ratios)[jnp.clip(i, 0, self.num_ratios - 1)]

    def init(self, key, seed_models, seed_scores, params) -> State:
        if seed_scores.shape[0] != 2:
            raise ValueError(f"the slerp grid searches between exactly 2 seed models, got {seed_scores.shape[0]}")
        means = seed_scores.mean(axis=1)
        b_wins = means[1] > means[0]
        return State(seed_models, jnp.int32(0), jnp.where(b_wins, 1.0, 0.0), jnp.max(means))

    def ask(self, key, state: State, params):
        w = self.ratio(state.step + 1)
        a, b = (jax.tree.map(lambda x: x[i], state.seeds) for i in (0, 1))
        child = slerp(a, b, w, self.slerp_eps)
        return jax.tree.map(lambda x: x[None], child), state

    def tell(self, key, state: State, children, scores, params) -> State:
        w, score = self.ratio(state.step + 1), scores[0].mean()
        better = (score > state.best_score) | ((score == state.best_score) & (w < state.best_ratio))
        return State(state.seeds, state.step + 1, jnp.where(better, w, state.best_ratio),
                     jnp.where(better, score, state.best_score))

    def best(self, state: State, params):
        a, b = (jax.tree.map(lambda x: x[i], state.seeds) for i in (0, 1))
        model = slerp(a, b, state.best_ratio, self.slerp_eps)
        # The ends are the seeds themselves, bit for bit.
        model = jax.tree.map(lambda m, x, y: jnp.where(state.best_ratio == 0, x,
                                                       jnp.where(state.best_ratio == 1, y, m)),
                             model, a, b)
        return model, state.best_score
