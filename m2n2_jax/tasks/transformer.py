"""A tiny decoder-only character transformer and its greedy decoder, in flax.

Pre-LayerNorm blocks (causal multi-head self-attention, then a GELU MLP), learned
absolute position embeddings, a final LayerNorm and an untied output layer. One code
path serves training and decoding: `__call__(tokens, cache, index)` writes the keys
and values of `tokens` into `cache` at positions index.. and attends to everything
up to each query's position, so a full forward pass is the call with an empty cache
at index 0, and a decoding step is the call with one token.

`greedy_decode` emits a fixed number of tokens with a `lax.scan` (static shapes, so a
batch of questions is a `vmap` and the whole decoder one jitted function);
`exact_match_scores` (1 for the whole answer, else 0) and `partial_credit_scores` (the
share of the answer's characters right, in [0, 1]) turn it into the `score_fn` of
`m2n2_jax.run`, and `mixed_scores` picks one of the two per question (per skill).
"""

from __future__ import annotations

from collections.abc import Callable

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


def greedy_decode(net: Transformer, model, prompt: jax.Array, answer_len: int) -> jax.Array:
    """The `answer_len` tokens that greedy decoding appends to one prompt.

    Args:
      prompt: (P,) int tokens; P + answer_len - 1 <= net.max_len.

    Returns:
      (answer_len,) int32. The prompt is read in one call, then each new token in one
      call that attends to the cache, so decoding costs about one forward pass over
      P + answer_len - 1 positions.
    """
    p = prompt.shape[0]
    if p + answer_len - 1 > net.max_len:
        raise ValueError(f"prompt ({p}) + answer ({answer_len}) - 1 tokens exceed max_len {net.max_len}")
    cache = net.empty_cache(1, p + answer_len - 1)
    logits, cache = net.apply(model, prompt[None], cache, 0)
    first = jnp.argmax(logits[0, -1]).astype(jnp.int32)

    def step(carry, i):
        token, cache = carry
        logits, cache = net.apply(model, token.reshape(1, 1), cache, p + i)
        return (jnp.argmax(logits[0, -1]).astype(jnp.int32), cache), token

    (last, _), tokens = jax.lax.scan(step, (first, cache), jnp.arange(answer_len - 1))
    return jnp.concatenate([tokens, last[None]])


def _decode_all(net: Transformer, model, prompts: jax.Array, answer_len: int) -> jax.Array:
    """(M, answer_len): `greedy_decode` vmapped over the prompts (M, P)."""
    return jax.vmap(lambda q: greedy_decode(net, model, q, answer_len))(prompts)


def exact_match(decoded: jax.Array, answers: jax.Array) -> jax.Array:
    """(M,) float32: 1.0 where decoded (M, A) equals answers (M, A) at every position,
    padding included, else 0.0."""
    return jnp.all(decoded == answers, axis=-1).astype(jnp.float32)


def partial_credit(decoded: jax.Array, answers: jax.Array, pad: int = 0) -> jax.Array:
    """(M,) float32 in [0, 1]: the share of the answer's characters right, position by
    position, a continuous reward like WebShop's.

    The positions that count are those where the decoded tokens or the answer hold a
    character (not `pad`); positions where both hold padding are left out:

        credit = #{i counted : decoded[i] == answers[i]} / #{i counted}

    so a missing character (padding where the answer has one) and an extra one
    (a character where the answer is padded) are both wrong. The credit is 1 exactly
    where `exact_match` is 1 (an all-padding answer decoded as all padding counts as
    1), and 0 for an empty (all-padding) or entirely wrong output. E.g. answer "fedcba"
    decoded as "fedcab" earns 4/6, "fed" 3/6, "fedcbax" 6/7, "" 0.
    """
    counted = (decoded != pad) | (answers != pad)
    right = jnp.sum(counted & (decoded == answers), axis=-1)
    total = jnp.sum(counted, axis=-1)
    return jnp.where(total > 0, right / jnp.maximum(total, 1), 1.0).astype(jnp.float32)


# Token-level scorers by name: scorer(decoded (M, A), answers (M, A)) -> (M,) in [0, 1].
SCORERS = {"exact_match": exact_match, "partial_credit": partial_credit}


def decoded_scores(net: Transformer, scorer: str | Callable = "exact_match") -> Callable:
    """score_fn(model, (prompts (M, P), answers (M, A))) -> (M,) float32: `scorer` (a
    name of SCORERS or a function of (decoded, answers)) applied to the greedy
    decoding of each prompt (`answers.shape[1]` tokens); the decoder is vmapped over
    the M questions."""
    score = SCORERS[scorer] if isinstance(scorer, str) else scorer

    def score_fn(model, batch):
        prompts, answers = batch
        return score(_decode_all(net, model, prompts, answers.shape[1]), answers)

    return score_fn


def exact_match_scores(net: Transformer) -> Callable:
    """score_fn(model, (prompts (M, P), answers (M, A))) -> (M,) float32 exact match.

    1.0 where the greedy decoding of a prompt equals its whole answer (padding
    included), else 0.0; the decoder is vmapped over the M questions.
    """
    return decoded_scores(net, exact_match)


def partial_credit_scores(net: Transformer) -> Callable:
    """score_fn(model, (prompts (M, P), answers (M, A))) -> (M,) float32 in [0, 1]:
    the `partial_credit` of each prompt's greedy decoding (1 exactly where it is an
    exact match)."""
    return decoded_scores(net, partial_credit)


def mixed_scores(net: Transformer) -> Callable:
    """score_fn(model, (prompts (M, P), answers (M, A), partial (M,) bool)) -> (M,):
    a scorer chosen per question, `partial_credit` where `partial` else `exact_match`,
    from one decoding. For data that mixes skills scored differently (addition by exact
    match, reversal by partial credit: `per_skill_batch`)."""

    def score_fn(model, batch):
        prompts, answers, partial = batch
        decoded = _decode_all(net, model, prompts, answers.shape[1])
        return jnp.where(partial, partial_credit(decoded, answers), exact_match(decoded, answers))

    return score_fn


def per_skill_batch(data: dict, scorers: dict) -> tuple:
    """The batch of `mixed_scores` from data[skill] = (prompts, answers) and
    scorers[skill] = "exact_match" or "partial_credit": the skills' questions
    concatenated in the order of `data`."""
    for skill in data:
        if scorers.get(skill) not in SCORERS:
            raise ValueError(f"scorer {scorers.get(skill)!r} for {skill!r}: choose one of {tuple(SCORERS)}")
    prompts = jnp.concatenate([jnp.asarray(p) for p, _ in data.values()])
    answers = jnp.concatenate([jnp.asarray(a) for _, a in data.values()])
    partial = jnp.concatenate([jnp.full(len(p), scorers[s] == "partial_credit") for s, (p, _) in data.items()])
    return prompts, answers, partial


def sequence_loss(net: Transformer, model, prompts: jax.Array, answers: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy on the answer tokens (teacher forcing).

    prompts (B, P), answers (B, A); the network reads prompt + answer[:-1].
    """
    inputs = jnp.concatenate([prompts, answers[:, :-1]], axis=1)
    logits, _ = net.apply(model, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, prompts.shape[1] - 1:], answers).mean()
