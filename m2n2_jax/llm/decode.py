"""Batched greedy decoding of a `llama.Llama` with a key/value cache and stop tokens,
and exact-match scoring without decoding.

Prompts of different lengths are left-padded into one (B, P) array with a mask
(`left_pad`); each row gets its own rotary positions (0 at its first real token) and
its padding is masked out of attention, so a row decodes as it would alone. The
prompt is read in one call, then one token per call in a `lax.while_loop` that ends
when every row has emitted a stop token or `max_new_tokens` are out: the decoder is a
pure function of static shapes, one jitted program for any batch of that shape.

Exact match needs no decoding (`forced_exact_match_scores`): greedy decoding produces
the answer iff, fed the prompt and the answer's own tokens, the argmax at every answer
position is the next answer token. One forward pass over prompt + answer scores a
question; the prompt prefix that every question shares (a chat template and its
system message) is read once per call and its keys and values reused by every row
(`prefix_cache`); rows are scored in groups of similar length, each group at
the narrowest of a few static widths (`forced_batch`, `width_buckets`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2n2_jax.llm.llama import Llama, cache_length, extend_cache, fuse


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
           stop_tokens: Sequence[int], pad_id: int, fused: bool = True, phase: int = 64) -> jax.Array:
    """(B, max_new_tokens) int32: the tokens greedy decoding appends to each prompt.

    Args:
      prompts: (B, P) int, left-padded (`left_pad`); mask (B, P) bool marks real tokens.
      max_new_tokens: static; the cache ends with P + max_new_tokens - 1 slots.
      stop_tokens: ids that end a row; the stop token itself is emitted, `pad_id` after it.
      fused: decode with q/k/v and gate/up fused (`llama.fuse`, one copy of those
        leaves per call): faster batched steps, the same tokens up to float rounding.
      phase: steps per phase. Each step's attention reads every slot of the cache, so
        the cache grows by `phase` slots per phase (one copy) instead of holding all
        P + max_new_tokens - 1 from the start: the prompt reads P slots, a step at most
        `phase` slots more than it needs.

    A row's output equals decoding it alone, unpadded (the padding is invisible to
    attention and positions count from each row's first real token). The steps stop
    when every row has emitted a stop token.
    """
    if max_new_tokens < 1 or phase < 1:
        raise ValueError(f"max_new_tokens and phase must be >= 1, got {max_new_tokens} and {phase}")
    b, p = prompts.shape
    stops = jnp.asarray(list(stop_tokens), jnp.int32).reshape(-1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    if fused:
        net, model = net.clone(fused=True), fuse(model)
    logits, cache = net.apply(model, prompts, positions, net.empty_cache(b, p), 0, mask, last=1)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    lengths = mask.sum(axis=1)  # each row's next position
    carry = (jnp.int32(1), first, out, jnp.isin(first, stops))
    ends = list(range(1 + phase, max_new_tokens, phase)) + [max_new_tokens]
    for start, end in zip([1] + ends, ends):  # step i writes slot p + i - 1: p + end - 1 slots
        cache = extend_cache(cache, b, end - start)
        key_valid = jnp.concatenate([mask, jnp.ones((b, end - 1), bool)], axis=1)

        def cond(state, end=end):
            (i, _, _, done), _ = state
            return (i < end) & ~jnp.all(done)

        def step(state, key_valid=key_valid):
            (i, token, out, done), cache = state
            logits, cache = net.apply(model, token[:, None], (lengths + i - 1)[:, None], cache, p + i - 1, key_valid)
            token = jnp.where(done, pad_id, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32))
            out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
            return (i + 1, token, out, done | jnp.isin(token, stops)), cache

        carry, cache = jax.lax.while_loop(cond, step, (carry, cache))
    return carry[2]


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


IGNORE, NEVER = -1, -2  # forced_batch's targets: no token to check here; a row no generation can equal


def forced_batch(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], stop_tokens: Sequence[int],
                 pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(prefix (M, S), tokens (M, T), lengths (M,), targets (M, N)) for
    `forced_exact_match_scores`, scoring what `exact_match_scores` scores on
    `answer_batch(prompts, answers, pad_id)`.

    prefix: the longest prefix of ids every prompt shares, leaving each at least one
      token of its own (every row holds it: a leaf of the batch must have M rows).
    targets: the tokens greedy decoding must produce, right-aligned in N columns
      (IGNORE before them): the answer padded with `pad_id` to the longest, N, and
      cut after its first stop token (greedy emits only padding after one). A row
      whose answer goes on past a stop token with more than padding can never be
      generated: its targets are NEVER (no argmax matches).
    tokens: each row's prompt after the prefix, then its targets but the last (the
      tokens teacher forcing reads), left-padded with `pad_id`; lengths: their counts.
    """
    stops = set(int(t) for t in stop_tokens)
    width = max(len(a) for a in answers)
    shared = _common_prefix(prompts)
    rows, targets = [], np.full((len(prompts), width), IGNORE, np.int32)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        expected = list(answer) + [pad_id] * (width - len(answer))
        cut = next((j + 1 for j, t in enumerate(expected) if t in stops), width)
        target = expected[:cut] if all(t == pad_id for t in expected[cut:]) else [NEVER] * width
        targets[i, width - len(target):] = target
        rows.append(list(prompt[shared:]) + [max(t, 0) for t in target[:-1]])
    tokens, mask = left_pad(rows, pad_id)
    prefix = np.tile(np.asarray(prompts[0][:shared], np.int32), (len(prompts), 1))
    return prefix, tokens, mask.sum(axis=1).astype(np.int32), targets


