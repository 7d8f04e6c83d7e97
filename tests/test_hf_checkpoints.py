"""Hugging Face checkpoint folders in and out: a saved merge is a complete model.

The fixtures (tests/fixtures/llama/, written by transformers 4.57.6) of today's Llama
family hold a tokenizer, generation_config.json with eos [40, 41], bos 39 and an
unknown key in config.json: a save must carry all of it through unchanged. That
transformers itself loads such a folder is checked outside pytest
(tests/fixtures/check_saved_with_transformers.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from m2n2_jax import safetensors_io
from m2n2_jax.llm import hf, llama

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "llama")
TOKENIZED = ["llama3_rope", "linear_rope", "llama_bias", "qwen2_tied", "mistral"]
COPIED = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
          "generation_config.json"]


def read_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


def read_bytes(*path):
    with open(os.path.join(*path), "rb") as f:
        return f.read()


def assert_same_model(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def scaled(model, factor):
    return jax.tree.map(lambda x: (x * factor).astype(x.dtype), model)


@pytest.mark.parametrize("case", TOKENIZED)
def test_save_next_to_a_source_is_a_complete_checkpoint(case, tmp_path):
    source = os.path.join(HERE, case)
    config, model = hf.load_hf(source)
    hf.save_hf(config, model, str(tmp_path), source=source, card="# A merge\n\nof two seeds.\n")
    for name in COPIED:
        assert read_bytes(tmp_path, name) == read_bytes(source, name), name
    assert read_json(tmp_path, "config.json") == read_json(source, "config.json")
    with open(tmp_path / "README.md") as f:
        assert f.read() == "# A merge\n\nof two seeds.\n"
    config2, model2 = hf.load_hf(str(tmp_path))
    assert config2 == config
    assert_same_model(model2, model)
    assert hf.load_tokenizer(str(tmp_path)).encode("w1 w2 </s>").ids == [1, 2, 40]


@pytest.mark.parametrize("case", TOKENIZED + ["gqa_untied", "sharded"])
def test_load_save_round_trip_keeps_config_json(case, tmp_path):
    """No source: the config.json written is the one read, key for key (eos [40, 41]
    and bos 39 stay, not Llama's defaults 2 and 1; dtype and unknown keys stay)."""
    config, model = hf.load_hf(os.path.join(HERE, case))
    hf.save_hf(config, model, str(tmp_path))
    written = read_json(tmp_path, "config.json")
    assert written == read_json(HERE, case, "config.json")
    if case in TOKENIZED:
        assert (written["eos_token_id"], written["bos_token_id"]) == ([40, 41], 39)


def test_source_keys_kept_and_model_fields_written(tmp_path):
    """A config built in Python, saved next to a source: what the model defines comes
    from the model (here another rope_theta), everything else from the source."""
    source = os.path.join(HERE, "llama3_rope")
    config, model = hf.load_hf(source)
    changed = dataclasses.replace(config, hf_dict=None, rope_theta=250000.0)
    hf.save_hf(changed, model, str(tmp_path), source=source)
    written, original = read_json(tmp_path, "config.json"), read_json(source, "config.json")
    assert written == {**original, "rope_theta": 250000.0}
    assert hf.load_hf(str(tmp_path))[0] == changed


def test_dtype_in_config_is_the_dtype_written(tmp_path):
    source = os.path.join(HERE, "qwen2_tied")
    config, model = hf.load_hf(source, dtype=ml_dtypes.bfloat16)
    hf.save_hf(config, model, str(tmp_path), source=source)
    written = read_json(tmp_path, "config.json")
    assert written["dtype"] == "bfloat16"
    assert written == {**read_json(source, "config.json"), "dtype": "bfloat16"}
    assert {x.dtype for x in safetensors_io.load_flat(str(tmp_path)).values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert_same_model(hf.load_hf(str(tmp_path))[1], model)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_a_config_built_in_python_saves_and_loads(model_type, tmp_path):
    """No dict to start from: config.json holds what the model defines, torch_dtype
    included, and loads back as the same config."""
    config = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8, model_type=model_type,
                               mlp_bias=model_type == "llama",
                               rope_scaling=llama.RopeScaling("linear", 2.0) if model_type == "mistral" else None)
    model = llama.init(llama.Llama(config), jax.random.key(0))
    model = jax.tree.map(np.asarray, model)
    hf.save_hf(config, model, str(tmp_path))
    written = read_json(tmp_path, "config.json")
    assert written["model_type"] == model_type and written["torch_dtype"] == "float32"
    config2, model2 = hf.load_hf(str(tmp_path))
    assert config2 == config
    assert_same_model(model2, model)


def test_saving_into_a_used_folder_replaces_the_checkpoint(tmp_path):
    """Sharded, then one file, then sharded again into one folder: each save is what
    loads; the stale shards, index, single file and pickle go; other files stay."""
    config, model = hf.load_hf(os.path.join(HERE, "gqa_untied"))
    out = str(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "pytorch_model.bin").write_bytes(b"stale pickle")
    hf.save_hf(config, model, out, 20_000)
    assert os.path.isfile(os.path.join(out, safetensors_io.INDEX))
    other = scaled(model, 0.5)
    hf.save_hf(config, other, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "notes.txt"]
    assert_same_model(hf.load_hf(out)[1], other)
    hf.save_hf(config, model, out, 20_000)
    assert not os.path.exists(os.path.join(out, safetensors_io.SINGLE))
    assert_same_model(hf.load_hf(out)[1], model)


def test_a_folder_with_an_index_and_a_single_file_is_refused(tmp_path):
    shutil.copytree(os.path.join(HERE, "sharded"), tmp_path / "both")
    shutil.copy(os.path.join(HERE, "mha_tied", "model.safetensors"), tmp_path / "both")
    with pytest.raises(ValueError, match="model.safetensors.index.json and model.safetensors"):
        hf.load_hf(str(tmp_path / "both"))


@pytest.mark.parametrize("pickle", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin"])
def test_a_pytorch_checkpoint_is_refused_with_the_conversion(pickle, tmp_path):
    shutil.copy(os.path.join(HERE, "gqa_untied", "config.json"), tmp_path)
    (tmp_path / pickle).write_bytes(b"not read")
    with pytest.raises(ValueError, match=rf"{pickle}.*save_pretrained\('{tmp_path}', safe_serialization=True\)"):
        hf.load_hf(str(tmp_path))


def test_load_tokenizer_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tokenizer.json in {tmp_path}"):
        hf.load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gone.json")):
        hf.load_tokenizer(str(tmp_path / "gone.json"))


def test_a_source_without_config_json_is_refused(tmp_path):
    config, model = hf.load_hf(os.path.join(HERE, "mha_tied"))
    with pytest.raises(FileNotFoundError, match=f"source {tmp_path}"):
        hf.save_hf(config, model, str(tmp_path / "out"), source=str(tmp_path))


def test_saving_over_its_own_source(tmp_path):
    shutil.copytree(os.path.join(HERE, "llama_bias"), tmp_path / "m")
    folder = str(tmp_path / "m")
    config, model = hf.load_hf(folder)
    before = {name: read_bytes(folder, name) for name in COPIED + ["config.json"]}
    hf.save_hf(config, scaled(model, 2.0), folder, source=folder)
    assert {name: read_bytes(folder, name) for name in before} == before
    assert_same_model(hf.load_hf(folder)[1], scaled(model, 2.0))
