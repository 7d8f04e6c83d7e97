"""Every method, one module each, and the registry of them (as evosax's `algorithms`).

Adding a method is one module here holding a frozen-dataclass `Algorithm`
(docs/add_a_method.md) and one line in `ALGORITHMS`; the contract tests
(tests/test_contract.py) then run it through every property the runner relies on.
"""

from m2n2_jax.algorithms.evosax_es import EvosaxES
from m2n2_jax.algorithms.m2n2 import M2N2
from m2n2_jax.algorithms.map_elites import MapElites
from m2n2_jax.algorithms.merge_es import MergeES
from m2n2_jax.algorithms.random_search import RandomSearch
from m2n2_jax.algorithms.slerp_grid import SlerpGrid

ALGORITHMS = {  # name -> class
    "m2n2": M2N2,
    "map-elites": MapElites,
    "slerp-grid": SlerpGrid,
    "evosax-es": EvosaxES,
    "merge-es": MergeES,
    "random-search": RandomSearch,
}

__all__ = ["ALGORITHMS", "EvosaxES", "M2N2", "MapElites", "MergeES", "RandomSearch", "SlerpGrid"]
