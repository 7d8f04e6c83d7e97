"""Hugging Face checkpoint folders of the Llama family: config.json, safetensors, tokenizer.

- `load_hf(path)`: a checkpoint directory (config.json and `model.safetensors`, or
  shards listed in `model.safetensors.index.json`), tensor names as
  `LlamaForCausalLM` (`Qwen2ForCausalLM`, `MistralForCausalLM`) writes them. A folder
  of pickled PyTorch weights (`pytorch_model.bin`) is refused with the one-line
  conversion to safetensors.
- `save_hf(config, model, path, source=, card=)`: a folder that transformers'
  `AutoModelForCausalLM` and `AutoTokenizer` load. Its config.json is the one the
  config was read from (or `source`'s) with only the fields the model defines
  updated, so eos/bos lists, dtype and unknown keys come through; with `source` (a
  seed's folder; the documented choice is the first seed) the tokenizer files and
  generation_config.json are copied byte for byte; `card` becomes README.md.
- `load_tokenizer(path)`: a `tokenizers.Tokenizer` from a checkpoint's tokenizer.json,
  or from a GGUF file (`gguf.gguf_tokenizer`).

Parameters come back as {"params": ...} of `llama.Llama` holding host NumPy arrays,
in the checkpoint's dtype (`dtype=` converts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import numpy as np

from m2n2_jax import safetensors_io
from m2n2_jax.llm.llama import LlamaConfig

# What a saved model takes from its source folder, byte for byte, where it exists.
SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                "chat_template.json", "generation_config.json")
PICKLED = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?")


def layer_shapes(config: LlamaConfig) -> dict[str, tuple]:
    """{Hugging Face name after "model.layers.{i}.": shape} of one layer's tensors;
    the name split on "." is the tensor's path in our layer."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"input_layernorm.weight": (c.hidden_size,), "post_attention_layernorm.weight": (c.hidden_size,)}
    for proj, out, bias in [("q_proj", q, c.qkv_bias), ("k_proj", kv, c.qkv_bias), ("v_proj", kv, c.qkv_bias),
                            ("o_proj", c.hidden_size, c.attention_bias)]:
        shapes[f"self_attn.{proj}.weight"] = (out, q if proj == "o_proj" else c.hidden_size)
        if bias:
            shapes[f"self_attn.{proj}.bias"] = (out,)
    for proj, out, inp in [("gate_proj", c.intermediate_size, c.hidden_size),
                           ("up_proj", c.intermediate_size, c.hidden_size),
                           ("down_proj", c.hidden_size, c.intermediate_size)]:
        shapes[f"mlp.{proj}.weight"] = (out, inp)
        if c.mlp_bias:
            shapes[f"mlp.{proj}.bias"] = (out,)
    return shapes


def expected_shapes(config: LlamaConfig) -> dict[str, tuple]:
    """{Hugging Face tensor name: shape} of every weight (and bias) of `config`."""
    c = config
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    for i in range(c.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer_shapes(c).items()})
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


