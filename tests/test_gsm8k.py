"""GSM8K scoring: the final number of a chain-of-thought generation, matched exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2n2_jax.llm import decode, gguf, gsm8k, hf, llama


def test_gold_and_final_number():
    assert gsm8k.gold("She sold 48/2 = <<48/2=24>>24.\n#### 1,234") == 1234
    assert gsm8k.gold("#### -3") == -3
    assert gsm8k.final_number("48 + 24 = 72 clips. The answer is 72.") == 72.0
    assert gsm8k.final_number("So she earns $1,250.50 in total") == 1250.5
    assert gsm8k.final_number("The answer is 5 and not 6") == 6.0  # the last number, as the paper reads it
    assert gsm8k.final_number("no number here") is None
    with pytest.raises(ValueError):
        gsm8k.gold("#### 3000000000")


@pytest.fixture(scope="module")
def constant_model():
    """A tiny Llama that writes "7" after any prompt: equal embedding rows make the last
    hidden state the same vector h for every input; lm_head's row of "7" is h / |h|^2."""
    tokenizer = hf.load_tokenizer(gguf.smollm2_gguf())
    config = llama.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = llama.Llama(config)
    params = llama.init(model, jax.random.key(0))
    p = params["params"]
    p["embed_tokens"] = jnp.broadcast_to(p["embed_tokens"][:1], p["embed_tokens"].shape)
    p["lm_head"]["weight"] = jnp.zeros_like(p["lm_head"]["weight"]).at[:16].set(jnp.eye(16))
    h = model.apply(params, jnp.zeros((1, 3), jnp.int32))[0][0, -1, :16]
    seven = tokenizer.token_to_id("7")
    p["lm_head"]["weight"] = jnp.zeros_like(p["lm_head"]["weight"]).at[seven].set(10 * h / jnp.dot(h, h))
    return model, params, tokenizer


def test_final_number_scores_inside_jit_and_vmap(constant_model):
    model, params, tokenizer = constant_model
    ids = [tokenizer.encode(gsm8k.chat_prompt(q)).ids for q in ("What is 3 + 4?", "Seven?")]
    tokens, mask = decode.left_pad(ids, pad_id=2)
    out = decode.greedy(model, params, jnp.asarray(tokens), jnp.asarray(mask), 3, [2], 2)
    assert [tokenizer.decode(r) for r in np.asarray(out).tolist()] == ["777", "777"]
    score = jax.jit(gsm8k.final_number_scores(model, tokenizer, 3, [2], 2))
    gold = jnp.asarray([777, 7], jnp.int32)
    np.testing.assert_array_equal(np.asarray(score(params, (tokens, mask, gold))), [1.0, 0.0])
    # vmapped over two models (the runner's runs): same scores
    both = jax.tree.map(lambda x: jnp.stack([x, x]), params)
    batched = jax.jit(jax.vmap(score, in_axes=(0, None)))(both, (tokens, mask, gold))
    np.testing.assert_array_equal(np.asarray(batched), [[1.0, 0.0], [1.0, 0.0]])
