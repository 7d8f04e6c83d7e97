"""The two pre-trained specialists of SPEC.md: one trained on digits 0-4, one on 5-9.

Each starts from N(0, 0.01^2) parameters and takes `steps` full-batch Adam steps
(learning rate 3e-3, softmax cross-entropy over all 10 classes) on the training images
of its half. Trained once per (init, hidden, steps, lr) and cached with orbax under
experiments/cache/, so every experiment reuses the same two models.

Which N(0, 0.01^2) draw is used matters a lot for this task (README: the brute-force
baseline ranges from 58 % to 72 % over starting points). `init="paper"` draws exactly
the paper's starting vectors: flat normals from the legacy key PRNGKey(42) split in
two, with JAX's earlier non-partitionable threefry, laid out as [W1 (64x256), b1,
W2 (256x10), b2] like the paper's code. `init="key"` draws from `jax.random.key(seed)`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from m2n2_jax.models.mlp import random_params

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")
HALVES = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))


def paper_initial_params(hidden: int = 256):
    """The paper's two N(0, 0.01^2) starting models, as flax MLP params pytrees."""
    sizes = [64 * hidden, hidden, hidden * 10, 10]
    with jax.threefry_partitionable(False):
        keys = jax.random.split(jax.random.PRNGKey(42), 2)
        flats = [0.01 * jax.random.normal(k, (sum(sizes),)) for k in keys]
    models = []
    for flat in flats:
        w1, b1, w2, b2 = jnp.split(flat, np.cumsum(sizes)[:-1])
        models.append({"params": {"Dense_0": {"kernel": w1.reshape(64, hidden), "bias": b1},
                                  "Dense_1": {"kernel": w2.reshape(hidden, 10), "bias": b2}}})
    return models


def train_specialist(params, model, x, y, digits, steps: int = 10, learning_rate: float = 3e-3):
    """`params` after `steps` full-batch Adam steps on the images of `digits`."""
    mask = jnp.isin(y, jnp.asarray(digits))
    x, y = x[mask], y[mask]
    optimizer = optax.adam(learning_rate)

    def loss(params):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


def load_or_train(model, train, hidden: int, steps: int = 10, learning_rate: float = 3e-3,
                  init: str = "paper", seed: int = 0, cache: str = CACHE):
    """[specialist 0-4, specialist 5-9], from the orbax cache or trained and cached."""
    if init not in ("paper", "key"):
        raise ValueError(f"init must be 'paper' or 'key', got {init!r}")
    tag = "paper" if init == "paper" else f"key{seed}"
    path = os.path.join(os.path.abspath(cache), f"specialists_{tag}_h{hidden}_s{steps}_lr{learning_rate:g}")
    template = jax.eval_shape(lambda: [random_params(jax.random.key(0), model, train[0].shape[1])] * 2)
    checkpointer = ocp.StandardCheckpointer()
    if os.path.isdir(path):
        return list(checkpointer.restore(path, template))
    if init == "paper":
        starts = paper_initial_params(hidden)
    else:
        starts = [random_params(k, model, train[0].shape[1]) for k in jax.random.split(jax.random.key(seed), 2)]
    models = [train_specialist(p, model, *train, digits, steps, learning_rate) for p, digits in zip(starts, HALVES)]
    os.makedirs(cache, exist_ok=True)
    checkpointer.save(path, models)  # orbax writes to a temporary directory and renames it
    checkpointer.wait_until_finished()
    return models


def half_accuracy(model, params, data, digits) -> float:
    """Accuracy of `params` on the datapoints whose label is in `digits`."""
    x, y = data
    mask = jnp.isin(y, jnp.asarray(digits))
    return float((jnp.argmax(model.apply(params, x[mask]), -1) == y[mask]).mean())
