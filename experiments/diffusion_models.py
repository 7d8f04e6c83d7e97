"""The seed models of experiments/diffusion.py: one frozen digits classifier and four
text-to-image models like the paper's (m2n2_jax.tasks.diffusion).

- classifier: the CLIP analog, trained once on the training images (its penultimate
  features score every image);
- en-base ("SDXL 1.0"): text encoder and denoiser trained from scratch on the EN
  captions of all training images;
- en-long ("trained longer"): en-base's denoiser trained `long_steps` more on the same
  data at a lower rate;
- en-thick (a style fine-tune): en-base's denoiser fine-tuned on the thick-stroke
  images only;
- ja ("JSDXL"): a new text encoder and new FiLM layers (the denoiser's conditioning
  path, freshly initialised), the rest of the denoiser from en-base, all trained
  together on the JA captions of a small subset of the images (`ja_subset`), a share
  of which (`ja_en_share`) also appear with their EN caption (its encoder has seen a
  little EN). It reads JA well and is weaker at image quality.
The EN models share en-base's text encoder. All are trained with Adam (cosine-decayed
rate) in one `lax.scan` each and cached with orbax under experiments/cache/ (key:
`Training.tag()`).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import harness
from m2n2_jax.merge import leaf_path
from m2n2_jax.tasks import captions
from m2n2_jax.tasks.diffusion import Classifier, Denoiser, TextEncoder, conditioning_group, loss, to_unit

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")
EN_SEEDS = ("en-base", "en-long", "en-thick")
SEEDS = ("ja", *EN_SEEDS)


@dataclasses.dataclass(frozen=True)
class Training:
    """Model sizes and training schedules (the cache key)."""

    hidden: int = 256
    layers: int = 3
    batch: int = 128
    classifier_steps: int = 2000
    base_steps: int = 6000
    base_lr: float = 1e-3
    long_steps: int = 6000
    long_lr: float = 3e-4
    thick_steps: int = 1500
    thick_lr: float = 3e-4
    ja_steps: int = 3000
    ja_lr: float = 1e-3
    ja_subset: float = 0.15
    ja_en_share: float = 0.1
    ja_new_conditioning: bool = True  # False: the JA FiLM layers start from en-base's (only the encoder is new)
    seed: int = 0

    def tag(self) -> str:
        return "diffusion_" + "_".join(f"{f.name}{getattr(self, f.name):g}" for f in dataclasses.fields(self))


def modules(t: Training):
    """(encoder, denoiser, classifier) flax modules of these sizes."""
    return TextEncoder(len(captions.VOCAB)), Denoiser(t.hidden, t.layers), Classifier()


def init(t: Training, key):
    """Fresh {"encoder", "denoiser"} params and classifier params."""
    encoder, denoiser, classifier = modules(t)
    k_e, k_d, k_c = jax.random.split(key, 3)
    c = encoder.init(k_e, jnp.zeros((1, captions.LENGTH), jnp.int32))
    return ({"encoder": c, "denoiser": denoiser.init(k_d, jnp.zeros((1, 64)), jnp.zeros((1,)),
                                                    jnp.zeros((1, encoder.features)))},
            classifier.init(k_c, jnp.zeros((1, 64))))


def fit(t: Training, params, trained: str, images, tokens, steps: int, lr: float, key):
    """(params, final loss): Adam on the DDPM loss over minibatches of (images, tokens);
    `trained` is "all", "encoder" or "denoiser" (the other part frozen)."""
    encoder, denoiser, _ = modules(t)
    images, tokens = jnp.asarray(images), jnp.asarray(tokens)
    part = (lambda p: p) if trained == "all" else (lambda p: p[trained])
    whole = (lambda q: q) if trained == "all" else (lambda q: {**params, trained: q})

    def loss_fn(q, k):
        k_batch, k_loss = jax.random.split(k)
        idx = jax.random.randint(k_batch, (t.batch,), 0, images.shape[0])
        return loss(denoiser, encoder, whole(q), images[idx], tokens[idx], k_loss)

    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))
    q, losses = jax.jit(harness.train, static_argnums=(0, 2))(loss_fn, part(params), optimizer,
                                                              jax.random.split(key, steps))
    return whole(q), float(losses[-100:].mean())


def train_classifier(t: Training, params, images, labels, key):
    """Full-batch Adam on the cross-entropy of the training images."""
    _, _, classifier = modules(t)
    x, y = to_unit(images), jnp.asarray(labels)

    def loss_fn(p, k):
        return optax.softmax_cross_entropy_with_integer_labels(classifier.apply(p, x), y).mean()

    p, _ = jax.jit(harness.train, static_argnums=(0, 2))(loss_fn, params, optax.adam(1e-3),
                                                         jax.random.split(key, t.classifier_steps))
    return p


def train_all(t: Training, images, labels, attrs, log=print) -> dict:
    """Every model, trained from the training images (n, 64) 0..16, labels and attributes."""
    t0 = time.perf_counter()
    keys = jax.random.split(jax.random.key(t.seed), 8)
    fresh, classifier = init(t, keys[0])
    x = to_unit(images)
    en, ja = captions.tokens(attrs, "en"), captions.tokens(attrs, "ja")
    out = {"classifier": train_classifier(t, classifier, images, labels, keys[1])}
    base, l_base = fit(t, fresh, "all", x, en, t.base_steps, t.base_lr, keys[2])
    long, l_long = fit(t, base, "denoiser", x, en, t.long_steps, t.long_lr, keys[3])
    thick = np.asarray(attrs)[:, 1] == 1
    style, l_thick = fit(t, base, "denoiser", x[thick], en[thick], t.thick_steps, t.thick_lr, keys[4])
    rng = np.random.default_rng(t.seed)
    subset = rng.permutation(len(x))[: max(1, int(t.ja_subset * len(x)))]
    bilingual = subset[: int(t.ja_en_share * len(subset))]
    ja_x = jnp.concatenate([x[subset], x[bilingual]])
    ja_tokens = np.concatenate([ja[subset], en[bilingual]])
    new, _ = init(t, keys[6])  # the JA model's own initial encoder and FiLM layers, not en-base's initial ones
    start = {"encoder": new["encoder"], "denoiser": jax.tree_util.tree_map_with_path(
        lambda p, b, f: f if t.ja_new_conditioning and conditioning_group(leaf_path(p)) == "conditioning" else b,
        base["denoiser"], new["denoiser"])}
    ja_model, l_ja = fit(t, start, "all", ja_x, ja_tokens, t.ja_steps, t.ja_lr, keys[5])
    log(f"diffusion models: final losses base {l_base:.4f}, long {l_long:.4f}, thick {l_thick:.4f}, "
        f"ja {l_ja:.4f} ({time.perf_counter() - t0:.0f} s)")
    out["encoders"] = {"en": base["encoder"], "ja": ja_model["encoder"]}
    out["denoisers"] = {"en-base": base["denoiser"], "en-long": long["denoiser"], "en-thick": style["denoiser"],
                        "ja": ja_model["denoiser"]}
    return out


def load_or_train(t: Training, images, labels, attrs, cache: str = CACHE, log=print) -> dict:
    """{"classifier", "encoders": {"en", "ja"}, "denoisers": {seed: params}}, from the
    orbax cache or trained and cached."""
    fresh, classifier = init(t, jax.random.key(0))
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            {"classifier": classifier, "encoders": {"en": fresh["encoder"], "ja": fresh["encoder"]},
                             "denoisers": {s: fresh["denoiser"] for s in SEEDS}})
    return harness.cached(os.path.join(cache, t.tag()), template, lambda: train_all(t, images, labels, attrs, log))
