"""A tiny decoder-only character transformer and its greedy decoder, in flax.

Pre-LayerNorm blocks (causal multi-head self-attention, then a GELU MLP), learned
absolute position embeddings, a final LayerNorm and an untied output layer. One code
path serves training and decoding: `__call__(tokens, cache, index)` writes the keys
and values of `tokens` into `cache` at positions index.. and attends to everything
up to each query's position, so a full forward pass is the call with an empty cache
at index 0, and a decoding step is the call with one token.

`greedy_decode` emits a fixed number of tokens with a `lax.scan` (static shapes, so a
batch of questions is a `vmap` and the whole decoder one jitted function);
`exact_match_scores` turns it into the `score_fn` of `m2n2_jax.run`.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Cache = list  # [(keys, values)] per layer, each (B, T, heads, head_dim)


class Attention(nn.Module):
    """Causal multi-head self-attention that reads and writes a key/value cache."""

    num_heads: int

    @nn.compact
    def __call__(self, x, cache, index):
        b, t, d = x.shape
        qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        keys = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, index, 0, 0))
        values = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, index, 0, 0))
        causal = jnp.arange(keys.shape[1])[None, :] <= (index + jnp.arange(t))[:, None]  # (t, T)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, keys) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        weights = jax.nn.softmax(jnp.where(causal, logits, jnp.finfo(logits.dtype).min), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, values).reshape(b, t, d)
        return nn.Dense(d, name="out")(out), (keys, values)


class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x, cache, index):
        h, cache = Attention(self.num_heads, name="attn")(nn.LayerNorm(name="ln_attn")(x), cache, index)
        x = x + h
        h = nn.Dense(self.mlp_ratio * x.shape[-1], name="mlp_in")(nn.LayerNorm(name="ln_mlp")(x))
        return x + nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(h)), cache


class Transformer(nn.Module):
    """Decoder-only transformer over `vocab_size` characters, sequences <= max_len.

    Parameter names sort in depth order (embed, layer_0.., out), so the flat
    parameter vector that M2N2's split point cuts runs from input to output.
    """

    vocab_size: int
    max_len: int
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4

    @nn.compact
    def __call__(self, tokens, cache: Cache | None = None, index=0):
        """Logits (B, t, vocab) of `tokens` (B, t) at positions index..index+t-1.

        Returns (logits, cache); without a cache, attends within `tokens` only.
        """
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"{tokens.shape[1]} tokens exceed max_len {self.max_len}")
        if cache is None:
            cache = self.empty_cache(tokens.shape[0], tokens.shape[1])
        embed = nn.Embed(self.vocab_size, self.d_model, name="embed")
        positions = self.param("embed_pos", nn.initializers.normal(0.02), (self.max_len, self.d_model))
        x = embed(tokens) + jax.lax.dynamic_slice_in_dim(positions, index, tokens.shape[1])
        new_cache = []
        for i in range(self.num_layers):
            x, layer_cache = Block(self.num_heads, name=f"layer_{i}")(x, cache[i], index)
            new_cache.append(layer_cache)
        x = nn.LayerNorm(name="ln_out")(x)
        return nn.Dense(self.vocab_size, name="out")(x), new_cache

    def empty_cache(self, batch: int, length: int, dtype=jnp.float32) -> Cache:
        """Zero keys and values for `length` positions of `batch` sequences."""
        shape = (batch, length, self.num_heads, self.d_model // self.num_heads)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.num_layers)]


def greedy_decode(model: Transformer, params, prompt: jax.Array, answer_len: int) -> jax.Array:
    """The `answer_len` tokens that greedy decoding appends to one prompt.

    Args:
      prompt: (P,) int tokens; P + answer_len - 1 <= model.max_len.

    Returns:
      (answer_len,) int32. The prompt is read in one call, then each new token in one
      call that attends to the cache, so decoding costs about one forward pass over
      P + answer_len - 1 positions.
    """
    p = prompt.shape[0]
    if p + answer_len - 1 > model.max_len:
        raise ValueError(f"prompt ({p}) + answer ({answer_len}) - 1 tokens exceed max_len {model.max_len}")
    cache = model.empty_cache(1, p + answer_len - 1)
    logits, cache = model.apply(params, prompt[None], cache, 0)
    first = jnp.argmax(logits[0, -1]).astype(jnp.int32)

    def step(carry, i):
        token, cache = carry
        logits, cache = model.apply(params, token.reshape(1, 1), cache, p + i)
        return (jnp.argmax(logits[0, -1]).astype(jnp.int32), cache), token

    (last, _), tokens = jax.lax.scan(step, (first, cache), jnp.arange(answer_len - 1))
    return jnp.concatenate([tokens, last[None]])


def exact_match_scores(model: Transformer) -> Callable:
    """score_fn(params, (prompts (M, P), answers (M, A))) -> (M,) float32 exact match.

    1.0 where the greedy decoding of a prompt equals its whole answer (padding
    included), else 0.0; the decoder is vmapped over the M questions.
    """

    def score_fn(params, batch):
        prompts, answers = batch
        decoded = jax.vmap(lambda q: greedy_decode(model, params, q, answers.shape[1]))(prompts)
        return jnp.all(decoded == answers, axis=-1).astype(jnp.float32)

    return score_fn


def sequence_loss(model: Transformer, params, prompts: jax.Array, answers: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy on the answer tokens (teacher forcing).

    prompts (B, P), answers (B, A); the model reads prompt + answer[:-1].
    """
    inputs = jnp.concatenate([prompts, answers[:, :-1]], axis=1)
    logits, _ = model.apply(params, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, prompts.shape[1] - 1:], answers).mean()