def from_hf_tensors(config: LlamaConfig, tensors: dict, dtype=None) -> dict:
    """{"params": ...} of `llama.Llama` from {Hugging Face name: array}.

    Every weight of `config` must be there with its shape. Rotary caches
    (`rotary_emb.inv_freq`) and, with tied embeddings, a stored `lm_head.weight` are
    ignored; any other name is refused.
    """
    shapes = expected_shapes(config)
    ignored = {n for n in tensors if n.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")
    missing = sorted(set(shapes) - set(tensors))
    unknown = sorted(set(tensors) - set(shapes) - ignored)
    if missing or unknown:
        raise ValueError(f"checkpoint does not match its config: missing {missing[:4]}{'...' * (len(missing) > 4)}, "
                         f"unexpected {unknown[:4]}{'...' * (len(unknown) > 4)}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"tensor {name}: shape {tuple(tensors[name].shape)}, config says {shape}")
    cast = (lambda x: x) if dtype is None else (lambda x: np.asarray(x).astype(dtype))
    model = {"embed_tokens": cast(tensors["model.embed_tokens.weight"]),
              "norm": {"weight": cast(tensors["model.norm.weight"])}}
    if not config.tie_word_embeddings:
        model["lm_head"] = {"weight": cast(tensors["lm_head.weight"])}
    for i, layer in enumerate(config.layer_names):
        model[layer] = {}
        for name in layer_shapes(config):
            *path, leaf = name.split(".")
            node = model[layer]
            for key in path:
                node = node.setdefault(key, {})
            node[leaf] = cast(tensors[f"model.layers.{i}.{name}"])
    return {"params": model}


def to_hf_tensors(config: LlamaConfig, model) -> dict[str, np.ndarray]:
    """{Hugging Face name: host array} of `llama.Llama` parameters ({"params": ...})."""
    p = model["params"]
    tensors = {"model.embed_tokens.weight": p["embed_tokens"], "model.norm.weight": p["norm"]["weight"]}
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = p["lm_head"]["weight"]
    for i, layer in enumerate(config.layer_names):
        for name in layer_shapes(config):
            node = p[layer]
            for key in name.split("."):
                node = node[key]
            tensors[f"model.layers.{i}.{name}"] = node
    return {name: np.asarray(x) for name, x in tensors.items()}


def load_hf(path: str, dtype=None) -> tuple[LlamaConfig, dict]:
    """(config, model) of a Hugging Face checkpoint directory (config.json and one
    safetensors file or an index of shards); the config keeps config.json's dict."""
    _refuse_pickled(path)
    config = LlamaConfig.from_json(path)
    return config, from_hf_tensors(config, safetensors_io.load_flat(path), dtype)


def _refuse_pickled(path: str) -> None:
    """Refuse a folder whose weights are pickled PyTorch files only, with the fix."""
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    pickled = [n for n in names if PICKLED.fullmatch(n)]
    if pickled and not any(n.endswith(".safetensors") for n in names):
        raise ValueError(f"{path} holds {pickled[0]} (pickled PyTorch weights) and no .safetensors; convert it "
                         "once with transformers: python -c \"from transformers import AutoModelForCausalLM as M; "
                         f"M.from_pretrained('{path}', torch_dtype='auto').save_pretrained('{path}', "
                         "safe_serialization=True)\"")


def save_hf(config: LlamaConfig, model, path: str, max_shard_bytes: int = 5 * 2**30, source: str | None = None,
            card: str | None = None) -> None:
    """Write a Hugging Face checkpoint directory readable by `load_hf` and transformers.

    Writes safetensors in the model's dtype (sharded above `max_shard_bytes`) and
    config.json: `source`'s config.json (default: the dict `config` was read from)
    with the fields the model defines updated and torch_dtype / dtype set to what is
    written. With `source` (a seed's checkpoint folder) its tokenizer files and
    generation_config.json are copied (`SOURCE_FILES`, those it has); with `card`,
    README.md holds that text. The checkpoint files of an earlier save into `path`
    (safetensors, index, pytorch_model*.bin) are replaced whole; other files stay.
    """
    if not isinstance(config, LlamaConfig) or not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"save_hf(config, model, path): got a {type(config).__name__} for config and a "
                         f"{type(path).__name__} for path")
    path = os.fspath(path)
    tensors = to_hf_tensors(config, model)
    fields = _config_json(config, tensors, config.hf_dict if source is None else _source_config(source))
    os.makedirs(path, exist_ok=True)
    safetensors_io.save_flat(tensors, path, max_shard_bytes, metadata={"format": "pt"})
    for name in os.listdir(path):
        if PICKLED.fullmatch(name):
            os.remove(os.path.join(path, name))
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(json.dumps(fields, indent=2, sort_keys=True) + "\n")  # as transformers writes it
    for name in SOURCE_FILES if source is not None else ():
        _copy(os.path.join(source, name), os.path.join(path, name))
    if card is not None:
        with open(os.path.join(path, "README.md"), "w") as f:
            f.write(card)


def _config_json(config: LlamaConfig, tensors: dict, base: dict | None) -> dict:
    """The config.json dict of `config` written with `tensors`: `base` with the fields
    the model defines updated (`LlamaConfig.to_hf`), and torch_dtype (or dtype, the
    key(s) `base` uses) the dtype of the embeddings, which a saved model shares."""
    fields = dataclasses.replace(config, hf_dict=base).to_hf()
    for key in [k for k in ("torch_dtype", "dtype") if k in fields] or ["torch_dtype"]:
        fields[key] = tensors["model.embed_tokens.weight"].dtype.name
    return fields


def _source_config(source: str) -> dict:
    file = os.path.join(source, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"source {source}: no config.json there (source is a seed's checkpoint folder, "
                                "whose config and tokenizer the saved model takes)")
    with open(file) as f:
        return json.load(f)


def _copy(src: str, dst: str) -> None:
    """Copy src to dst byte for byte where src exists and is not dst itself."""
    if os.path.isfile(src) and not (os.path.exists(dst) and os.path.samefile(src, dst)):
        shutil.copyfile(src, dst)


def load_tokenizer(path: str):
    """A `tokenizers.Tokenizer`: from a GGUF file (`gguf_tokenizer`), a tokenizer.json,
    or a checkpoint directory holding one."""
    from tokenizers import Tokenizer

    if path.endswith(".gguf"):
        from m2n2_jax.llm.gguf import gguf_tokenizer

        return gguf_tokenizer(path)
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer file at {path}")
        return Tokenizer.from_file(path)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path} (a folder with a sentencepiece tokenizer.model only: "
                                "transformers' AutoTokenizer.from_pretrained(p).save_pretrained(p) writes one)")
    return Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
