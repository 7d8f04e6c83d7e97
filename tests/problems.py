"""A tiny classification problem shared by the tests (module constants, so compiled
programs are reused across tests: equal algorithms and the same score_fn hit jit's cache)."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import methods
from m2n2_jax.algorithms.map_elites import label_descriptor
from m2n2_jax.tasks import digits

rng = np.random.default_rng(0)
X = rng.normal(size=(120, 8)).astype(np.float32)
Y = (X[:, :4].argmax(1)).astype(np.int32)
TRAIN, TEST = (X[:90], Y[:90]), (X[90:], Y[90:])
SIZES = (8, 16, 4)
D = sum(a * b + b for a, b in zip(SIZES[:-1], SIZES[1:]))


def init_model(key, std=0.3):
    """A random MLP 8 -> 16 -> 4 (tuple of digits.Dense layers)."""
    return digits.mlp_from_flat(std * jax.random.normal(key, (D,)), SIZES)


def score_fn(params, batch):
    x, y = batch
    return (jnp.argmax(digits.mlp_apply(params, x), -1) == y).astype(jnp.float32)


def seed_fn(key, n=2):
    """n random seed models per run, stacked (n, ...)."""
    return jax.vmap(init_model)(jax.random.split(key, n))


KEYS = jax.vmap(jax.random.key)(jnp.arange(3))
_TEMPLATE = init_model(jax.random.key(0))
SETTINGS = methods.Settings(
    m2n2=methods.M2N2Settings(mutation_std=0.05),
    task_vectors=methods.TaskVectorSettings(groups=digits.layer_of),  # no base: tests that need one add it
    map_elites=methods.MapElitesSettings(descriptor=label_descriptor(TRAIN[1] % 2), mutation_std=0.05),
    slerp_grid=methods.SlerpGridSettings(num_ratios=60),
    es=methods.ESSettings(template=_TEMPLATE, population=4, std_init=0.3),
    merge_es=methods.MergeESSettings(template=_TEMPLATE, groups=digits.layer_of, population=4, std_init=0.3))
