"""MAP-Elites baseline (Mouret & Clune, 2015) as used in the M2N2 paper.

A grid of `bins` cells (b0 x b1, or b x b) over a 2-D descriptor in [0, 1]^2 of a
model's per-datapoint scores, descriptor = W @ scores with W (2, M) in `Params`: the
user's two descriptors (for digits: accuracy on odd and on even digits; for the
paper's LLM run: each skill's accuracy on a 4 x 4 grid, `label_descriptor` of the
datapoints' skills); the quality is the plain training score. Both parents are drawn
proportionally to quality among filled cells, merged with the split-point slerp and
mutated; the child takes its cell if the cell is empty or it is strictly better.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from m2n2_jax import archive as archive_lib
from m2n2_jax.archive import Archive
from m2n2_jax.base import Algorithm
from m2n2_jax.merge import num_params, random_split, split_point_slerp
from m2n2_jax.mutation import gaussian_mutation
from m2n2_jax.selection import proportional, sample


@struct.dataclass
class Params:
    """Attributes:
      descriptor: W, float (2, M); a model's descriptor is W @ scores, in [0, 1]^2.
      mutation_std: Gaussian mutation std (used when `MapElites.mutation` is on).
      slerp_eps: linear-interpolation threshold of the merge.
    """

    descriptor: jax.Array | None = None
    mutation_std: jax.Array = 0.01
    slerp_eps: jax.Array = 1e-6


@dataclasses.dataclass(frozen=True)
class MapElites(Algorithm):
    """Attributes:
      bins: cells per descriptor axis, an int (square grid) or (b0, b1); the archive
        has b0 * b1 slots.
      mutation: mutate each child.
    """

    bins: int | tuple[int, int] = 10
    mutation: bool = True

    @classmethod
    def example(cls, model, num_points: int):
        """A 3 x 3 grid over the scores on the first and on the second half of the datapoints."""
        del model
        algorithm = cls(bins=3)
        halves = label_descriptor((jnp.arange(num_points) >= num_points // 2).astype(jnp.int32))
        return algorithm, algorithm.default_params().replace(descriptor=halves, mutation_std=jnp.float32(0.05))

    def check_params(self, params: Params) -> None:
        if params.descriptor is None:
            raise ValueError("MapElites needs params.descriptor, a (2, M) matrix (see label_descriptor)")
        if not np.all(np.isfinite(np.asarray(params.descriptor))):
            raise ValueError("MapElites params.descriptor must be finite")
        for name in ("mutation_std", "slerp_eps"):
            if not np.all(np.asarray(getattr(params, name)) >= 0):
                raise ValueError(f"MapElites params.{name} must be >= 0, got {np.asarray(getattr(params, name))}")

    def __post_init__(self):
        shape = self.grid
        if len(shape) != 2 or not all(isinstance(b, int) and b >= 1 for b in shape):
            raise ValueError(f"bins must be an int >= 1 or a pair of them, got {self.bins!r}")

    @property
    def grid(self) -> tuple[int, ...]:
        """(b0, b1), the cells per descriptor axis."""
        return (self.bins, self.bins) if isinstance(self.bins, int) else tuple(self.bins)

    def default_params(self) -> Params:
        """Without a descriptor: set one with `label_descriptor` (`params.replace(descriptor=...)`)."""
        return Params(mutation_std=jnp.float32(0.01), slerp_eps=jnp.float32(1e-6))

    def init(self, key, seed_models, seed_scores, params: Params) -> Archive:
        if params.descriptor is None:
            raise ValueError("MAP-Elites needs Params.descriptor, a (2, M) matrix (see label_descriptor)")
        if params.descriptor.shape != (2, seed_scores.shape[1]):
            raise ValueError(f"Params.descriptor must have shape (2, {seed_scores.shape[1]}), "
                             f"got {params.descriptor.shape}")
        template = jax.tree.map(lambda x: x[0], seed_models)
        state = archive_lib.empty(template, self.grid[0] * self.grid[1], seed_scores.shape[1])
        return self.tell(key, state, seed_models, seed_scores, params)

    def ask(self, key, state: Archive, params: Params):
        """Two parents ~ quality, split-point slerp, mutation: one child, stacked (1, ...)."""
        key_a, key_b, key_ratio, key_split, key_noise = jax.random.split(key, 5)
        probs = proportional(state.scores.mean(axis=1), state.occupied)
        parent_a = archive_lib.get(state, sample(key_a, probs))
        parent_b = archive_lib.get(state, sample(key_b, probs))
        split = random_split(key_split, (num_params(parent_a),))
        child = split_point_slerp(parent_a, parent_b, jax.random.uniform(key_ratio), split, params.slerp_eps)
        if self.mutation:
            child = gaussian_mutation(key_noise, child, params.mutation_std)
        return jax.tree.map(lambda x: x[None], child), state.replace(asked=state.asked + 1)

    def tell(self, key, state: Archive, children, scores, params: Params) -> Archive:
        """Each child takes its cell if the cell is empty or its quality is strictly higher."""
        del key

        def insert(state, child, child_scores):
            index = cell(params.descriptor @ child_scores, self.grid)
            accept = ~state.occupied[index] | (child_scores.mean() > state.scores[index].mean())
            return archive_lib.replace(state, index, child, child_scores, accept)

        return archive_lib.insert_each(state, children, scores, insert)

    def best(self, state: Archive, params: Params):
        return archive_lib.best(state)


def label_descriptor(labels, num_labels: int = 2) -> jax.Array:
    """W (num_labels, M): row l averages the scores of the datapoints labelled l.

    Args:
      labels: int (M,), the label in [0, num_labels) of each datapoint (for digits:
        `tasks.digits.parity_labels`; for the LLM run: each question's skill).
    """
    one_hot = jax.nn.one_hot(jnp.asarray(labels), num_labels, dtype=jnp.float32).T
    return one_hot / jnp.maximum(one_hot.sum(axis=1, keepdims=True), 1.0)


def cell(descriptor: jax.Array, bins: int | tuple[int, int]) -> jax.Array:
    """Flat (row-major) cell index of a descriptor in [0, 1]^2 on a b0 x b1 grid (1.0
    falls in the last bin)."""
    b = jnp.asarray((bins, bins) if isinstance(bins, int) else bins)
    ij = jnp.clip(jnp.floor(descriptor * b).astype(jnp.int32), 0, b - 1)
    return ij[0] * b[1] + ij[1]
