import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2n2_jax.tasks.transformer import Transformer, exact_match_scores, greedy_decode, sequence_loss

VOCAB, MAX_LEN, D, HEADS = 11, 9, 16, 2


def np_layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def np_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def np_forward(params, tokens, num_layers):
    """NumPy reference: logits (T, vocab) of one sequence of tokens (T,)."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params["params"])
    t = len(tokens)
    x = p["embed"]["embedding"][tokens] + p["embed_pos"][:t]
    for i in range(num_layers):
        lp = p[f"layer_{i}"]
        qkv = np_dense(np_layer_norm(x, lp["ln_attn"]), lp["attn"]["qkv"]).reshape(t, 3, HEADS, D // HEADS)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(D // HEADS)
        logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        x = x + np_dense(np.einsum("hqk,khd->qhd", w, v).reshape(t, D), lp["attn"]["out"])
        h = np_dense(np_layer_norm(x, lp["ln_mlp"]), lp["mlp_in"])
        gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        x = x + np_dense(gelu, lp["mlp_out"])
    return np_dense(np_layer_norm(x, p["ln_out"]), p["out"])


def random_model(seed, num_layers=2, scale=1.0):
    model = Transformer(VOCAB, MAX_LEN, d_model=D, num_layers=num_layers, num_heads=HEADS)
    params = model.init(jax.random.key(seed), jnp.zeros((1, MAX_LEN), jnp.int32))
    # Larger weights than the init so that greedy outputs vary with the input.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    params = jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return model, params


@pytest.mark.parametrize("num_layers", [1, 2])
def test_forward_matches_numpy(num_layers):
    model, params = random_model(0, num_layers, scale=0.3)
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2], [2, 7, 1, 8, 2, 8, 1]])
    logits, _ = jax.jit(model.apply)(params, tokens)
    for row, out in zip(tokens, np.asarray(logits)):
        np.testing.assert_allclose(out, np_forward(params, row, num_layers), rtol=2e-4, atol=2e-4)


def test_greedy_decode_matches_naive_numpy_loop():
    model, params = random_model(1, scale=0.5)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, VOCAB, size=(6, 5))
    decoded = jax.jit(jax.vmap(lambda q: greedy_decode(model, params, q, 5)))(prompts)
    for prompt, out in zip(prompts, np.asarray(decoded)):
        seq = list(prompt)
        for _ in range(5):  # full recomputation at every step, no cache
            seq.append(int(np.argmax(np_forward(params, np.array(seq), 2)[-1])))
        np.testing.assert_array_equal(out, seq[5:])
    assert len({tuple(r) for r in np.asarray(decoded)}) > 1  # the test would notice a constant decoder


def permutation_model(nxt):
    """A known model: blocks and positions zeroed, one-hot embedding, output layer a
    permutation, so that the token after t is always nxt[t]."""
    model = Transformer(VOCAB, MAX_LEN, d_model=D, num_layers=1, num_heads=HEADS)
    params = jax.tree.map(jnp.zeros_like, model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    p = params["params"]
    p["embed"]["embedding"] = jnp.eye(VOCAB, D)
    p["ln_out"]["scale"] = jnp.ones(D)
    p["out"]["kernel"] = jnp.eye(D, VOCAB)[:, np.argsort(nxt)]  # logit j reads feature argsort(nxt)[j]
    for name in ("ln_attn", "ln_mlp"):
        p["layer_0"][name]["scale"] = jnp.ones(D)
    return model, params


def test_decoder_on_a_known_tiny_model():
    nxt = np.random.default_rng(1).permutation(VOCAB)
    model, params = permutation_model(nxt)
    prompt = jnp.array([5, 0, 2])
    out = np.asarray(jax.jit(lambda q: greedy_decode(model, params, q, 4))(prompt))
    expected, t = [], 2
    for _ in range(4):
        t = nxt[t]
        expected.append(t)
    np.testing.assert_array_equal(out, expected)


def test_exact_match_scores_and_loss():
    model, params = random_model(2, scale=0.5)
    prompts = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, size=(4, 5)))
    decoded = jax.jit(jax.vmap(lambda q: greedy_decode(model, params, q, 3)))(prompts)
    answers = decoded.at[1, 2].set((decoded[1, 2] + 1) % VOCAB).at[3, 0].set((decoded[3, 0] + 1) % VOCAB)
    scores = jax.jit(exact_match_scores(model))(params, (prompts, answers))
    np.testing.assert_array_equal(scores, [1.0, 0.0, 1.0, 0.0])
    # The loss reads prompt + answer[:-1] and scores the answer tokens only.
    logits = np.stack([np_forward(params, np.concatenate([q, a[:-1]]), 2) for q, a in zip(prompts, answers)])[:, 4:]
    logp = (logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True))
    expected = -np.take_along_axis(logp, np.asarray(answers)[..., None], -1).mean()
    np.testing.assert_allclose(sequence_loss(model, params, prompts, answers), expected, rtol=1e-4)


def test_sequences_longer_than_max_len_are_an_error():
    model, params = random_model(3)
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(model, params, jnp.zeros(MAX_LEN - 1, jnp.int32), 3)
    with pytest.raises(ValueError, match="max_len"):
        model.apply(params, jnp.zeros((1, MAX_LEN + 1), jnp.int32))


def np_partial_credit(decoded, answer, pad=0):
    """NumPy reference, a loop over positions: a position where both hold padding is
    skipped, every other one counts, and is right where the tokens agree; nothing
    counted is an exact (empty) answer."""
    right = total = 0
    for x, y in zip(decoded, answer):
        if x == pad and y == pad:
            continue
        total += 1
        right += int(x == y)
    return right / total if total else 1.0


def test_partial_credit_matches_numpy_on_chosen_and_random_cases():
    from m2n2_jax.tasks.transformer import exact_match, partial_credit

    cases = [  # (decoded, answer, credit)
        ([6, 5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1], 1.0),  # exact
        ([0, 0, 0, 0, 0, 0], [6, 5, 4, 3, 2, 1], 0.0),  # empty output
        ([9, 9, 9, 9, 9, 9], [6, 5, 4, 0, 0, 0], 0.0),  # garbage, longer than the answer
        ([6, 5, 4, 3, 1, 2], [6, 5, 4, 3, 2, 1], 4 / 6),
        ([6, 5, 4, 0, 0, 0], [6, 5, 4, 3, 2, 1], 3 / 6),  # too short
        ([6, 5, 4, 3, 7, 0], [6, 5, 4, 3, 0, 0], 4 / 5),  # one extra character
        ([6, 0, 4, 0, 0, 0], [6, 5, 4, 0, 0, 0], 2 / 3),  # a pad inside the output is wrong
        ([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], 1.0),  # both empty: exact
    ]
    decoded, answers, credit = map(np.asarray, zip(*cases))
    got = np.asarray(jax.jit(partial_credit)(jnp.asarray(decoded), jnp.asarray(answers)))
    np.testing.assert_allclose(got, credit, rtol=1e-6)
    rng = np.random.default_rng(0)  # random strings, some agreeing with the answer
    answers = rng.integers(1, 5, (300, 6)) * (np.arange(6) < rng.integers(0, 7, (300, 1)))
    decoded = np.where(rng.random((300, 6)) < 0.6, answers, rng.integers(0, 5, (300, 6)))
    got = np.asarray(partial_credit(jnp.asarray(decoded), jnp.asarray(answers)))
    np.testing.assert_allclose(got, [np_partial_credit(d, a) for d, a in zip(decoded, answers)], rtol=1e-6)
    exact = np.asarray(exact_match(jnp.asarray(decoded), jnp.asarray(answers)))
    assert np.all((got == 1) == (exact == 1)) and 0 < exact.mean() < 1 and np.all((got >= 0) & (got <= 1))


def test_partial_credit_and_mixed_scores_decode_greedily():
    from m2n2_jax.tasks.transformer import mixed_scores, partial_credit_scores, per_skill_batch

    model, params = random_model(2, scale=0.5)
    prompts = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, size=(6, 5)))
    decoded = np.asarray(jax.jit(jax.vmap(lambda q: greedy_decode(model, params, q, 4)))(prompts))
    answers = decoded.copy()
    answers[1, 2] = (answers[1, 2] + 1) % VOCAB  # one token wrong
    answers[3] = (answers[3] + 1) % VOCAB  # all wrong
    answers[4, 1:] = 0  # the answer is the first token (the output may go on)
    expected = [np_partial_credit(d, a) for d, a in zip(decoded, answers)]
    np.testing.assert_allclose(jax.jit(partial_credit_scores(model))(params, (prompts, jnp.asarray(answers))),
                               expected, rtol=1e-6)
    exact = np.all(decoded == answers, axis=1).astype(np.float32)
    data = {"addition": (prompts[:3], answers[:3]), "reversal": (prompts[3:], answers[3:])}
    batch = per_skill_batch(data, {"addition": "exact_match", "reversal": "partial_credit"})
    np.testing.assert_allclose(jax.jit(mixed_scores(model))(params, batch), np.r_[exact[:3], expected[3:]], rtol=1e-6)
    with pytest.raises(ValueError, match="scorer"):
        per_skill_batch(data, {"addition": "exact_match", "reversal": "bleu"})
