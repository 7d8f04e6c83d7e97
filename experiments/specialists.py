"""The two pre-trained specialists of docs/algorithm.md#pretrained: one trained on digits 0-4, one on 5-9.

Each starts from N(0, 0.01^2) parameters and takes `steps` full-batch Adam steps
(learning rate 3e-3, softmax cross-entropy over all 10 classes) on the training images
of its half. Trained once per (data, init, hidden, steps, lr) and cached with orbax
under experiments/cache/, so every experiment reuses the same two models.

Which N(0, 0.01^2) draw is used matters a lot for this task (docs/pretrained.md: the
slerp-grid baseline ranges from 58 % to 72 % over starting points). `init="paper"`
draws exactly the paper's starting vectors: flat normals from the legacy key
PRNGKey(42) split in two, with JAX's earlier non-partitionable threefry, laid out as
[W1 (64x256), b1, W2 (256x10), b2] like the paper's code (and like our MLP's ravel
order). `init="key"` draws from `jax.random.key(seed)`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from experiments import harness
from m2n2_jax.tasks import digits

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")
HALVES = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))


def initial_flats(init: str, seed: int, d: int) -> jax.Array:
    """(2, D) starting vectors: the paper's (init="paper") or a draw from key `seed`."""
    if init == "paper":
        with jax.threefry_partitionable(False):
            keys = jax.random.split(jax.random.PRNGKey(42), 2)
            return jnp.stack([0.01 * jax.random.normal(k, (d,)) for k in keys])
    return jnp.stack([0.01 * jax.random.normal(k, (d,)) for k in jax.random.split(jax.random.key(seed), 2)])


def train_specialist(params, x, y, labels, steps: int = 10, learning_rate: float = 3e-3):
    """`params` after `steps` full-batch Adam steps on the images whose label is in `labels`."""
    mask = jnp.isin(y, jnp.asarray(labels))
    x, y = x[mask], y[mask]
    loss = lambda p, _: optax.softmax_cross_entropy_with_integer_labels(digits.mlp_apply(p, x), y).mean()
    return harness.train(loss, params, optax.adam(learning_rate), jax.random.split(jax.random.key(0), steps))[0]


def load_or_train(train, hidden: int, steps: int = 10, learning_rate: float = 3e-3, init: str = "paper",
                  seed: int = 0, cache: str = CACHE, data: str = ""):
    """[specialist 0-4, specialist 5-9] MLPs, from the orbax cache or trained and cached.

    data: names the training data in the cache ("" for all of digits' training images,
    e.g. "mnist_n1000" for MNIST's first 1,000); the MLP's input width is train's.
    """
    if init not in ("paper", "key"):
        raise ValueError(f"init must be 'paper' or 'key', got {init!r}")
    sizes = digits.widths(hidden, train[0].shape[1])
    if init == "paper" and sizes[0] != digits.INPUTS:
        raise ValueError(f"init='paper' draws the paper's 64-input models; these data have {sizes[0]} inputs")
    d = digits.num_params(sizes)
    tag = ("paper" if init == "paper" else f"key{seed}") + f"_h{hidden}_s{steps}_lr{learning_rate:g}_flat"
    path = os.path.join(cache, f"specialists_{data}_{tag}" if data else f"specialists_{tag}")

    def make():
        starts = initial_flats(init, seed, d)
        models = [train_specialist(digits.mlp_from_flat(f, sizes), *train, labels, steps, learning_rate)
                  for f, labels in zip(starts, HALVES)]
        return {"flat": jnp.stack([ravel_pytree(m)[0] for m in models])}

    flats = harness.cached(path, {"flat": jax.ShapeDtypeStruct((2, d), jnp.float32)}, make)["flat"]
    return [digits.mlp_from_flat(f, sizes) for f in flats]


def label_accuracy(params, data, labels) -> float:
    """Accuracy of `params` on the datapoints whose label is in `labels`."""
    x, y = data
    mask = jnp.isin(y, jnp.asarray(labels))
    return float((jnp.argmax(digits.mlp_apply(params, x[mask]), -1) == y[mask]).mean())
