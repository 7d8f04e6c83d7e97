"""Hugging Face Llama checkpoint folders: config.json, safetensors, tokenizer.json.

- `load_hf(path)`: a checkpoint directory (config.json and `model.safetensors`, or
  shards listed in `model.safetensors.index.json`), tensor names as
  `LlamaForCausalLM` writes them; `save_hf` writes one back.
- `load_tokenizer(path)`: a `tokenizers.Tokenizer` from a checkpoint's tokenizer.json,
  or from a GGUF file (`gguf.gguf_tokenizer`).

Parameters come back as {"params": ...} of `llama.Llama` holding host NumPy arrays,
in the checkpoint's dtype (`dtype=` converts).
"""

from __future__ import annotations

import json
import os

import numpy as np

from m2n2_jax import safetensors_io
from m2n2_jax.llm.llama import LlamaConfig

# Hugging Face name (after "model.layers.{i}.") -> our path inside a layer.
LAYER_TENSORS = {
    "input_layernorm.weight": ("input_layernorm", "weight"),
    "post_attention_layernorm.weight": ("post_attention_layernorm", "weight"),
    "self_attn.q_proj.weight": ("self_attn", "q_proj", "weight"),
    "self_attn.k_proj.weight": ("self_attn", "k_proj", "weight"),
    "self_attn.v_proj.weight": ("self_attn", "v_proj", "weight"),
    "self_attn.o_proj.weight": ("self_attn", "o_proj", "weight"),
    "mlp.gate_proj.weight": ("mlp", "gate_proj", "weight"),
    "mlp.up_proj.weight": ("mlp", "up_proj", "weight"),
    "mlp.down_proj.weight": ("mlp", "down_proj", "weight"),
}
def expected_shapes(config: LlamaConfig) -> dict[str, tuple]:
    """{Hugging Face tensor name: shape} of every weight of `config`."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = {"input_layernorm.weight": (c.hidden_size,), "post_attention_layernorm.weight": (c.hidden_size,),
             "self_attn.q_proj.weight": (q, c.hidden_size), "self_attn.k_proj.weight": (kv, c.hidden_size),
             "self_attn.v_proj.weight": (kv, c.hidden_size), "self_attn.o_proj.weight": (c.hidden_size, q),
             "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
             "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
             "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size)}
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    for i in range(c.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
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
        for name, path in LAYER_TENSORS.items():
            node = model[layer]
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = cast(tensors[f"model.layers.{i}.{name}"])
    return {"params": model}


def to_hf_tensors(config: LlamaConfig, model) -> dict[str, np.ndarray]:
    """{Hugging Face name: host array} of `llama.Llama` parameters ({"params": ...})."""
    p = model["params"]
    tensors = {"model.embed_tokens.weight": p["embed_tokens"], "model.norm.weight": p["norm"]["weight"]}
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = p["lm_head"]["weight"]
    for i, layer in enumerate(config.layer_names):
        for name, path in LAYER_TENSORS.items():
            node = p[layer]
            for key in path:
                node = node[key]
            tensors[f"model.layers.{i}.{name}"] = node
    return {name: np.asarray(x) for name, x in tensors.items()}


def load_hf(path: str, dtype=None) -> tuple[LlamaConfig, dict]:
    """(config, model) of a Hugging Face Llama checkpoint directory (config.json and
    one safetensors file or an index of shards)."""
    config = LlamaConfig.from_json(path)
    return config, from_hf_tensors(config, safetensors_io.load_flat(path), dtype)


def save_hf(config: LlamaConfig, model, path: str, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write a Hugging Face checkpoint directory: config.json and safetensors (sharded
    above `max_shard_bytes`), readable by `load_hf` and by transformers."""
    if not isinstance(config, LlamaConfig) or not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"save_hf(config, model, path): got a {type(config).__name__} for config and a "
                         f"{type(path).__name__} for path")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf(), f, indent=1)
    safetensors_io.save_flat(to_hf_tensors(config, model), path, max_shard_bytes, metadata={"format": "pt"})


def load_tokenizer(path: str):
    """A `tokenizers.Tokenizer`: from a GGUF file (`gguf_tokenizer`), a tokenizer.json,
    or a checkpoint directory holding one."""
    from tokenizers import Tokenizer

    if path.endswith(".gguf"):
        from m2n2_jax.llm.gguf import gguf_tokenizer

        return gguf_tokenizer(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path)
