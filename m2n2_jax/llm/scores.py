"""The task kinds of `m2n2-merge`: JSONL rows to a `score_fn` and its batch.

Every kind gives `run` what it needs: `encode` makes a batch of rows (host arrays
whose leaves share a leading axis M, one row each), `scorer` the `score_fn(model,
batch) -> (M,)` scores in [0, 1]:

- `exact_match`, rows {"prompt", "answer"}: 1.0 where the greedy generation is the
  answer's tokens followed by a stop token, scored without decoding: one forward
  pass over prompt + answer (`decode.forced_exact_match_scores`).
- `choice`, rows {"prompt", "choices", "answer": index}: lm-evaluation-harness's
  multiple choice (its `acc`): each choice's log-likelihood given the prompt is the
  sum of its tokens' log-probabilities; 1.0 where the argmax (the first on ties) is
  the answer. Encoded as lm-eval encodes a pair by default: no special tokens, the
  prompt's trailing spaces moved to the choice, the choice's tokens those that follow
  the prompt's in the encoding of prompt + choice.
- `nll`, rows {"text"}: exp(-mean next-token loss) of the text (nats per token over
  its predicted tokens), the geometric mean of the probabilities the model gives its
  tokens: 1.0 for a model sure of every token, exp(-2.3) ≈ 0.1 at a loss of 2.3.
  Continuous scores: M2N2 uses the paper's capacity rule "max" for them.
- `gsm8k`, rows {"question", "answer"} (GSM8K's solution ending "#### N"): greedy
  chain-of-thought generation, 1.0 where its last number equals N (`gsm8k`).

A `template` (a `str.format` string over the row's fields) makes the text the model
reads: the prompt of exact_match and choice, the text of nll, the question of gsm8k.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2n2_jax.llm import decode, gsm8k, llama

FIELDS = {  # kind -> {field: the JSON types it takes}
    "exact_match": {"prompt": str, "answer": str},
    "choice": {"prompt": str, "choices": list, "answer": int},
    "nll": {"text": str},
    "gsm8k": {"question": str, "answer": str},
}
KINDS = tuple(FIELDS)
TEMPLATES = {"exact_match": "{prompt}", "choice": "{prompt}", "nll": "{text}", "gsm8k": "{question}"}


def read_rows(path: str, kind: str, count: int) -> list[dict]:
    """The first `count` rows of a JSONL file, each checked against `FIELDS[kind]`
    (a ValueError names the file, the line and the field)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if len(rows) == count:
                break
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {number}: not JSON ({e})") from e
                rows.append(_check_row(row, kind, f"{path} line {number}"))
    if len(rows) < count:
        raise ValueError(f"{path} holds {len(rows)} rows, fewer than the {count} asked for (fitness + test)")
    return rows


