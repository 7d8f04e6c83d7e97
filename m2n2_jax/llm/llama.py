"""A Llama-family decoder in flax, laid out as Hugging Face's `LlamaForCausalLM`.

RMSNorm, rotary position embeddings with any base (`rope_theta`), grouped-query
attention (`num_kv_heads` <= `num_heads`), a SwiGLU MLP, tied or untied output
embeddings. Weights keep Hugging Face's shapes, (out, in) for every projection, so a
checkpoint loads without transposes (`hf`) and the default rule of the model
axis (`mj.model_specs`) splits each projection over its outputs.

Layers are named `layers_00`, `layers_01`, ... (zero-padded to the number of layers),
so `jax.tree.leaves` walks them in depth order, and the flat parameter vector that
M2N2's split point cuts runs from the embeddings to the last layer (then `lm_head`,
`norm`).

One code path serves scoring and decoding: `__call__(tokens, positions, cache, index,
key_valid)` writes the keys and values of `tokens` into `cache` at slots index.. and
attends to the valid slots up to each query's own; a full forward pass is the call
without a cache. Left-padded batches give each row its own positions and mark the
padding invalid (`decode`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Cache = list  # [(keys, values)] per layer, each (B, T, num_kv_heads, head_dim)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The static structure of a Llama model (Hugging Face's `LlamaConfig` names)."""

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

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """From a Hugging Face config.json's dict; what this model does not implement
        (biases, rope scaling, another activation or architecture) is refused."""
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {hf.get('model_type')!r}: only Llama-family ('llama') checkpoints load")
        unsupported = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "rope_scaling": None}
        for key, expected in unsupported.items():
            if hf.get(key, expected) != expected:
                raise ValueError(f"config {key}={hf[key]!r} is not implemented (only {expected!r})")
        heads = hf["num_attention_heads"]
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
                   num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                   rope_theta=float(hf.get("rope_theta", 10000.0)), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   max_position_embeddings=hf.get("max_position_embeddings", 2048))

    @classmethod
    def from_json(cls, path: str) -> LlamaConfig:
        """From a config.json file, or a checkpoint directory holding one."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_hf(json.load(f))

    def to_hf(self) -> dict:
        """The config.json of this model (Hugging Face's names)."""
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
                **dataclasses.asdict(self)}

    @property
    def layer_names(self) -> list[str]:
        """`layers_00`, ...: zero-padded so that names sort in depth order."""
        width = len(str(self.num_hidden_layers - 1))
        return [f"layers_{i:0{width}d}" for i in range(self.num_hidden_layers)]


class Linear(nn.Module):
    """y = x W^T with W (features, in), Hugging Face's layout; no bias."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.normal(0.02), (self.features, x.shape[-1]))
        return jnp.einsum("...i,oi->...o", x, w.astype(self.dtype))


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


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of x (B, t, heads, d) at positions (B, t), Hugging Face's
    half-split convention: pairs (i, i + d/2) rotate by position / theta^(2i/d)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # (d/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, t, d/2)
    cos, sin = (jnp.concatenate([f(angles)] * 2, axis=-1)[:, :, None, :] for f in (jnp.cos, jnp.sin))
    half = jnp.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    return (x.astype(jnp.float32) * cos + half.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention over a key/value cache, rotary positions."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, cache, index, key_valid):
        c = self.config
        b, t, _ = x.shape
        heads, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = Linear(heads * hd, self.dtype, name="q_proj")(x).reshape(b, t, heads, hd)
        k = Linear(kv * hd, self.dtype, name="k_proj")(x).reshape(b, t, kv, hd)
        v = Linear(kv * hd, self.dtype, name="v_proj")(x).reshape(b, t, kv, hd)
        q, k = rotary(q, positions, c.rope_theta), rotary(k, positions, c.rope_theta)
        keys = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, index, 0, 0))
        values = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, index, 0, 0))
        visible = (jnp.arange(keys.shape[1])[None, :] <= (index + jnp.arange(t))[:, None])[None]  # (1, t, T)
        visible = visible & key_valid[:, None, :]  # (B, t, T)
        q = q.reshape(b, t, kv, heads // kv, hd)
        logits = jnp.einsum("bqkgd,bskd->bkgqs", q, keys.astype(self.dtype)).astype(jnp.float32) / jnp.sqrt(hd)
        logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", weights, values.astype(self.dtype)).reshape(b, t, heads * hd)
        return Linear(c.hidden_size, self.dtype, name="o_proj")(out), (keys, values)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = Linear(c.intermediate_size, self.dtype, name="gate_proj")(x)
        up = Linear(c.intermediate_size, self.dtype, name="up_proj")(x)
        return Linear(c.hidden_size, self.dtype, name="down_proj")(nn.silu(gate) * up)


class Layer(nn.Module):
    """x + attention(norm(x)), then x + MLP(norm(x))."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, cache, index, key_valid):
        eps = self.config.rms_norm_eps
        h, cache = Attention(self.config, self.dtype, name="self_attn")(
            RMSNorm(eps, self.dtype, name="input_layernorm")(x), positions, cache, index, key_valid)
        x = x + h
        h = RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x)
        return x + MLP(self.config, self.dtype, name="mlp")(h), cache


class Llama(nn.Module):
    """A Llama causal language model: logits (B, t, vocab) of tokens (B, t).

    `dtype` is the compute dtype (weights are cast to it; norms, rotary angles and
    softmax run in float32 whatever it is).
    """

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, positions=None, cache: Cache | None = None, index=0, key_valid=None):
        """(logits (B, t, vocab) float32, cache) of tokens (B, t) int.

        Args:
          positions: (B, t) rotary positions; default index + 0..t-1 for every row.
          cache: from `empty_cache`; the tokens' keys and values go to slots
            index..index+t-1. Without one, the tokens attend within themselves.
          key_valid: (B, T) bool, the cache slots that hold real tokens (False for
            left padding); default all.
        """
        c = self.config
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t), (b, t))
        if cache is None:
            cache = self.empty_cache(b, t)
        if key_valid is None:
            key_valid = jnp.ones((b, cache[0][0].shape[1]), bool)
        embed = self.param("embed_tokens", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size))
        embed = jnp.asarray(embed, self.dtype)
        x = embed[tokens]
        new_cache = []
        for i, name in enumerate(c.layer_names):
            x, layer_cache = Layer(c, self.dtype, name=name)(x, positions, cache[i], index, key_valid)
            new_cache.append(layer_cache)
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(x)
        if c.tie_word_embeddings:
            logits = jnp.einsum("bti,vi->btv", x, embed)
        else:
            logits = Linear(c.vocab_size, self.dtype, name="lm_head")(x)
        return logits.astype(jnp.float32), new_cache

    def empty_cache(self, batch: int, length: int) -> Cache:
        """Zero keys and values for `length` slots of `batch` sequences."""
        c = self.config
        shape = (batch, length, c.num_key_value_heads, c.head_dim)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(c.num_hidden_layers)]


def init(net: Llama, key: jax.Array) -> dict:
    """A random model ({"params": ...}) of `net`, normal(0.02) weights, unit norms."""
    return net.init(key, jnp.zeros((1, 1), jnp.int32))


def token_nll(net: Llama, model, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """(B, t-1) next-token negative log-likelihoods of tokens (B, t) given their
    prefixes (teacher forcing), zero where `mask` (B, t-1) is False."""
    logits, _ = net.apply(model, tokens[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return nll if mask is None else jnp.where(mask, nll, 0.0)
