"""scikit-learn's 8x8 digits, split as in the paper: first 80 % train, rest test.

Pixels are the raw values 0..16 (not rescaled), as SPEC.md states. The data ship with
scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def load_digits(train_fraction: float = 0.8):
    """((x_train, y_train), (x_test, y_test)) as float32 (M, 64) and int32 (M,) arrays.

    With the default fraction: 1,437 training and 360 test images.
    """
    from sklearn.datasets import load_digits as _load

    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    x, y = _load(return_X_y=True)
    n_train = int(len(x) * train_fraction)
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def parity_groups(labels) -> np.ndarray:
    """Group id per datapoint: 0 for odd digits, 1 for even (MAP-Elites descriptor)."""
    return (np.asarray(labels) % 2 == 0).astype(np.int32)
