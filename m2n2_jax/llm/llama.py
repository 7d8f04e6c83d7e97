"""A Llama-family decoder in flax, laid out as Hugging Face's `LlamaForCausalLM`.

RMSNorm, rotary position embeddings with any base (`rope_theta`) and rope_scaling of
type `llama3` (Llama-3.1 to 3.3) or `linear`, grouped-query attention (`num_kv_heads`
<= `num_heads`), a SwiGLU MLP, tied or untied output embeddings, optional biases
(Llama's `attention_bias` and `mlp_bias`). `model_type` "qwen2" (q/k/v biases, no
o_proj bias) and "mistral" are the same network. A sliding window (Mistral, Qwen2's
`use_sliding_window`) is not implemented: a model that has one runs sequences no
longer than the window, where every key is inside it, and refuses longer ones by
name. Weights keep Hugging Face's shapes, (out, in) for every projection, with each
`bias` next to its `weight`, so a checkpoint loads without transposes (`hf`) and the
default rule of the model axis (`mj.model_specs`) splits each projection over its
outputs.

Layers are named `layers_00`, `layers_01`, ... (zero-padded to the number of layers),
so `jax.tree.leaves` walks them in depth order, and the flat parameter vector that
M2N2's split point cuts runs from the embeddings to the last layer (then `lm_head`,
`norm`).

One code path serves scoring and decoding: `__call__(tokens, positions, cache, index,
key_valid, last)` writes the keys and values of `tokens` into `cache` at slots index..
and attends to the valid slots up to each query's own; a full forward pass is the call
without a cache. Left-padded batches give each row its own positions and mark the
padding invalid (`decode`). `last` projects only the last positions onto the
vocabulary: a scorer pays for the logits it reads, not for every prompt position.

`Llama(config, fused=True)` reads q/k/v and gate/up as one matrix each (`fuse`): one
matmul instead of three and two, which pays where the rows are few (batched decoding).
The stored model keeps Hugging Face's per-projection leaves (M2N2 merges those);
`fuse` concatenates them once per traced call, outside any decoding loop.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Cache = list  # [(keys (B, num_kv_heads, head_dim, T), values (B, num_kv_heads, T, head_dim))] per layer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A config's `rope_scaling`: "linear" divides every rotary frequency by `factor`;
    "llama3" divides the slow ones (wavelength above original / low_freq_factor) by
    it, keeps the fast ones (below original / high_freq_factor) and interpolates in
    between (`inv_frequencies`)."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(f"rope_scaling type {self.rope_type!r} is not implemented (only 'llama3' and 'linear')")
        missing = [k for k in LLAMA3_KEYS if getattr(self, k) is None] if self.rope_type == "llama3" else []
        if missing:
            raise ValueError(f"rope_scaling of type 'llama3' needs {missing}")

    @classmethod
    def from_hf(cls, hf: dict | None) -> RopeScaling | None:
        """From config.json's `rope_scaling` (None or type "default": no scaling)."""
        rope_type = (hf or {}).get("rope_type", (hf or {}).get("type", "default"))
        if rope_type == "default":
            return None
        keys = LLAMA3_KEYS if rope_type == "llama3" else ("factor",)
        missing = [k for k in keys if k not in hf]
        if missing:
            raise ValueError(f"rope_scaling of type {rope_type!r} needs {missing}")
        return cls(rope_type, *(hf[k] for k in keys))

    def to_hf(self) -> dict:
        return {"rope_type": self.rope_type,
                **{k: v for k, v in dataclasses.asdict(self).items() if k != "rope_type" and v is not None}}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The static structure of a Llama-family model (Hugging Face's config names).

    `model_type` "llama", "qwen2" (q/k/v biases always, no o_proj bias) or "mistral";
    `attention_bias` (q/k/v/o) and `mlp_bias` are Llama's. `sliding_window`: None, or
    the longest sequence the model runs (see the module docstring).

    `hf_dict` is the config.json dict the config was read from, kept so that a save
    writes back every key the model does not use (eos/bos lists, dtype, unknown
    keys); it takes no part in comparison, hashing or repr.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    hf_dict: dict | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not implemented (only {list(ARCHITECTURES)})")
        if self.model_type != "llama" and (self.attention_bias or self.mlp_bias):
            raise ValueError(f"attention_bias and mlp_bias are Llama's settings; {self.model_type}'s biases come "
                             "with its model_type")
        if self.sliding_window is not None and not (isinstance(self.sliding_window, int) and self.sliding_window > 0):
            raise ValueError(f"sliding_window must be None or a positive int, got {self.sliding_window!r}")

    @property
    def qkv_bias(self) -> bool:
        """Whether q_proj, k_proj and v_proj have biases (Llama's attention_bias, Qwen2's always)."""
        return self.attention_bias or self.model_type == "qwen2"

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """From a Hugging Face config.json's dict (kept as `hf_dict`); what this model
        does not implement (another architecture, activation or rope type, a partial
        rotary embedding) is refused by name."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {model_type!r} is not implemented (only {list(ARCHITECTURES)})")
        for key, expected in {"hidden_act": "silu", "partial_rotary_factor": 1.0}.items():
            if hf.get(key, expected) != expected:
                raise ValueError(f"config {key}={hf[key]!r} is not implemented (only {expected!r})")
        heads = hf["num_attention_heads"]
        llama = model_type == "llama"
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
                   num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                   rope_theta=float(hf.get("rope_theta", 10000.0)), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   max_position_embeddings=hf.get("max_position_embeddings", 2048), model_type=model_type,
                   rope_scaling=RopeScaling.from_hf(hf.get("rope_scaling")),
                   attention_bias=llama and bool(hf.get("attention_bias", False)),
                   mlp_bias=llama and bool(hf.get("mlp_bias", False)), sliding_window=_sliding_window(hf),
                   hf_dict=copy.deepcopy(hf))

    @classmethod
    def from_json(cls, path: str) -> LlamaConfig:
        """From a config.json file, or a checkpoint directory holding one."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_hf(json.load(f))

    def to_hf(self) -> dict:
        """The config.json of this model: `hf_dict` unchanged when it describes this
        model, so that every key the model does not use comes back as it was read;
        otherwise `hf_dict` (or nothing) with the fields this model defines set."""
        base = copy.deepcopy(self.hf_dict or {})
        if base and LlamaConfig.from_hf(base) == self:
            return base
        return {**base, **self._hf_fields()}

    def _hf_fields(self) -> dict:
        """What this model defines, in config.json's names for its model_type."""
        fields = {"model_type": self.model_type, "architectures": [ARCHITECTURES[self.model_type]],
                  "hidden_act": "silu",
                  **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if f.name not in ("model_type", "rope_scaling", "attention_bias", "mlp_bias",
                                       "sliding_window", "hf_dict")},
                  "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None}
        if self.model_type == "llama":
            fields.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            fields["sliding_window"] = self.sliding_window
        else:  # qwen2: a window, where there is one, on every layer
            fields.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                          max_window_layers=0, layer_types=None)
        return fields

    @property
    def layer_names(self) -> list[str]:
        """`layers_00`, ...: zero-padded so that names sort in depth order."""
        width = len(str(self.num_hidden_layers - 1))
        return [f"layers_{i:0{width}d}" for i in range(self.num_hidden_layers)]


