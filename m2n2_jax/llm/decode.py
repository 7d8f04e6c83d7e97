"""Batched greedy decoding of a `llama.Llama` with a key/value cache and stop tokens.

Prompts of different lengths are left-padded into one (B, P) array with a mask
(`left_pad`); each row gets its own rotary positions (0 at its first real token) and
its padding is masked out of attention, so a row decodes as it would alone. The
prompt is read in one call, then one token per call in a `lax.while_loop` that ends
when every row has emitted a stop token or `max_new_tokens` are out: the decoder is a
pure function of static shapes, one jitted program for any batch of that shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2n2_jax.llm.llama import Llama


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, P) int32, mask (B, P) bool): token-id lists right-aligned in P
    columns (default: the longest), `pad_id` and False before each."""
    if not len(prompts) or min(len(p) for p in prompts) == 0:
        raise ValueError("left_pad needs at least one prompt, none of them empty")
    width = max(len(p) for p in prompts) if length is None else length
    if max(len(p) for p in prompts) > width:
        raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens does not fit in {width} columns")
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, p in enumerate(prompts):
        tokens[row, width - len(p):] = p
        mask[row, width - len(p):] = True
    return tokens, mask


def greedy(net: Llama, model, prompts: jax.Array, mask: jax.Array, max_new_tokens: int,
           stop_tokens: Sequence[int], pad_id: int) -> jax.Array:
    """(B, max_new_tokens) int32: the tokens greedy decoding appends to each prompt.

    Args:
      prompts: (B, P) int, left-padded (`left_pad`); mask (B, P) bool marks real tokens.
      max_new_tokens: static; the cache holds P + max_new_tokens - 1 slots.
      stop_tokens: ids that end a row; the stop token itself is emitted, `pad_id` after it.

    A row's output equals decoding it alone, unpadded (the padding is invisible to
    attention and positions count from each row's first real token).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b, p = prompts.shape
    stops = jnp.asarray(list(stop_tokens), jnp.int32).reshape(-1)
    length = p + max_new_tokens - 1
    key_valid = jnp.concatenate([mask, jnp.ones((b, max_new_tokens - 1), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = net.apply(model, prompts, positions, net.empty_cache(b, length), 0, key_valid)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stops)
    lengths = mask.sum(axis=1)  # each row's next position

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(carry):
        i, token, cache, out, done = carry
        logits, cache = net.apply(model, token[:, None], (lengths + i - 1)[:, None], cache, p + i - 1, key_valid)
        token = jnp.where(done, pad_id, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        return i + 1, token, cache, out, done | jnp.isin(token, stops)

    return jax.lax.while_loop(cond, step, (jnp.int32(1), first, cache, out, done))[3]


def strip(tokens: np.ndarray, stop_tokens: Sequence[int]) -> list[list[int]]:
    """Each row of `greedy`'s output up to (not including) its first stop token."""
    rows = []
    for row in np.asarray(tokens).tolist():
        ends = [i for i, t in enumerate(row) if t in set(stop_tokens)]
        rows.append(row[:ends[0]] if ends else row)
    return rows


def answer_batch(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int,
                 prompt_length: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompts (M, P), mask (M, P), expected (M, N)) for `exact_match_scores`: the
    prompts left-padded, each answer's ids (its stop token last) right-padded with
    `pad_id` to the longest answer, N."""
    tokens, mask = left_pad(prompts, pad_id, prompt_length)
    expected = np.full((len(answers), max(len(a) for a in answers)), pad_id, np.int32)
    for row, answer in enumerate(answers):
        expected[row, :len(answer)] = answer
    return tokens, mask, expected


def exact_match_scores(net: Llama, stop_tokens: Sequence[int], pad_id: int):
    """score_fn(model, (prompts, mask, expected)) -> (M,) float32 for `m2n2_jax.run`:
    1.0 where the greedy generation of N = expected.shape[1] tokens equals the answer
    (`answer_batch`: its stop token, then padding), else 0.0."""
    stops = tuple(int(t) for t in stop_tokens)

    def score_fn(model, batch):
        prompts, mask, expected = batch
        out = greedy(net, model, prompts, mask, expected.shape[1], stops, pad_id)
        return jnp.all(out == expected, axis=-1).astype(jnp.float32)

    return score_fn
