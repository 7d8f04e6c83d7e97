"""The base language model and its two specialists for experiments/lm_skills.py.

The base is pre-trained briefly with Adam on copying strings (40 %) and on the short
forms of the two skills (30 % each: 2-digit addition, reversal of 3-4 letters), so
it knows both prompt formats but cannot add 3-digit numbers and reverses only short
strings. Each specialist is fine-tuned from it on the full form of its own skill
(50 %: 3-digit addition, reversal of 3-6 letters) mixed with the base's own
pre-training mixture (50 %, replay), so it keeps what the base knew of the other
skill instead of overwriting it. All training data exclude the test questions; the
three models are trained once per setting and exclusion set and cached with orbax
under experiments/cache/.

Settings tried before these (in the README): without replay, or replaying copying
only, each specialist unlearns the other skill (the reversal specialist's addition
fell from 94 % to 2-6 %), and no merge of the two recovers it.

That is pair (a) (`PAIRS["a"]`, the defaults). Pair (b) (`PAIRS["b"]`, docs/lm_pairs.md)
resembles large-model fine-tunes: its base has seen some 3-digit addition (10 % of
pre-training) and the specialists are fine-tuned at a third of the rate, so their task
vectors are small, near-orthogonal and survive DARE's 90 % drop. `Training`'s
fine-tuning options (decay toward the base, parameter subsets, low-rank deltas:
`finetune_delta`) were tried for it and are kept for further attempts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import harness
from m2n2_jax.merge import leaf_path
from m2n2_jax.tasks import skills
from m2n2_jax.tasks.transformer import Transformer, sequence_loss

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")


@dataclasses.dataclass(frozen=True)
class Training:
    """Model size and training schedule (part of the cache key)."""

    d_model: int = 128
    num_layers: int = 3
    num_heads: int = 4
    batch: int = 128
    base_steps: int = 1500
    base_lr: float = 1e-3
    base_mixture: tuple = (("copy", 0.4), ("addition_short", 0.3), ("reversal_short", 0.3))
    finetune_steps: int = 1000
    finetune_lr: float = 3e-4
    specialists: tuple = ("addition", "reversal")  # the skills of specialist_a and specialist_b
    # ((skill, weight), ...) mixed into each specialist's data: the base's own mixture
    finetune_replay: tuple = (("copy", 0.2), ("addition_short", 0.15), ("reversal_short", 0.15))
    pool: int = 60_000  # training questions per model, sampled into batches
    seed: int = 0
    # Fine-tuning options (pair (b), docs/lm_pairs.md); at these defaults the specialists
    # are trained as they always were (same code, same cache tag). Otherwise the
    # fine-tuning trains a delta added to the frozen base (`finetune_delta`):
    finetune_weight_decay: float = 0.0  # AdamW decay of the delta, i.e. toward the base
    # One regex per specialist: only leaves whose path ("params/layer_0/attn/qkv/kernel")
    # it matches (re.search) are fine-tuned; () fine-tunes everything.
    finetune_params: tuple = ()
    finetune_rank: int = 0  # > 0: low-rank (LoRA) deltas A @ B of the blocks' Dense kernels only

    def __post_init__(self):
        if not 0 <= sum(w for _, w in self.finetune_replay) < 1:
            raise ValueError(f"finetune_replay weights must sum to [0, 1), got {self.finetune_replay}")
        if not sum(w for _, w in self.base_mixture) > 0:
            raise ValueError(f"base_mixture weights must sum to > 0, got {self.base_mixture}")
        if len(self.specialists) != 2 or self.specialists[0] == self.specialists[1]:
            raise ValueError(f"specialists must be two different skills, got {self.specialists}")
        if self.finetune_params and len(self.finetune_params) != len(self.specialists):
            raise ValueError(f"finetune_params must hold one regex per specialist, got {self.finetune_params}")
        for pattern in self.finetune_params:
            re.compile(pattern)
        if self.finetune_weight_decay < 0 or self.finetune_rank < 0:
            raise ValueError("finetune_weight_decay and finetune_rank must be >= 0")

    def delta_finetuning(self) -> bool:
        """Whether the specialists are trained as a delta on the frozen base (`finetune`)."""
        return bool(self.finetune_weight_decay or self.finetune_params or self.finetune_rank)

    def base_tag(self) -> str:
        mix = "-".join(f"{k}{w:g}" for k, w in self.base_mixture)
        return (f"lm_d{self.d_model}_l{self.num_layers}_h{self.num_heads}_b{self.batch}_p{self.pool}_s{self.seed}"
                f"_base{self.base_steps}_lr{self.base_lr:g}_{mix}")

    def tag(self) -> str:
        replay = "".join(f"_{k}{w:g}" for k, w in self.finetune_replay)
        extra = ((f"_wd{self.finetune_weight_decay:g}" if self.finetune_weight_decay else "")
                 + (f"_p{hashlib.sha1(repr(self.finetune_params).encode()).hexdigest()[:8]}"
                    if self.finetune_params else "")
                 + (f"_r{self.finetune_rank}" if self.finetune_rank else ""))
        return (f"{self.base_tag()}_{'-'.join(self.specialists)}_ft{self.finetune_steps}_lr{self.finetune_lr:g}"
                f"{replay}{extra}")


def make_model(t: Training) -> Transformer:
    return Transformer(len(skills.VOCAB), skills.PROMPT_LEN + skills.ANSWER_LEN - 1,
                       d_model=t.d_model, num_layers=t.num_layers, num_heads=t.num_heads)


def train(model, params, data, steps: int, learning_rate: float, batch: int, key):
    """`params` after `steps` Adam steps (cosine-decayed rate) on minibatches drawn
    from data = (prompts (n, P), answers (n, A)); returns (params, losses (steps,))."""
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1))
    prompts, answers = data

    def loss_fn(params, k):
        idx = jax.random.randint(k, (batch,), 0, prompts.shape[0])
        return sequence_loss(model, params, prompts[idx], answers[idx])

    return harness.train(loss_fn, params, optimizer, jax.random.split(key, steps))


def delta_parametrization(base, key, pattern: str = "", rank: int = 0) -> tuple:
    """(delta, params_of): the initial trainable delta of `finetune_delta` and
    params_of(delta) = base + the delta it encodes (a pure function of delta).

    delta maps leaf indices (in `jax.tree.leaves` order) to arrays: a zero array like
    the leaf for each leaf whose path matches `pattern` (re.search; "" = all); with
    rank > 0 only for the matching Dense kernels of the blocks ("layer_i/.../kernel"),
    each a pair (A (m, rank) ~ N(0, 1/m), B (rank, n) = 0) encoding A @ B (LoRA), so
    training starts at the base."""
    paths = [leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(base)[0]]
    leaves, treedef = jax.tree.flatten(base)
    trained = [i for i, p in enumerate(paths) if re.search(pattern, p)
               and (not rank or (re.search(r"layer_\d+/", p) is not None and p.endswith("kernel")))]
    if not trained:
        raise ValueError(f"no parameter matches {pattern!r}" + (" among the blocks' kernels" if rank else ""))
    keys = jax.random.split(key, len(leaves))
    delta = {i: (jax.random.normal(keys[i], (leaves[i].shape[0], rank)) / jnp.sqrt(leaves[i].shape[0]),
                 jnp.zeros((rank, leaves[i].shape[1]))) if rank else jnp.zeros_like(leaves[i]) for i in trained}

    def params_of(delta):
        return jax.tree.unflatten(treedef, [x + ((delta[i][0] @ delta[i][1]) if rank else delta[i]) if i in delta else x
                                            for i, x in enumerate(leaves)])

    return delta, params_of


def finetune_delta(model, base, data, steps: int, learning_rate: float, batch: int, key, weight_decay: float = 0.0,
                   pattern: str = "", rank: int = 0):
    """(base + delta, losses (steps,)): a delta (`delta_parametrization`: all leaves, the
    leaves matching `pattern`, or low-rank deltas of the kernels) trained with AdamW
    (cosine-decayed rate, decoupled decay `weight_decay` of the delta, i.e. toward the
    base) on minibatches of data = (prompts, answers), the base frozen."""
    delta, params_of = delta_parametrization(base, jax.random.fold_in(key, 1), pattern, rank)
    optimizer = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1), weight_decay=weight_decay)
    prompts, answers = map(jnp.asarray, data)

    def loss_fn(delta, k):
        idx = jax.random.randint(k, (batch,), 0, prompts.shape[0])
        return sequence_loss(model, params_of(delta), prompts[idx], answers[idx])

    delta, losses = harness.train(loss_fn, delta, optimizer, jax.random.split(key, steps))
    return params_of(delta), losses


def load_or_train(t: Training, exclude, cache: str = CACHE, log=print, base_only: bool = False) -> dict:
    """{"base", specialist skill, ...} params, from the orbax cache or trained and cached
    ({"base"} alone if `base_only`).

    `exclude`: prompts (the test questions) that no training question may use; the cache
    is kept per exclusion set, so models never reach a test set their data overlapped.
    """
    cache = os.path.join(cache, "exclude_" + hashlib.sha1("\n".join(sorted(exclude)).encode()).hexdigest()[:12])
    model = make_model(t)
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, model.max_len), jnp.int32))
    train_fn = jax.jit(functools.partial(train, model), static_argnums=(2, 3, 4))
    finetune_fn = jax.jit(functools.partial(finetune_delta, model), static_argnums=(2, 3, 4, 6, 7, 8))
    k_init, k_base, *k_ft = jax.random.split(jax.random.key(t.seed), 2 + len(t.specialists))
    t0 = time.perf_counter()

    def pretrain():
        mix = skills.mixture(dict(t.base_mixture), t.pool, np.random.default_rng((t.seed, 0)), exclude)
        base, losses = train_fn(model.init(k_init, jnp.zeros((1, model.max_len), jnp.int32)),
                                skills.tokenize(mix), t.base_steps, t.base_lr, t.batch, k_base)
        log(f"base: {t.base_steps} steps, final loss {float(losses[-10:].mean()):.4f}, "
            f"{time.perf_counter() - t0:.0f} s")
        return {"base": base}

    def finetune():
        rng, out = np.random.default_rng((t.seed, 1)), {}
        for i, (skill, k) in enumerate(zip(t.specialists, k_ft)):
            weights = {skill: 1.0 - sum(w for _, w in t.finetune_replay), **dict(t.finetune_replay)}
            data = skills.tokenize(skills.mixture(weights, t.pool, rng, exclude))
            if t.delta_finetuning():
                out[skill], losses = finetune_fn(base, data, t.finetune_steps, t.finetune_lr, t.batch, k,
                                                 t.finetune_weight_decay,
                                                 t.finetune_params[i] if t.finetune_params else "", t.finetune_rank)
            else:
                out[skill], losses = train_fn(base, data, t.finetune_steps, t.finetune_lr, t.batch, k)
            log(f"{skill} specialist: {t.finetune_steps} steps, final loss {float(losses[-10:].mean()):.4f}, "
                f"{time.perf_counter() - t0:.0f} s")
        return out

    # The base is cached on its own, so that other fine-tuning settings reuse it.
    base = harness.cached(os.path.join(cache, t.base_tag()), {"base": template}, pretrain)["base"]
    if base_only:
        return {"base": base}
    return {"base": base,
            **harness.cached(os.path.join(cache, t.tag()), {s: template for s in t.specialists}, finetune)}


# The two specialist pairs of experiments/lm_skills.py (docs/lm_pairs.md, with the
# attempts that led to (b) in experiments/results/lm_skills/explorations/pair_b_attempts.json):
# (a) the defaults above: dense, overlapping task vectors (norms 7.7 % and 3.5 % of the
#     base's, cosine 0.11) and an addition skill that DARE's 90 % drop destroys;
# (b) a base that already adds 3-digit numbers 70 % of the time (10 % of its pre-training),
#     fine-tuned at lr 1e-4 (a nudge, as large-model fine-tunes are): norms 3.4 % and 1.9 %,
#     cosine 0.065, both skills kept under DARE's 90 % drop (97 % and 100 %).
PAIRS = {
    "a": Training(),
    "b": Training(base_mixture=(("copy", 0.35), ("addition_short", 0.25), ("reversal_short", 0.3), ("addition", 0.1)),
                  finetune_lr=1e-4),
}