def _sliding_window(hf: dict) -> int | None:
    """The attention window of a config.json dict, as transformers reads it: Mistral's
    `sliding_window`; Qwen2's only with `use_sliding_window` and on a layer that
    `layer_types` (default: those from `max_window_layers` on) marks sliding."""
    window = hf.get("sliding_window", 4096)  # both configs' default
    if hf.get("model_type") == "mistral":
        return window
    if hf.get("model_type") != "qwen2" or not hf.get("use_sliding_window") or window is None:
        return None
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else ""
                                      for i in range(hf["num_hidden_layers"])]
    return window if "sliding_attention" in types else None


class Linear(nn.Module):
    """y = x W^T (+ bias) with W (features, in), Hugging Face's layout."""

    features: int
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.normal(0.02), (self.features, x.shape[-1]))
        y = jnp.einsum("...i,oi->...o", x, w.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, the mean taken in float32."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return w.astype(self.dtype) * x32.astype(self.dtype)


def inv_frequencies(config: LlamaConfig) -> jax.Array:
    """(head_dim/2,) float32 rotary frequencies 1 / theta^(2i/d), scaled as
    transformers 4.57's `_compute_linear_scaling_rope_parameters` and
    `_compute_llama3_parameters` scale them."""
    d, scaling = config.head_dim, config.rope_scaling
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    context = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return jnp.where(medium, smoothed, scaled)


def rotary(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding of x (B, t, heads, d) at positions (B, t), Hugging Face's
    half-split convention: pairs (i, i + d/2) rotate by position * inv_freq[i]."""
    d = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, t, d/2)
    cos, sin = (jnp.concatenate([f(angles)] * 2, axis=-1)[:, :, None, :] for f in (jnp.cos, jnp.sin))
    half = jnp.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    return (x.astype(jnp.float32) * cos + half.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention over a key/value cache, rotary positions."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    fused: bool = False

    @nn.compact
    def __call__(self, x, positions, cache, index, key_valid):
        c = self.config
        b, t, _ = x.shape
        heads, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        if c.sliding_window is not None and cache[1].shape[2] > c.sliding_window:
            raise ValueError(f"sliding_window={c.sliding_window} is shorter than the sequence ({cache[1].shape[2]} "
                             "positions): attention over a sliding window is not implemented")
        if self.fused:
            qkv = Linear((heads + 2 * kv) * hd, self.dtype, c.qkv_bias, name="qkv_proj")(x)
            q, k, v = jnp.split(qkv, [heads * hd, (heads + kv) * hd], axis=-1)
        else:
            q, k, v = (Linear(n * hd, self.dtype, c.qkv_bias, name=f"{p}_proj")(x)
                       for n, p in ((heads, "q"), (kv, "k"), (kv, "v")))
        q, k, v = q.reshape(b, t, heads, hd), k.reshape(b, t, kv, hd), v.reshape(b, t, kv, hd)
        inv_freq = inv_frequencies(c)
        q, k = rotary(q, positions, inv_freq), rotary(k, positions, inv_freq)
        # keys (B, kv, hd, T) and values (B, kv, T, hd): both products below are plain
        # batched matmuls over (B, kv) as laid out. Keys as (B, T, kv, hd) made XLA
        # transpose or repack the whole cache at every decoding step.
        keys = jax.lax.dynamic_update_slice(cache[0], k.transpose(0, 2, 3, 1).astype(cache[0].dtype),
                                            (0, 0, 0, index))
        values = jax.lax.dynamic_update_slice(cache[1], v.transpose(0, 2, 1, 3).astype(cache[1].dtype),
                                              (0, 0, index, 0))
        visible = (jnp.arange(values.shape[2])[None, :] <= (index + jnp.arange(t))[:, None])[None]  # (1, t, T)
        visible = visible & key_valid[:, None, :]  # (B, t, T)
        q = q.reshape(b, t, kv, heads // kv, hd).transpose(0, 2, 3, 1, 4)  # (B, kv, g, t, hd)
        logits = jnp.einsum("bkgqd,bkds->bkgqs", q, keys.astype(self.dtype)).astype(jnp.float32) / jnp.sqrt(hd)
        logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgqs,bksd->bkgqd", weights, values.astype(self.dtype))
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, heads * hd)
        return Linear(c.hidden_size, self.dtype, c.attention_bias, name="o_proj")(out), (keys, values)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    fused: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.config
        if self.fused:
            gate, up = jnp.split(Linear(2 * c.intermediate_size, self.dtype, c.mlp_bias, name="gate_up_proj")(x), 2,
                                 axis=-1)
        else:
            gate = Linear(c.intermediate_size, self.dtype, c.mlp_bias, name="gate_proj")(x)
            up = Linear(c.intermediate_size, self.dtype, c.mlp_bias, name="up_proj")(x)
        return Linear(c.hidden_size, self.dtype, c.mlp_bias, name="down_proj")(nn.silu(gate) * up)


class Layer(nn.Module):
    """x + attention(norm(x)), then x + MLP(norm(x))."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    fused: bool = False

    @nn.compact
    def __call__(self, x, positions, cache, index, key_valid):
        eps = self.config.rms_norm_eps
        h, cache = Attention(self.config, self.dtype, self.fused, name="self_attn")(
            RMSNorm(eps, self.dtype, name="input_layernorm")(x), positions, cache, index, key_valid)
        x = x + h
        h = RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x)
        return x + MLP(self.config, self.dtype, self.fused, name="mlp")(h), cache


class Llama(nn.Module):
    """A Llama causal language model: logits (B, t, vocab) of tokens (B, t).

    `dtype` is the compute dtype (weights are cast to it; norms, rotary angles and
    softmax run in float32 whatever it is). `fused`: the parameters are `fuse`'s.
    """

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    fused: bool = False

    @nn.compact
    def __call__(self, tokens, positions=None, cache: Cache | None = None, index=0, key_valid=None,
                 last: int | None = None):
        """(logits (B, t, vocab) float32, cache) of tokens (B, t) int; with `last`,
        logits (B, last, vocab) of the last `last` positions only.

        Args:
          positions: (B, t) rotary positions; default index + 0..t-1 for every row.
          cache: from `empty_cache`; the tokens' keys and values go to slots
            index..index+t-1. Without one, the tokens attend within themselves.
          key_valid: (B, T) bool, the cache slots that hold real tokens (False for
            left padding); default all.
          last: static; the vocabulary projection, the largest matmul of a small
            model's token (49,152 x 576 of SmolLM2's 106M others), runs on these
            positions only.
        """
        c = self.config
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t), (b, t))
        if cache is None:
            cache = self.empty_cache(b, t)
        if key_valid is None:
            key_valid = jnp.ones((b, cache_length(cache)), bool)
        embed = self.param("embed_tokens", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size))
        embed = jnp.asarray(embed, self.dtype)
        x = embed[tokens]
        new_cache = []
        for i, name in enumerate(c.layer_names):
            x, layer_cache = Layer(c, self.dtype, self.fused, name=name)(x, positions, cache[i], index, key_valid)
            new_cache.append(layer_cache)
        if last is not None:
            x = x[:, t - last:]
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(x)
        if c.tie_word_embeddings:
            logits = jnp.einsum("bti,vi->btv", x, embed)
        else:
            logits = Linear(c.vocab_size, self.dtype, name="lm_head")(x)
        return logits.astype(jnp.float32), new_cache

    def empty_cache(self, batch: int, length: int) -> Cache:
        """Zero keys and values for `length` slots of `batch` sequences."""
        c = self.config
        kv, hd = c.num_key_value_heads, c.head_dim
        return [(jnp.zeros((batch, kv, hd, length), self.dtype), jnp.zeros((batch, kv, length, hd), self.dtype))
                for _ in range(c.num_hidden_layers)]


