"""Shared fixtures: small random problems and NumPy references used across tests.

Tests run with two CPU devices (set before jax runs anything) so that the
multi-device path of the runner is exercised on any machine.
"""

import os

import jax
import numpy as np
import pytest

jax.config.update("jax_num_cpu_devices", 2)
# A compilation cache shared by the pytest workers (and later runs): a program that
# several test files compile (the tiny problem's runs) is compiled once. It is keyed by
# the program and the library versions, so it never changes a result.
CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache_tests")
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

# Each compiled XLA:CPU program holds ~13 memory mappings until it is dropped, and a
# process may hold vm.max_map_count (65,530 by default) of them: a pytest worker that
# compiled a few thousand programs crashed in a compile or a cache write (a worker
# held 39,645 mappings near the end of the suite; docs/test_suite.md). After a test file
# that leaves more than MAPPINGS, the worker drops its compiled programs.
MAPPINGS = 30_000


def _mappings() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def _drop_programs_past_the_mapping_limit():
    yield
    if _mappings() > MAPPINGS:
        jax.clear_caches()


# The longest files first (measured, docs/test_suite.md): `make test` hands whole files
# to two workers in collection order (--no-loadscope-reorder), so the long ones start at
# once and the short ones fill in after, instead of a long file starting last.
SLOW_FIRST = ("test_llm_real.py", "test_merge_command.py", "test_lm_skills.py", "test_diffusion_experiment.py",
              "test_llama.py", "test_contract.py", "test_pretrained.py", "test_m2n2.py", "test_transformer.py",
              "test_diffusion.py", "test_experiments.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(params=["jit", "no_jit"])
def transform(request):
    """Run a test once under jax.jit and once eagerly (like chex.variants)."""
    return jax.jit if request.param == "jit" else (lambda f: f)


def np_fitness(scores, alpha=1.0, capacity=None):
    """NumPy reference of docs/algorithm.md#fitness."""
    scores = np.asarray(scores, np.float64)
    total = scores.sum(0)
    z = np.where(total > 0, np.power(np.where(total > 0, total, 1.0), alpha), 1.0)
    c = np.ones(scores.shape[1]) if capacity is None else np.asarray(capacity, np.float64)
    per_point = c * scores / z
    return per_point, per_point.sum(1)


def np_general_fitness(scores, competing, alpha=1.0, eps=0.0, capacity="ones", subtract_worst=False):
    """NumPy reference of the paper's equations 3-5 over the competing rows only:
    loops over rows, no masking tricks; rows that do not compete get F = 0."""
    scores = np.asarray(scores, np.float64)
    rows = [i for i in range(scores.shape[0]) if competing[i]]
    s = scores[rows]
    if subtract_worst:
        s = s - s.min(axis=0)
    total = s.sum(0)
    z = np.where(total > 0, total, 1.0) ** alpha + eps
    c = {"ones": np.ones(s.shape[1]), "max": s.max(axis=0)}[capacity] if isinstance(capacity, str) else capacity
    per_point = np.zeros_like(scores)
    per_point[rows] = c * s / z
    return per_point, per_point.sum(1)
