"""A text-to-image diffusion model of the 8x8 digits and its scores, in flax: the
paper's JSDXL merge in miniature (experiments/diffusion.py).

- `TextEncoder`: token embeddings, mean-pooled over the caption's tokens, then a GELU
  MLP: the conditioning vector c (B, C).
- `Denoiser`: an MLP on the noisy image (64 pixels) and a sinusoidal embedding of the
  time, each hidden layer modulated by c (FiLM: h * (1 + scale(c)) + shift(c)). The
  FiLM layers are the conditioning path, the analog of a U-Net's cross-attention:
  `conditioning_group` puts them in their own parameter group.
- Training (`loss`): DDPM's noise prediction at a continuous time t ~ U(0, 1) of a
  cosine schedule, the caption dropped (c = 0) with probability `drop` so that one
  model is both conditional and unconditional.
- Sampling (`sample`): deterministic DDIM (eta = 0) in `steps` steps from a given noise
  (B, 64), with classifier-free guidance; a sample is a function of the model, the
  caption and the noise only.
- Scores: the penultimate ReLU features of a frozen digits `Classifier` (the CLIP
  analog). `similarity` is the cosine of two feature vectors, in [0, 1] since ReLU
  features are non-negative; `caption_scores` is the per-caption fitness; and
  `frechet_distance` between two feature sets is the FID analog.

Pixels are the digits' 0..16 values mapped to [-1, 1] (`to_unit`).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

PIXELS = 64
COSINE_OFFSET = 0.008  # s of the cosine schedule (Nichol and Dhariwal 2021)


def to_unit(images: jax.Array) -> jax.Array:
    """The digits' pixel values 0..16 as floats in [-1, 1]."""
    return jnp.asarray(images, jnp.float32) / 8.0 - 1.0


class TextEncoder(nn.Module):
    """(B, L) token ids (0 = padding) -> (B, features) conditioning vectors."""

    vocab: int
    width: int = 64
    features: int = 32

    @nn.compact
    def __call__(self, tokens):
        mask = (tokens > 0)[..., None].astype(jnp.float32)
        e = nn.Embed(self.vocab, self.width, name="embed")(tokens)
        pooled = (e * mask).sum(-2) / jnp.maximum(mask.sum(-2), 1.0)
        return nn.Dense(self.features, name="out")(nn.gelu(nn.Dense(self.width, name="hidden")(pooled)))


