"""The paper's classifier: an MLP 64 -> 256 (ReLU) -> 10 (D = 19,210), in flax."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """Dense layers with ReLU between them; the last layer gives logits."""

    features: Sequence[int] = (256, 10)

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.features):
            x = nn.Dense(width)(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


def random_params(key: jax.Array, module: nn.Module, input_dim: int, std: float = 0.01):
    """Params of `module` with every coordinate drawn from N(0, std^2) (SPEC's seeds)."""
    template = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, input_dim)))
    leaves, treedef = jax.tree.flatten(template)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )
