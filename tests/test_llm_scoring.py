"""Scoring a language model without decoding (m2n2_jax.llm.decode, m2n2_jax.llm.scores)
against NumPy references and against the greedy decoder.

The model is tests/fixtures/llama/gqa_untied (a tiny random Llama that transformers
wrote, vocabulary 97, untied lm_head; test_llama.py checks its logits against
transformers'). The references read each row alone and unpadded through the model's
plain forward pass (no cache, every position's logits), then take argmax and
log-softmax in NumPy: greedy generation token by token, exact match of the generation
against the answer, each choice's summed log-probability.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m2n2_jax as mj
from m2n2_jax.llm import decode, hf, llama, scores

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "llama", "gqa_untied")
CONFIG, MODEL = hf.load_hf(FIXTURE)
NET = llama.Llama(CONFIG)
V = CONFIG.vocab_size
WIDTH = 48  # the reference's forward pass reads right-padded rows of this many tokens
PAD = 0
FORWARD = jax.jit(lambda model, ids: NET.apply(model, ids)[0])


def np_logits(model, ids) -> np.ndarray:
    """(len(ids), V) float32 logits of one unpadded row (read from a right-padded one:
    the model is causal)."""
    row = np.zeros((1, WIDTH), np.int32)
    row[0, :len(ids)] = ids
    return np.asarray(FORWARD(model, row))[0, :len(ids)]


def np_greedy(model, prompt, steps: int, stops=()) -> list[int]:
    """Greedy tokens after `prompt`, up to `steps`, the first stop token included."""
    out = []
    while len(out) < steps and not (out and out[-1] in stops):
        out.append(int(np.argmax(np_logits(model, list(prompt) + out)[-1])))
    return out


def np_exact_match(model, prompt, answer, stops, width: int) -> float:
    """1.0 where greedy generation of `width` tokens (padding after a stop) is the
    answer padded to `width`, as `answer_batch` lays it out."""
    generated = np_greedy(model, prompt, width, stops)
    padded = lambda x: list(x) + [PAD] * (width - len(x))
    return float(padded(generated) == padded(answer))


def top2_gap(model, prompt, answer) -> float:
    """The smallest gap between the two largest logits at the answer's positions."""
    z = np.sort(np_logits(model, list(prompt) + list(answer[:-1]))[len(prompt) - 1:], axis=-1)
    return float((z[:, -1] - z[:, -2]).min())


def questions(model, count: int, seed: int):
    """(prompts, answers, stops): `count` prompts sharing a 6-token prefix (a chat
    template's part), then 1..12 tokens of their own; the 4 tokens the model
    generates most as stop tokens; and answers of every kind the
    exact match must tell apart: the greedy generation up to its stop token (1.0),
    with one token changed, cut before the stop, run past it, holding a stop token in
    its middle, and whole generations of the longest width without a stop."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, V, 6).tolist()
    prompts = [prefix + rng.integers(3, V, rng.integers(1, 13)).tolist() for _ in range(count)]
    generated = [np_greedy(model, p, 8) for p in prompts]
    stops = tuple(np.argsort(-np.bincount([t for g in generated for t in g[1:]], minlength=V))[:4].tolist())
    stop = stops[0]
    answers = []
    for i, g in enumerate(generated):
        kind = i % 6
        ends = [j for j, t in enumerate(g) if t in stops]
        whole = g[:ends[0] + 1] if ends else g[:3] + [stop]
        if kind == 1:
            j = int(rng.integers(len(whole)))
            whole = whole[:j] + [(whole[j] + 1 + int(rng.integers(V - 1))) % V] + whole[j + 1:]
        elif kind == 2:
            whole = whole[:-1] or [stop, stop]
        elif kind == 3:
            whole = whole + [int(rng.integers(3, V))]
        elif kind == 4:
            whole = [stop] + whole
        elif kind == 5 and not ends:
            whole = g
        answers.append(whole)
    return prompts, answers, stops


def forced(model, prompts, answers, stops, **options) -> np.ndarray:
    batch = decode.forced_batch(prompts, answers, stops, PAD)
    return np.asarray(jax.jit(decode.forced_exact_match_scores(NET, **options))(model, batch))


def greedy(model, prompts, answers, stops) -> np.ndarray:
    batch = decode.answer_batch(prompts, answers, PAD)
    return np.asarray(jax.jit(decode.exact_match_scores(NET, stops, PAD))(model, batch))


@pytest.fixture(scope="module")
def cases():
    prompts, answers, stops = questions(MODEL, 60, seed=0)
    width = max(len(a) for a in answers)
    reference = np.asarray([np_exact_match(MODEL, p, a, stops, width) for p, a in zip(prompts, answers)])
    return prompts, answers, stops, reference


def test_forced_exact_match_equals_numpy_greedy_and_the_decoder(cases):
    prompts, answers, stops, reference = cases
    assert 0.2 < reference.mean() < 0.8  # both outcomes, many times
    assert min(top2_gap(MODEL, p, a) for p, a in zip(prompts, answers)) > 1e-3  # no near-tie: all must agree
    np.testing.assert_array_equal(forced(MODEL, prompts, answers, stops), reference)
    np.testing.assert_array_equal(greedy(MODEL, prompts, answers, stops), reference)


def test_every_group_size_and_width_gives_the_same_scores(cases):
    """Groups of 1, 7 and all rows, at 1, 3 or one width per length: a group at a width
    that cut one of its real tokens, or scored one position off, would differ."""
    prompts, answers, stops, reference = cases
    batch = decode.forced_batch(prompts, answers, stops, PAD)
    lengths, width = batch[2], batch[1].shape[1]
    assert len(set(lengths.tolist())) >= 8 and 0 < batch[0].shape[1] == 6  # the prefix was found
    for group_size, buckets in [(1, width), (7, 3), (None, 1), (16, width)]:
        got = forced(MODEL, prompts, answers, stops, group_size=group_size, buckets=buckets)
        np.testing.assert_array_equal(got, reference, err_msg=f"group_size={group_size}, buckets={buckets}")


def test_forced_batch_lays_out_the_rows_greedy_decoding_must_produce():
    """Targets are right-aligned; cut after the first stop; a stop followed by more
    than padding can never be generated (NEVER); an answer without a stop is checked
    over the whole width; the prefix leaves each prompt a token of its own."""
    prompts = [[5, 6, 7, 8], [5, 6, 7], [5, 6, 7, 9, 9]]
    answers = [[10, 2], [2, 11, 2], [12, 13, 14]]
    prefix, tokens, lengths, targets = decode.forced_batch(prompts, answers, [2], PAD)
    np.testing.assert_array_equal(prefix, [[5, 6]] * 3)
    np.testing.assert_array_equal(targets, [[-1, 10, 2], [-2, -2, -2], [12, 13, 14]])
    np.testing.assert_array_equal(lengths, [3, 3, 5])
    np.testing.assert_array_equal(tokens, [[0, 0, 7, 8, 10], [0, 0, 7, 0, 0], [7, 9, 9, 12, 13]])
    # a stop then padding only is what greedy emits: possible (the pad id is 2 here)
    _, _, _, targets = decode.forced_batch([[5, 6]], [[10, 2, 2]], [2], 2)
    np.testing.assert_array_equal(targets, [[-1, 10, 2]])
    np.testing.assert_array_equal(decode.forced_batch([[1, 2], [3]], [[4], [5]], [9], PAD)[0].shape, (2, 0))


def test_near_ties_differ_only_within_float_rounding():
    """lm_head row u made a copy of row t plus noise of ~1e-7 of its size: wherever t
    is the argmax, u is within float32 rounding of it. The forced pass and the decoder
    compute the logits in different orders, so they may break such a near-tie apart;
    a row where they differ must hold one (a top-two gap below 1e-5), and no other.
    An exact copy (a tie) goes to the lower index in both."""
    prompts, answers, stops = questions(MODEL, 60, seed=1)
    width = max(len(a) for a in answers)
    head = np.asarray(MODEL["params"]["lm_head"]["weight"]).copy()
    t = int(np.bincount([a for answer in answers for a in answer], minlength=V).argmax())
    u = (t + 1) % V
    noise = np.random.default_rng(2).standard_normal(head.shape[1]).astype(np.float32)
    for scale, exact in [(1e-7, False), (0.0, True)]:
        head[u] = head[t] + scale * np.abs(head[t]).max() * noise
        model = jax.tree.map(lambda x: x, MODEL)
        model["params"]["lm_head"]["weight"] = jnp.asarray(head)
        gaps = np.asarray([top2_gap(model, p, a) for p, a in zip(prompts, answers)])
        assert (gaps < 1e-5).sum() >= 10  # near-ties (or ties) at many answer positions
        got, ref = forced(model, prompts, answers, stops), greedy(model, prompts, answers, stops)
        differ = got != ref
        assert np.all(gaps[differ] < 1e-5), gaps[differ]
        if exact:
            reference = [np_exact_match(model, p, a, stops, width) for p, a in zip(prompts, answers)]
            np.testing.assert_array_equal(got, reference)
            np.testing.assert_array_equal(ref, reference)


def test_forced_scores_inside_run_vmap_and_chunks(cases):
    """The scorer under vmap (run's children), in chunks of 7 rows (padded at the end,
    as `mj.evaluate` pads them) and with every row its own: the same scores."""
    prompts, answers, stops, reference = cases
    batch = decode.forced_batch(prompts, answers, stops, PAD)
    score_fn = decode.forced_exact_match_scores(NET)
    chunked = jax.jit(lambda m, b: mj.evaluate(score_fn, m, b, 7))(MODEL, batch)
    np.testing.assert_array_equal(np.asarray(chunked), reference)
    two = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), MODEL)
    stacked = jax.jit(jax.vmap(score_fn, in_axes=(0, None)))(two, batch)
    np.testing.assert_array_equal(np.asarray(stacked[0]), reference)
    doubled = jax.tree.map(lambda x: 2 * x, MODEL)
    np.testing.assert_array_equal(np.asarray(stacked[1]), forced(doubled, prompts, answers, stops))


# --- multiple choice -----------------------------------------------------------------


def np_logliks(model, context, continuations) -> list[float]:
    """Each continuation's summed log-probability after the context (log-softmax in
    NumPy, float64)."""
    sums = []
    for continuation in continuations:
        ids = list(context) + list(continuation)
        z = np_logits(model, ids).astype(np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        sums.append(sum(logp[i - 1, ids[i]] for i in range(len(context), len(ids))))
    return sums


def one_pass_choice(model, pairs, answers) -> np.ndarray:
    """The earlier scorer: each context + continuation right-padded, one pass each,
    `token_nll` over every position."""
    width, most = max(len(a) + len(b) for row in pairs for a, b in row), max(len(row) for row in pairs)
    tokens = np.full((len(pairs), most, width), PAD, np.int32)
    targets = np.zeros((len(pairs), most, width - 1), bool)
    for i, row in enumerate(pairs):
        for j, (a, b) in enumerate(row):
            tokens[i, j, :len(a) + len(b)] = a + b
            targets[i, j, len(a) - 1:len(a) + len(b) - 1] = True
    nll = llama.token_nll(NET, model, tokens.reshape(-1, width), targets.reshape(-1, width - 1))
    loglik = -np.asarray(nll).sum(-1).reshape(len(pairs), most)
    loglik[np.asarray([[j >= len(row) for j in range(most)] for row in pairs])] = -np.inf
    return (loglik.argmax(1) == np.asarray(answers)).astype(np.float32)


def test_choice_scores_equal_numpy_log_softmax_and_the_one_pass_scorer():
    """Contexts of 1..10 tokens, 2..4 choices of 1..4 tokens (half the rows' choices
    sharing their first token, where only the later positions decide): every sum of
    log-probabilities as NumPy's, and the scores, with the answer the reference's pick
    in most rows and another choice in the rest."""
    rng = np.random.default_rng(3)
    pairs = []
    for i in range(24):
        context = rng.integers(3, V, rng.integers(1, 11)).tolist()
        first = int(rng.integers(3, V))
        pairs.append([(context, [first] * (i % 2) + rng.integers(3, V, rng.integers(1, 4)).tolist())
                      for _ in range(2 + i % 3)])
    sums = [np_logliks(MODEL, row[0][0], [b for _, b in row]) for row in pairs]
    arrays = scores.choice_arrays(pairs, PAD)
    got = np.asarray(jax.jit(lambda m, a: scores.choice_logliks(NET, m, *a))(MODEL, arrays))
    for row, expected in zip(got, sums):
        np.testing.assert_allclose(row[:len(expected)], expected, rtol=1e-5)
        assert np.all(row[len(expected):] == -np.inf)
    answers = [int(np.argmax(s)) if i % 4 else (int(np.argmax(s)) + 1) % len(s) for i, s in enumerate(sums)]
    reference = np.asarray([float(np.argmax(s) == a) for s, a in zip(sums, answers)])
    batch = (*arrays, np.asarray(answers, np.int32))
    np.testing.assert_array_equal(np.asarray(jax.jit(scores.choice_scores(NET))(MODEL, batch)), reference)
    np.testing.assert_array_equal(one_pass_choice(MODEL, pairs, answers), reference)