def _check_row(row, kind: str, where: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for field, kind_type in FIELDS[kind].items():
        value = row.get(field)
        if not isinstance(value, kind_type) or isinstance(value, bool):
            raise ValueError(f"{where}: field {field!r} must be a {kind_type.__name__}, got {value!r}")
    if kind == "choice":
        choices = row["choices"]
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: 'choices' must be at least 2 non-empty strings, got {choices!r}")
        if not 0 <= row["answer"] < len(choices):
            raise ValueError(f"{where}: 'answer' must index 'choices' (0 .. {len(choices) - 1}), got {row['answer']}")
    if kind == "gsm8k":
        try:
            gsm8k.gold(row["answer"])
        except ValueError as e:
            raise ValueError(f"{where}: 'answer' must end with '#### <integer>' (GSM8K's solutions): {e}") from e
    return row


def texts(rows: Sequence[dict], template: str) -> list[str]:
    """The template filled in with each row's fields."""
    return [template.format(**row) for row in rows]


def encode(kind: str, tokenizer, rows, template: str, stops: Sequence[int], pad_id: int):
    """The batch of `rows` for task `kind` (one of KINDS), its leaves host arrays."""
    if kind == "exact_match":
        return exact_match_batch(tokenizer, rows, template, stops, pad_id)
    if kind == "gsm8k":
        return gsm8k_batch(tokenizer, rows, template, pad_id)
    if kind == "choice":
        return choice_batch(tokenizer, rows, template, pad_id)
    if kind == "nll":
        return nll_batch(tokenizer, rows, template, pad_id)
    raise ValueError(f"task kind {kind!r}: choose one of {', '.join(KINDS)}")


def scorer(kind: str, net: llama.Llama, tokenizer, stops: Sequence[int], pad_id: int, max_new_tokens: int):
    """The score_fn of task `kind` for `encode`'s batches (`max_new_tokens`: gsm8k's)."""
    if kind == "exact_match":
        return decode.forced_exact_match_scores(net)
    if kind == "gsm8k":
        return gsm8k.final_number_scores(net, tokenizer, max_new_tokens, stops, pad_id)
    if kind == "choice":
        return choice_scores(net)
    if kind == "nll":
        return nll_scores(net)
    raise ValueError(f"task kind {kind!r}: choose one of {', '.join(KINDS)}")


def exact_match_batch(tokenizer, rows, template: str, stops: Sequence[int], pad_id: int):
    """`decode.forced_batch` of the prompts and answers: the answer encoded on its own,
    without special tokens, then the first stop token."""
    prompts = [tokenizer.encode(t).ids for t in texts(rows, template)]
    answers = [tokenizer.encode(r["answer"], add_special_tokens=False).ids + [stops[0]] for r in rows]
    return decode.forced_batch(prompts, answers, stops, pad_id)


def gsm8k_batch(tokenizer, rows, template: str, pad_id: int):
    """(prompts (M, P), mask (M, P), gold (M,) int32)."""
    tokens, mask = decode.left_pad([tokenizer.encode(t).ids for t in texts(rows, template)], pad_id)
    return tokens, mask, np.asarray([gsm8k.gold(r["answer"]) for r in rows], np.int32)


def choice_pair(tokenizer, prompt: str, choice: str) -> tuple[list[int], list[int]]:
    """(prompt ids, choice ids) as lm-eval's `_encode_pair` makes them."""
    spaces = len(prompt) - len(prompt.rstrip())
    if spaces:
        prompt, choice = prompt[:-spaces], prompt[-spaces:] + choice
    whole = tokenizer.encode(prompt + choice, add_special_tokens=False).ids
    context = tokenizer.encode(prompt, add_special_tokens=False).ids
    return context, whole[len(context):]


def choice_batch(tokenizer, rows, template: str, pad_id: int):
    """(context (M, P), choices (M, C, K), lengths (M, C), answer (M,)): each row's
    context ids left-padded with -1, each choice's continuation ids right-padded with
    `pad_id` and their counts (0: no such choice, in rows with fewer than C). The
    context is one per row: every choice continues the same ids (`choice_pair`)."""
    pairs = [[choice_pair(tokenizer, p, c) for c in r["choices"]] for p, r in zip(texts(rows, template), rows)]
    return (*choice_arrays(pairs, pad_id), np.asarray([r["answer"] for r in rows], np.int32))


def choice_arrays(pairs: Sequence[Sequence[tuple[list[int], list[int]]]], pad_id: int):
    """(context, choices, lengths) of `choice_batch` from each row's (context ids,
    continuation ids) pairs, one per choice, all of a row sharing its context."""
    for i, row in enumerate(pairs):
        for j, (context, continuation) in enumerate(row):
            if not context or not continuation:
                raise ValueError(f"choice row {i}, choice {j}: the prompt and the choice must each encode to at "
                                 "least one token")
            if context != row[0][0]:
                raise ValueError(f"choice row {i}, choice {j}: every choice of a row must continue the same context")
    width, most = max(len(b) for row in pairs for _, b in row), max(len(row) for row in pairs)
    context = np.full((len(pairs), max(len(row[0][0]) for row in pairs)), -1, np.int32)
    choices = np.full((len(pairs), most, width), pad_id, np.int32)
    lengths = np.zeros((len(pairs), most), np.int32)
    for i, row in enumerate(pairs):
        context[i, context.shape[1] - len(row[0][0]):] = row[0][0]
        for j, (_, continuation) in enumerate(row):
            choices[i, j, :len(continuation)] = continuation
            lengths[i, j] = len(continuation)
    return context, choices, lengths


def choice_scores(net: llama.Llama):
    """score_fn of `choice_batch`'s batches: 1.0 where the valid choice of the largest
    summed log-likelihood (`choice_logliks`; the first on ties) is the answer."""

    def score_fn(model, batch):
        context, choices, lengths, answer = (jnp.asarray(x) for x in batch)
        loglik = choice_logliks(net, model, context, choices, lengths)
        return (jnp.argmax(loglik, axis=1) == answer).astype(jnp.float32)

    return score_fn


def choice_logliks(net: llama.Llama, model, context, choices, lengths) -> jax.Array:
    """(M, C) float32: each choice's summed token log-probabilities after its row's
    context (`choice_arrays`' layout), -inf for the choices a row does not have.

    One forward pass reads each row's context and keeps its keys and values; a second
    reads every choice of every row at once (M x C rows) on that cache. The context's
    last position gives each choice's first token its log-probability, the choice's
    own positions the rest; the vocabulary projection runs at those positions only.
    The sums are those of the full sequence context + choice read in one pass, in
    another float32 order: ties closer than rounding (~1e-6 of the sums) may break
    the other way.
    """
    (m, p), k = context.shape, choices.shape[2]
    mask = context >= 0
    key_valid = jnp.concatenate([mask, jnp.ones((m, k - 1), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = net.apply(model, jnp.maximum(context, 0), positions, net.empty_cache(m, p + k - 1), 0,
                              key_valid, last=1)
    first = jnp.take_along_axis(jax.nn.log_softmax(logits[:, 0]), choices[:, :, 0], axis=1)  # (M, C)
    loglik = first + _continuations(net, model, cache, choices, lengths, mask.sum(axis=1), key_valid)
    return jnp.where(lengths > 0, loglik, -jnp.inf)


def _continuations(net, model, cache, choices, lengths, context_lengths, key_valid):
    """(M, C): the summed log-probabilities of each choice's tokens after its first,
    the M x C continuations read on the contexts' cache (slots P..P+K-2)."""
    (m, c, k), p = choices.shape, key_valid.shape[1] - choices.shape[2] + 1
    if k == 1:
        return jnp.zeros((m, c), jnp.float32)
    repeat = lambda x: jnp.repeat(x, c, axis=0)
    cache = [tuple(repeat(x) for x in layer) for layer in cache]
    inputs = choices[:, :, :-1].reshape(m * c, k - 1)
    positions = repeat(context_lengths)[:, None] + jnp.arange(k - 1)
    logits, _ = net.apply(model, inputs, positions, cache, p, repeat(key_valid))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), choices[:, :, 1:].reshape(m * c, k - 1, 1), axis=2)
    scored = jnp.arange(1, k) < lengths.reshape(m * c, 1)
    return jnp.where(scored, logp[..., 0], 0.0).sum(axis=1).reshape(m, c)


def nll_batch(tokenizer, rows, template: str, pad_id: int):
    """(tokens (M, T), targets (M, T - 1)): each text's ids (special tokens as the
    tokenizer adds them) right-padded; `targets` marks the predicted tokens."""
    ids = [tokenizer.encode(t).ids for t in texts(rows, template)]
    short = [i for i, x in enumerate(ids) if len(x) < 2]
    if short:
        raise ValueError(f"nll rows {short[:5]} encode to fewer than 2 tokens: nothing to predict")
    width = max(len(x) for x in ids)
    tokens = np.full((len(ids), width), pad_id, np.int32)
    targets = np.zeros((len(ids), width - 1), bool)
    for i, x in enumerate(ids):
        tokens[i, :len(x)] = x
        targets[i, :len(x) - 1] = True
    return tokens, targets


def nll_scores(net: llama.Llama):
    """score_fn of `nll_batch`'s batches: exp(-mean loss over each row's predicted tokens)."""

    def score_fn(model, batch):
        tokens, targets = batch
        loss = llama.token_nll(net, model, tokens, targets).sum(-1) / targets.sum(-1)
        return jnp.clip(jnp.exp(-loss), 0.0, 1.0)

    return score_fn