def _common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """The length of the ids every prompt starts with, at most the shortest but one."""
    shortest = min(len(p) for p in prompts)
    if shortest == 0:
        raise ValueError("every prompt must hold at least one token")
    first = prompts[0]
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def prefix_cache(net: Llama, model, prefix: jax.Array):
    """The keys and values of prefix (S,), one row of S slots."""
    cache = net.empty_cache(1, prefix.shape[0])
    return net.apply(model, prefix[None], cache=cache, last=1)[1] if prefix.shape[0] else cache


def width_buckets(width: int, least: int, buckets: int) -> tuple[int, ...]:
    """Static widths up to `width`: `buckets` even steps, none below `least`."""
    return tuple(sorted({max(least, -(-width * k // buckets)) for k in range(1, buckets + 1)}))


def forced_exact_match_scores(net: Llama, group_size: int | None = 16, buckets: int = 6):
    """score_fn(model, forced_batch) -> (M,) float32 for `m2n2_jax.run`: 1.0 where
    greedy decoding produces the answer (`forced_batch`), the score of
    `exact_match_scores` at the cost of one forward pass.

    Each row reads its prompt and its answer's tokens (teacher forcing) after the
    shared prefix's cache; the row scores 1 iff the argmax of the logits at each of
    its answer positions (the vocabulary projection runs there only) is the next
    answer token. Rows go in groups of `group_size` (None: all in one), sorted by
    length, and each group runs at the narrowest of `buckets` static widths that
    holds its longest row (`lax.switch`: one compiled shape per width). The buckets
    are chosen here, not in the data: `run` needs one leading axis M on every leaf.

    Float rounding: this forward pass computes a position's logits in another order
    than incremental decoding with a cache (one matmul over prompt + answer against a
    prefill and one-token steps; another softmax width), so the two differ by float32
    rounding, ~1e-6 of the logits' size (SmolLM2: at most 7e-5 on logits up to 45).
    Only where the two largest logits at an answer position are closer than that can
    the two take different argmax tokens and a question's score differ between them;
    then either score is that of the model's greedy decoding within float32 rounding,
    as another batch size or CPU gives (benchmarks/llm_eval.py records the smallest
    such gap on the real questions).
    """

    def score_fn(model, batch):
        prefix, tokens, lengths, targets = (jnp.asarray(x) for x in batch)
        m, width = tokens.shape
        g = m if group_size is None else min(group_size, m)
        groups = -(-m // g)
        order = jnp.argsort(-lengths)
        order = jnp.concatenate([order, order[:groups * g - m]]).reshape(groups, g)
        cache = prefix_cache(net, model, prefix[0])
        widths = width_buckets(width, targets.shape[1], buckets)
        branches = [_forced_group(net, model, cache, w, targets.shape[1]) for w in widths]

        def group(rows):
            branch = jnp.searchsorted(jnp.asarray(widths), lengths[rows].max())
            return jax.lax.switch(branch, branches, tokens[rows], lengths[rows], targets[rows])

        scores = jax.lax.map(group, order).reshape(-1)[:m]
        return jnp.zeros(m, jnp.float32).at[order.reshape(-1)[:m]].set(scores)

    return score_fn


def _forced_group(net: Llama, model, cache, width: int, n: int):
    """The branch of `forced_exact_match_scores` for rows at most `width` tokens long."""

    def branch(tokens, lengths, targets):
        b, s = tokens.shape[0], cache_length(cache)
        tokens = tokens[:, tokens.shape[1] - width:]
        mask = jnp.arange(width) >= (width - lengths)[:, None]
        key_valid = jnp.concatenate([jnp.ones((b, s), bool), mask], axis=1)
        positions = s + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits, _ = net.apply(model, tokens, positions, extend_cache(cache, b, width), s, key_valid, last=n)
        hit = (jnp.argmax(logits, axis=-1) == targets) | (targets == IGNORE)
        return jnp.all(hit, axis=-1).astype(jnp.float32)

    return branch