def time_embedding(t: jax.Array, dim: int = 32) -> jax.Array:
    """(B,) times in [0, 1] -> (B, dim) sines and cosines at geometric frequencies."""
    freqs = jnp.exp(jnp.linspace(0.0, jnp.log(1000.0), dim // 2))
    angles = t[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Denoiser(nn.Module):
    """(x_t (B, 64), t (B,), c (B, C)) -> predicted noise (B, 64)."""

    hidden: int = 256
    layers: int = 3

    @nn.compact
    def __call__(self, x, t, c):
        h = jnp.concatenate([x, time_embedding(t)], axis=-1)
        for i in range(self.layers):
            h = nn.Dense(self.hidden, name=f"dense_{i}")(h)
            scale, shift = jnp.split(nn.Dense(2 * self.hidden, name=f"film_{i}")(c), 2, axis=-1)
            h = nn.swish(h * (1.0 + scale) + shift)
        return nn.Dense(PIXELS, name="out")(h)


def conditioning_group(path: str) -> str:
    """The parameter group of a denoiser leaf: "conditioning" for the FiLM layers (the
    cross-attention analog, merged on their own), "rest" for the others."""
    return "conditioning" if "film_" in path else "rest"


def alpha_bar(t: jax.Array) -> jax.Array:
    """The cosine schedule's signal fraction at time t in [0, 1], clipped to [1e-4, 1]."""
    f = jnp.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * jnp.pi / 2) ** 2
    return jnp.clip(f / jnp.cos(COSINE_OFFSET / (1 + COSINE_OFFSET) * jnp.pi / 2) ** 2, 1e-4, 1.0)


def loss(denoiser: Denoiser, encoder: TextEncoder, model: dict, images, tokens, key, drop: float = 0.1):
    """DDPM's noise-prediction loss of model {"encoder", "denoiser"} on images (B, 64) in
    [-1, 1] with their captions (B, L); the caption is dropped (c = 0) w.p. `drop`."""
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    b = images.shape[0]
    t = jax.random.uniform(k_t, (b,))
    noise = jax.random.normal(k_noise, images.shape)
    a = alpha_bar(t)[:, None]
    x_t = jnp.sqrt(a) * images + jnp.sqrt(1 - a) * noise
    keep = jax.random.bernoulli(k_drop, 1 - drop, (b, 1))
    c = encoder.apply(model["encoder"], tokens) * keep
    return jnp.mean((denoiser.apply(model["denoiser"], x_t, t, c) - noise) ** 2)


def sample(denoiser: Denoiser, denoiser_model, c, noise, steps: int = 15, guidance: float = 1.0):
    """Images (B, 64) in [-1, 1] from conditioning c (B, C) and noise (B, 64): DDIM with
    eta = 0 over `steps` equal time steps from t = 1 to 0, predicted images clipped to
    [-1, 1]; guidance g mixes eps_uncond + g (eps_cond - eps_uncond) (1: conditional
    only, one network call per step)."""
    times = jnp.linspace(1.0, 0.0, steps + 1)

    def eps_of(x, t):
        tb = jnp.full(x.shape[:1], t)
        eps = denoiser.apply(denoiser_model, x, tb, c)
        if guidance != 1.0:
            uncond = denoiser.apply(denoiser_model, x, tb, jnp.zeros_like(c))
            eps = uncond + guidance * (eps - uncond)
        return eps

    def step(x, ts):
        t, s = ts
        a_t, a_s = alpha_bar(t), alpha_bar(s)
        x0 = jnp.clip((x - jnp.sqrt(1 - a_t) * eps_of(x, t)) / jnp.sqrt(a_t), -1.0, 1.0)
        eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1 - a_t)
        return jnp.sqrt(a_s) * x0 + jnp.sqrt(1 - a_s) * eps, None

    x, _ = jax.lax.scan(step, noise, (times[:-1], times[1:]))
    return jnp.clip(x, -1.0, 1.0)


class Classifier(nn.Module):
    """A digits MLP 64 -> hidden (ReLU) -> features (ReLU) -> 10; `features=True` returns
    the penultimate activations (B, features), non-negative."""

    hidden: int = 128
    width: int = 64

    @nn.compact
    def __call__(self, x, features: bool = False):
        h = nn.relu(nn.Dense(self.width, name="features")(nn.relu(nn.Dense(self.hidden, name="hidden")(x))))
        return h if features else nn.Dense(10, name="logits")(h)


def similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """(..., F) x (..., F) -> (...): the cosine of non-negative feature vectors, in [0, 1]
    (0 where either vector is zero)."""
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.clip(jnp.where(norms > 0, (a * b).sum(-1) / jnp.where(norms > 0, norms, 1.0), 0.0), 0.0, 1.0)


def generate(denoiser: Denoiser, encoder: TextEncoder, encoder_model, denoiser_model, tokens, noise,
             steps: int = 15, guidance: float = 1.0):
    """Images (B, 64) from captions (B, L) and noise (B, 64)."""
    return sample(denoiser, denoiser_model, encoder.apply(encoder_model, tokens), noise, steps, guidance)


def caption_scores(denoiser: Denoiser, encoder: TextEncoder, encoder_model, classifier: Classifier,
                   classifier_model, steps: int = 15, guidance: float = 1.0) -> Callable:
    """score_fn(denoiser_model, (tokens (M, L), noise (M, 64), real features (M, F))) ->
    (M,) in [0, 1]: per caption, the `similarity` of the classifier features of the
    image generated from it (the fixed `encoder_model` read the caption) and of the
    caption's real image."""

    def score_fn(denoiser_model, batch):
        tokens, noise, real = batch
        images = generate(denoiser, encoder, encoder_model, denoiser_model, tokens, noise, steps, guidance)
        return similarity(classifier.apply(classifier_model, images, features=True), real)

    return score_fn


def frechet_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """The Fréchet distance between Gaussians fitted to feature sets a (n, F) and b (m, F):
    |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) (FID's formula), the
    matrix square roots by symmetric eigendecompositions (float32; negative rounding
    in eigenvalues clipped to 0)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = jnp.cov(a, rowvar=False), jnp.cov(b, rowvar=False)
    w, v = jnp.linalg.eigh(cov_a)
    root_a = (v * jnp.sqrt(jnp.maximum(w, 0.0))) @ v.T
    inner = jnp.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return jnp.sum((mu_a - mu_b) ** 2) + jnp.trace(cov_a) + jnp.trace(cov_b) - 2 * jnp.sqrt(jnp.maximum(inner, 0)).sum()
