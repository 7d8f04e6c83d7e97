"""Fine-tune SmolLM2-135M-Instruct into a specialist with LoRA (experiments/llm_real.py train).

LoRA, not a full fine-tune: a fresh clone must get the specialists without
retraining, and a full delta of 134.5M float32 weights is 538 MB per specialist;
rank-8 adapters on every projection of the 30 layers are 2.4M weights (9.8 MB).
Training also needs no Adam state for the 134.5M frozen weights.

The loss is the next-token cross-entropy on the answer tokens only (the answer and
its `<|im_end|>`), prompt and answer right-padded to one length so that a batch
needs no attention mask. Batches are drawn from the skill's "finetune" source
(llm_real_data), which neither the fitness nor the test questions come from.
Adapters, optimizer state and the loss log are saved every `save_every` steps to
`<out>/<skill>.partial.npz`, and a rerun resumes from there; the finished adapters
go to `<out>/<skill>.safetensors` with the settings as metadata, the log to
`<out>/<skill>_train.json`.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file, save_file

from experiments import llm_real_data
from m2n2_jax.llm import llama
from m2n2_jax.tasks import lora

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_target(path: str) -> bool:
    return any(f"/{t}/" in path for t in TARGETS)


def sequences(prompts, answers, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, length), loss mask (B, length - 1)): prompt + answer right-padded;
    the mask selects the predictions of the answer's tokens."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length - 1), bool)
    for row, (p, a) in enumerate(zip(prompts, answers)):
        if len(p) + len(a) > length:
            raise ValueError(f"a question of {len(p) + len(a)} tokens exceeds the training length {length}")
        tokens[row, :len(p) + len(a)] = p + a
        mask[row, len(p) - 1:len(p) + len(a) - 1] = True
    return tokens, mask


def train(skill: str, model: llama.Llama, params, tokenizer, out: str, steps: int, batch: int, rank: int,
          alpha: float, lr: float, seed: int, save_every: int = 25, log=print) -> dict:
    """Train (or resume) the adapters of one skill; returns them ({path: {"a", "b"}})."""
    os.makedirs(out, exist_ok=True)
    final = os.path.join(out, f"{skill}.safetensors")
    partial = os.path.join(out, f"{skill}.partial.npz")
    pairs = llm_real_data.questions(skill, "finetune", None if skill == "arithmetic" else steps * batch, seed)
    prompts, answers = llm_real_data.encode(tokenizer, pairs)
    length = -(-max(len(p) + len(a) for p, a in zip(prompts, answers)) // 8) * 8  # the longest, rounded up to 8
    settings = {"skill": skill, "steps": steps, "batch": batch, "rank": rank, "alpha": alpha, "lr": lr,
                "seed": seed, "length": length, "targets": list(TARGETS)}
    order = np.concatenate([np.random.default_rng([seed, epoch]).permutation(len(pairs))
                            for epoch in range(-(-steps * batch // len(pairs)))])
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(20, steps // 2), steps)
    optimizer = optax.adamw(schedule, weight_decay=0.0)
    adapters = lora.init(jax.random.key(seed), params, rank, is_target)
    opt_state = optimizer.init(adapters)
    losses, start, seconds = [], 0, 0.0
    if os.path.exists(partial):
        saved = np.load(partial, allow_pickle=False)
        if json.loads(str(saved["settings"])) != settings:
            raise ValueError(f"{partial} was written with other settings; delete it to start again")
        leaves, treedef = jax.tree.flatten((adapters, opt_state))
        adapters, opt_state = jax.tree.unflatten(treedef, [jnp.asarray(saved[f"leaf_{i}"]) for i in range(len(leaves))])
        losses, start, seconds = saved["losses"].tolist(), int(saved["step"]), float(saved["seconds"])
        log(f"{skill}: resumed at step {start}")

    def loss_fn(adapters, tokens, mask):
        nll = llama.token_nll(model, lora.merge(params, adapters, alpha), tokens, mask)
        return nll.sum() / mask.sum()

    @jax.jit
    def step(adapters, opt_state, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, tokens, mask)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    def save(at: int):
        leaves = jax.tree.leaves((adapters, opt_state))
        tmp = partial + ".tmp.npz"
        np.savez(tmp, settings=json.dumps(settings), step=at, seconds=seconds, losses=np.asarray(losses, np.float32),
                 **{f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)})
        os.replace(tmp, partial)

    t0 = time.perf_counter() - seconds
    for s in range(start, steps):
        rows = order[s * batch:(s + 1) * batch]
        tokens, mask = sequences([prompts[i] for i in rows], [answers[i] for i in rows], length, 2)
        adapters, opt_state, loss = step(adapters, opt_state, tokens, mask)
        losses.append(float(loss))
        seconds = time.perf_counter() - t0
        if (s + 1) % save_every == 0 or s + 1 == steps:
            save(s + 1)
            log(f"{skill}: step {s + 1}/{steps}, loss {np.mean(losses[-save_every:]):.4f}, {seconds / 60:.1f} min")
    save_file({f"{name}/{k}": np.asarray(v) for name, ab in adapters.items() for k, v in ab.items()}, final,
              metadata={k: json.dumps(v) for k, v in settings.items()})
    with open(os.path.join(out, f"{skill}_train.json"), "w") as f:
        json.dump({**settings, "losses": losses, "train_seconds": seconds,
                   "device": f"{jax.devices()[0].device_kind}"}, f, indent=1)
    os.remove(partial)
    return adapters


def load_adapters(path: str) -> tuple[dict, dict]:
    """(adapters, settings) of a saved specialist."""
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        settings = {k: json.loads(v) for k, v in f.metadata().items()}
    adapters = {}
    for name, x in load_file(path).items():
        leaf, part = name.rsplit("/", 1)
        adapters.setdefault(leaf, {})[part] = jnp.asarray(x)
    return adapters, settings