def cache_length(cache: Cache) -> int:
    """The slots of a cache (T)."""
    return cache[0][1].shape[2]


def extend_cache(cache: Cache, rows: int, width: int) -> Cache:
    """`rows` copies of a one-row cache, `width` empty slots appended."""
    grow = lambda x, axis: jnp.concatenate(
        [jnp.broadcast_to(x, (rows, *x.shape[1:])),
         jnp.zeros((rows, *x.shape[1:axis], width, *x.shape[axis + 1:]), x.dtype)], axis=axis)
    return [(grow(keys, 3), grow(values, 2)) for keys, values in cache]


FUSED = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")), "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}


def fuse(model: dict) -> dict:
    """The model of `Llama(..., fused=True)`: each layer's q/k/v and gate/up weights
    (and biases) concatenated along their outputs. A copy of those leaves, made where
    it is called: call it once per traced function, outside loops."""
    params = dict(model["params"])
    for name, layer in params.items():
        if not name.startswith("layers_"):
            continue
        layer = dict(layer)
        for block, (fused, parts) in FUSED.items():
            leaves = {k: v for k, v in layer[block].items() if k not in parts}
            leaves[fused] = {key: jnp.concatenate([layer[block][p][key] for p in parts])
                             for key in layer[block][parts[0]]}
            layer[block] = leaves
        params[name] = layer
    return {**model, "params": params}


def init(net: Llama, key: jax.Array) -> dict:
    """A random model ({"params": ...}) of `net`, normal(0.02) weights, unit norms."""
    return net.init(key, jnp.zeros((1, 1), jnp.int32))


def token_nll(net: Llama, model, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """(B, t-1) next-token negative log-likelihoods of tokens (B, t) given their
    prefixes (teacher forcing), zero where `mask` (B, t-1) is False."""
    logits, _ = net.apply(model, tokens[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return nll if mask is None else jnp.where(mask, nll, 0.0)
