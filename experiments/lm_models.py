"""The base language model and its two specialists for experiments/lm_skills.py.

The base is pre-trained briefly with Adam on a mixture of copying strings (60 %) and
addition (40 %), so it copies well, adds poorly and has never seen reversal (even 5 %
of reversal in the mixture made the base reverse at 99 %, leaving its specialist
nothing to add). The addition and reversal specialists are fine-tuned from it, each
on its own skill only, with a smaller learning rate. All training data exclude the
test questions. The three models are trained once per
setting and cached with orbax under experiments/cache/.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from m2n2_jax.data import skills
from m2n2_jax.models.transformer import Transformer, sequence_loss

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")
SPECIALISTS = ("addition", "reversal")  # specialist_a, specialist_b


@dataclasses.dataclass(frozen=True)
class Training:
    """Model size and training schedule (part of the cache key)."""

    d_model: int = 128
    num_layers: int = 3
    num_heads: int = 4
    batch: int = 128
    base_steps: int = 2000
    base_lr: float = 1e-3
    base_mixture: tuple = (("copy", 0.6), ("addition", 0.4))
    finetune_steps: int = 1000
    finetune_lr: float = 1e-4
    pool: int = 60_000  # training questions per model, sampled into batches
    seed: int = 0

    def base_tag(self) -> str:
        mix = "-".join(f"{k[0]}{w:g}" for k, w in self.base_mixture)
        return (f"lm_d{self.d_model}_l{self.num_layers}_h{self.num_heads}_b{self.batch}_p{self.pool}_s{self.seed}"
                f"_base{self.base_steps}_lr{self.base_lr:g}_{mix}")

    def tag(self) -> str:
        return f"{self.base_tag()}_ft{self.finetune_steps}_lr{self.finetune_lr:g}"


def make_model(t: Training) -> Transformer:
    return Transformer(len(skills.VOCAB), skills.PROMPT_LEN + skills.ANSWER_LEN - 1,
                       d_model=t.d_model, num_layers=t.num_layers, num_heads=t.num_heads)


def train(model, params, data, steps: int, learning_rate: float, batch: int, key):
    """`params` after `steps` Adam steps (cosine-decayed rate) on minibatches drawn
    from data = (prompts (n, P), answers (n, A)); returns (params, losses (steps,))."""
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1))
    prompts, answers = data

    def step(carry, k):
        params, opt_state = carry
        idx = jax.random.randint(k, (batch,), 0, prompts.shape[0])
        loss, grads = jax.value_and_grad(lambda p: sequence_loss(model, p, prompts[idx], answers[idx]))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, steps))
    return params, losses


def load_or_train(t: Training, exclude, cache: str = CACHE, log=print) -> dict:
    """{"base", "addition", "reversal"} params, from the orbax cache or trained and cached.

    `exclude`: prompts (the test questions) that no training question may use.
    """
    model = make_model(t)
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, model.max_len), jnp.int32))
    train_fn = jax.jit(functools.partial(train, model), static_argnums=(2, 3, 4))
    k_init, k_base, *k_ft = jax.random.split(jax.random.key(t.seed), 2 + len(SPECIALISTS))
    t0 = time.perf_counter()

    def pretrain():
        mix = skills.mixture(dict(t.base_mixture), t.pool, np.random.default_rng((t.seed, 0)), exclude)
        base, losses = train_fn(model.init(k_init, jnp.zeros((1, model.max_len), jnp.int32)),
                                skills.tokenize(mix), t.base_steps, t.base_lr, t.batch, k_base)
        log(f"base: {t.base_steps} steps, final loss {float(losses[-10:].mean()):.4f}, {time.perf_counter() - t0:.0f} s")
        return {"base": base}

    def finetune():
        rng, out = np.random.default_rng((t.seed, 1)), {}
        for skill, k in zip(SPECIALISTS, k_ft):
            data = skills.tokenize(skills.questions(skill, t.pool, rng, exclude))
            out[skill], losses = train_fn(base, data, t.finetune_steps, t.finetune_lr, t.batch, k)
            log(f"{skill} specialist: {t.finetune_steps} steps, final loss {float(losses[-10:].mean()):.4f}, "
                f"{time.perf_counter() - t0:.0f} s")
        return out

    base = _cached(os.path.join(cache, t.base_tag()), {"base": template}, pretrain)["base"]
    return {"base": base, **_cached(os.path.join(cache, t.tag()), {s: template for s in SPECIALISTS}, finetune)}


def _cached(path: str, template, make):
    """The tree saved at `path` (orbax), or make() saved there (the base is cached on its
    own, so that other fine-tuning settings reuse it)."""
    path, checkpointer = os.path.abspath(path), ocp.StandardCheckpointer()
    if os.path.isdir(path):
        return checkpointer.restore(path, template)
    tree = make()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpointer.save(path, tree)  # orbax writes to a temporary directory and renames it
    checkpointer.wait_until_finished()
    return tree
