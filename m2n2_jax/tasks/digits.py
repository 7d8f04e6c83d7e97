"""The paper's digits task: scikit-learn's 8x8 digits and an MLP 64 -> 256 (ReLU) -> 10.

Data: the raw pixel values 0..16 (not rescaled), the first 80 % for training (1,437
images) and the rest for test (360), as docs/algorithm.md#digits states; they ship with scikit-learn,
so nothing is downloaded.

Model: a tuple of `Dense(kernel, bias)` layers, so `ravel_pytree` lays the parameters
out as W1, b1, W2, b2 like the paper's flat vector, and a split point cuts the same
coordinates as in the paper's code (D = 19,210 for the paper's widths). `inputs`
widens the first layer for other images (784 for MNIST, tasks.mnist: D = 203,530).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

INPUTS, CLASSES = 64, 10


class Dense(NamedTuple):
    kernel: jax.Array  # (inputs, outputs)
    bias: jax.Array  # (outputs,)


def layer_of(path: str) -> str:
    """The layer of a leaf path ("0/kernel" -> "0"): parameter groups of one layer each."""
    return path.split("/")[0]


def load_digits(train_fraction: float = 0.8):
    """((x_train, y_train), (x_test, y_test)) as float32 (M, 64) and int32 (M,) arrays."""
    from sklearn.datasets import load_digits as _load

    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    x, y = _load(return_X_y=True)
    n_train = int(len(x) * train_fraction)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def parity_labels(labels) -> np.ndarray:
    """A label per datapoint: 0 for odd digits, 1 for even (MAP-Elites' `label_descriptor`)."""
    return (np.asarray(labels) % 2 == 0).astype(np.int32)


def widths(hidden: int = 256, inputs: int = INPUTS) -> tuple[int, ...]:
    """Layer widths (inputs, hidden, 10): 64 inputs for digits, 784 for MNIST (tasks.mnist)."""
    return (inputs, hidden, CLASSES)


def num_params(sizes: Sequence[int]) -> int:
    """D of the MLP with layer widths `sizes` (kernels and biases)."""
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def mlp_from_flat(flat: jax.Array, sizes: Sequence[int]) -> tuple[Dense, ...]:
    """The MLP whose flat vector, in ravel order W1, b1, W2, b2, ..., is `flat` (D,)."""
    layers, offset = [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        kernel = flat[offset : offset + n_in * n_out].reshape(n_in, n_out)
        bias = flat[offset + n_in * n_out : offset + n_in * n_out + n_out]
        layers.append(Dense(kernel, bias))
        offset += n_in * n_out + n_out
    return tuple(layers)


def init_mlp(key: jax.Array, hidden: int = 256, std: float = 0.01, inputs: int = INPUTS) -> tuple[Dense, ...]:
    """Every coordinate drawn from N(0, std^2) as one flat vector (docs/algorithm.md#initialisation)."""
    sizes = widths(hidden, inputs)
    return mlp_from_flat(std * jax.random.normal(key, (num_params(sizes),), jnp.float32), sizes)


def mlp_apply(model: Sequence[Dense], x: jax.Array) -> jax.Array:
    """Logits (M, 10) of inputs x (M, inputs); ReLU between layers."""
    for i, layer in enumerate(model):
        x = x @ layer.kernel + layer.bias
        if i < len(model) - 1:
            x = jax.nn.relu(x)
    return x


def classification_scores(model, batch) -> jax.Array:
    """1.0 where the MLP's argmax equals the label, else 0.0: (M,) for batch (x (M, inputs), y (M,))."""
    x, y = batch
    return (jnp.argmax(mlp_apply(model, x), axis=-1) == y).astype(jnp.float32)

