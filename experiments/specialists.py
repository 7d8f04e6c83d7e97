"""The two pre-trained specialists of SPEC.md: one trained on digits 0-4, one on 5-9.

Each starts from N(0, 0.01^2) parameters and takes `steps` full-batch Adam steps
(learning rate 3e-3, softmax cross-entropy over all 10 classes) on the training images
of its half. Trained once per (hidden, steps, lr, key) and cached with orbax under
experiments/cache/, so every experiment reuses the same two models.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from m2n2_jax.models.mlp import random_params

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")
HALVES = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))


def train_specialist(key, model, x, y, digits, steps: int = 10, learning_rate: float = 3e-3):
    """Params of `model` after `steps` full-batch Adam steps on the images of `digits`."""
    mask = jnp.isin(y, jnp.asarray(digits))
    x, y = x[mask], y[mask]
    params = random_params(key, model, x.shape[1])
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


def load_or_train(model, train, hidden: int, steps: int = 10, learning_rate: float = 3e-3, seed: int = 0):
    """[specialist 0-4, specialist 5-9], from the orbax cache or trained and cached."""
    path = os.path.join(CACHE, f"specialists_h{hidden}_s{steps}_lr{learning_rate:g}_k{seed}")
    template = jax.eval_shape(lambda: [random_params(jax.random.key(0), model, train[0].shape[1])] * 2)
    checkpointer = ocp.StandardCheckpointer()
    if os.path.isdir(path):
        return list(checkpointer.restore(path, template))
    keys = jax.random.split(jax.random.key(seed), 2)
    models = [train_specialist(k, model, *train, digits, steps, learning_rate) for k, digits in zip(keys, HALVES)]
    os.makedirs(CACHE, exist_ok=True)
    checkpointer.save(path, models)  # orbax writes to a temporary directory and renames it
    checkpointer.wait_until_finished()
    return models


def half_accuracy(model, params, data, digits) -> float:
    """Accuracy of `params` on the datapoints whose label is in `digits`."""
    x, y = data
    mask = jnp.isin(y, jnp.asarray(digits))
    return float((jnp.argmax(model.apply(params, x[mask]), -1) == y[mask]).mean())
