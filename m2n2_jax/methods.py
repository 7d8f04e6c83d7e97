"""The methods of the paper's digits experiments, selectable by name.

Every method is an `Algorithm` for the same runner: M2N2's ablations are `Config`
switches, MAP-Elites is the baseline in `baselines.map_elites`.
"""

from __future__ import annotations

from typing import Callable

from m2n2_jax import algorithm as m2n2
from m2n2_jax.algorithm import Algorithm
from m2n2_jax.baselines import map_elites
from m2n2_jax.config import Config

M2N2_VARIANTS = {
    "m2n2": {},
    "m2n2-no-crossover": {"crossover": False},
    "m2n2-no-splitpoint": {"split_point": False},
    "m2n2-no-attraction": {"attraction": False},
    "ga": {"alpha": 0.0, "attraction": False},
    "ga-no-crossover": {"alpha": 0.0, "attraction": False, "crossover": False},
}
METHODS = tuple(M2N2_VARIANTS) + ("map-elites",)


def make_method(
    name: str,
    *,
    mutation_std: float = 0.01,
    archive_size: int = 20,
    descriptor_fn: Callable | None = None,
) -> Algorithm:
    """The `Algorithm` called `name` (one of METHODS).

    Args:
      mutation_std: 0.01 from scratch, 0 for pre-trained merging.
      archive_size: N for the M2N2 family (MAP-Elites has its 10 x 10 grid).
      descriptor_fn: scores (M,) -> (2,) in [0, 1]; required by "map-elites".
    """
    if name in M2N2_VARIANTS:
        config = Config(archive_size=archive_size, mutation_std=mutation_std, **M2N2_VARIANTS[name])
        return m2n2.m2n2(config)
    if name == "map-elites":
        if descriptor_fn is None:
            raise ValueError("map-elites needs a descriptor_fn (scores -> 2 values in [0, 1])")
        return map_elites.map_elites(map_elites.MapElitesConfig(descriptor_fn, mutation_std=mutation_std))
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
