"""m2n2_jax.tasks.captions and m2n2_jax.tasks.diffusion against NumPy references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from m2n2_jax.tasks import captions, digits
from m2n2_jax.tasks import diffusion as df


@pytest.fixture(scope="module")
def train_images():
    (x, y), _ = digits.load_digits()
    return np.asarray(x), np.asarray(y)


def np_attributes(image, label, ink_median, slant_cuts):
    """(digit, stroke, slant) of one 8x8 image, by explicit loops over its pixels."""
    mass = sx = sy = 0.0
    for r in range(8):
        for c in range(8):
            w = float(image[r * 8 + c])
            mass, sx, sy = mass + w, sx + w * c, sy + w * r
    cx, cy = sx / mass, sy / mass
    mu11 = mu02 = 0.0
    for r in range(8):
        for c in range(8):
            w = float(image[r * 8 + c])
            mu11 += w * (c - cx) * (r - cy)
            mu02 += w * (r - cy) ** 2
    slant = -mu11 / mu02
    return int(label), int(mass > ink_median[int(label)]), int(slant >= slant_cuts[0]) + int(slant >= slant_cuts[1])


def parse(words, language):
    """Attributes read back from a caption's words."""
    digits_, strokes, slants = ((captions.DIGITS_EN, captions.STROKES["en"], captions.SLANTS["en"]) if language == "en"
                                else (captions.DIGITS_JA, captions.STROKES["ja"], captions.SLANTS["ja"]))
    found = [next(i for i, w in enumerate(vocab) if w in words) for vocab in (digits_, strokes, slants)]
    return tuple(found)


def test_captions_describe_their_images(train_images):
    x, y = train_images
    t = captions.fit_thresholds(x, y)
    attrs = captions.attributes(x, y, t)
    for i in range(0, len(x), 7):
        expected = np_attributes(x[i], y[i], t.ink, t.slant)
        assert tuple(attrs[i]) == expected
        for language in captions.LANGUAGES:
            ids = captions.tokens(attrs[i:i + 1], language)[0]
            assert ids.shape == (captions.LENGTH,)
            assert parse(captions.text(ids).split(), language) == expected
    # The two languages share no word and order them differently.
    en, ja = captions.tokens(attrs[:1], "en")[0], captions.tokens(attrs[:1], "ja")[0]
    assert not set(en.tolist()) & set(ja.tolist())
    assert (captions.words(attrs[0], "ja")[-1] in captions.DIGITS_JA
            and captions.words(attrs[0], "en")[-1] in captions.SLANTS["en"])
    # Both strokes and all three slants occur, in about the proportions the cuts give.
    assert 0.4 < attrs[:, 1].mean() < 0.6 and np.bincount(attrs[:, 2], minlength=3).min() > len(x) / 4


def test_slant_and_stroke_follow_the_image():
    """A stroke whose top leans right reads "rightward", its mirror "leftward"; the same
    digit with more ink reads "thick"."""
    right = np.zeros((8, 8))
    for r in range(8):
        right[r, 7 - r] = 16  # top row: ink at the right
    left = right[:, ::-1]
    t = captions.Thresholds(ink=np.full(10, 200.0), slant=np.array([-0.1, 0.1]))
    attrs = captions.attributes(np.stack([right.ravel(), left.ravel(), 2 * right.ravel()]), np.array([1, 1, 1]), t)
    assert attrs[:, 2].tolist() == [2, 0, 2]
    assert attrs[:, 1].tolist() == [0, 0, 1]  # ink 128, 128, 256 against a median of 200
    assert captions.text(captions.tokens(attrs[:1], "en")[0]) == "a thin one rightward"
    assert captions.text(captions.tokens(attrs[1:2], "ja")[0]) == "hidari no hosoi ichi"
    with pytest.raises(ValueError, match="no ink"):
        captions.shear(np.zeros((1, 64)))
    with pytest.raises(ValueError, match="every digit"):
        captions.fit_thresholds(np.ones((3, 64)), np.array([0, 1, 2]))


class Scale(nn.Module):
    """eps(x, t, c) = w * x + t * c[:, :1]: a denoiser simple enough for NumPy."""

    @nn.compact
    def __call__(self, x, t, c):
        w = self.param("w", nn.initializers.constant(0.3), ())
        return w * x + t[:, None] * c[:, :1]


def np_ddim(x, c, w, steps, guidance):
    abar = lambda t: np.clip(np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2,
                             1e-4, 1.0)
    times = np.linspace(1.0, 0.0, steps + 1)
    for t, s in zip(times[:-1], times[1:]):
        cond, uncond = w * x + t * c[:, :1], w * x
        eps = uncond + guidance * (cond - uncond)
        x0 = np.clip((x - np.sqrt(1 - abar(t)) * eps) / np.sqrt(abar(t)), -1, 1)
        eps = (x - np.sqrt(abar(t)) * x0) / np.sqrt(1 - abar(t))
        x = np.sqrt(abar(s)) * x0 + np.sqrt(1 - abar(s)) * eps
    return np.clip(x, -1, 1)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_ddim_sampler_matches_numpy_and_is_deterministic(guidance):
    model = Scale()
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)), jnp.zeros((1,)), jnp.zeros((1, 4)))
    noise = np.asarray(jax.random.normal(jax.random.key(1), (3, 64)))
    c = np.asarray(jax.random.normal(jax.random.key(2), (3, 4)))
    sample = jax.jit(lambda n: df.sample(model, params, c, n, steps=7, guidance=guidance))
    out = np.asarray(sample(noise))
    np.testing.assert_allclose(out, np_ddim(noise.astype(np.float64), c, 0.3, 7, guidance), atol=2e-5)
    np.testing.assert_array_equal(out, np.asarray(sample(noise)))  # same noise, same image
    assert not np.allclose(out, np.asarray(sample(noise[::-1])))


def test_generate_is_a_function_of_model_caption_and_noise():
    """The real denoiser and encoder: a sample is a function of model, caption and noise."""
    enc, den = df.TextEncoder(len(captions.VOCAB)), df.Denoiser(hidden=32, layers=2)
    e = enc.init(jax.random.key(0), jnp.zeros((1, captions.LENGTH), jnp.int32))
    d = den.init(jax.random.key(1), jnp.zeros((1, 64)), jnp.zeros((1,)), jnp.zeros((1, enc.features)))
    tokens = jnp.asarray([[1, 3, 5, 7], [20, 21, 22, 23]], jnp.int32)
    noise = jax.random.normal(jax.random.key(3), (2, 64))
    a = df.generate(den, enc, e, d, tokens, noise, steps=5)
    b = jax.jit(lambda d_: df.generate(den, enc, e, d_, tokens, noise, steps=5))(d)
    assert a.shape == (2, 64) and float(jnp.abs(a).max()) <= 1.0
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # the caption matters: another caption, another image
    other = df.generate(den, enc, e, d, tokens[::-1], noise, steps=5)
    assert not np.allclose(np.asarray(a), np.asarray(other))
    paths = jax.tree_util.tree_flatten_with_path(d)[0]
    groups = {df.conditioning_group(jax.tree_util.keystr(p, simple=True, separator="/")) for p, _ in paths}
    assert groups == {"conditioning", "rest"}


@pytest.fixture(scope="module")
def classifier(train_images):
    x, y = train_images
    model = df.Classifier()
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(p, df.to_unit(x)), y).mean())(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for _ in range(150):
        params, state = step(params, state)
    return model, params


def test_similarity_is_in_unit_interval_and_higher_for_the_paired_image(train_images, classifier):
    x, y = train_images
    model, params = classifier
    t = captions.fit_thresholds(x, y)
    attrs = captions.attributes(x, y, t)
    feats = np.asarray(model.apply(params, df.to_unit(x), features=True))
    assert (feats >= 0).all()
    # An image's "paired" image: another image with the same caption; a random one: any image.
    rng = np.random.default_rng(0)
    key = attrs @ np.array([100, 10, 1])
    paired, random_ = [], []
    for i in range(0, len(x), 3):
        same = np.flatnonzero((key == key[i]) & (np.arange(len(x)) != i))
        if len(same):
            paired.append(float(df.similarity(feats[i], feats[rng.choice(same)])))
            random_.append(float(df.similarity(feats[i], feats[rng.integers(len(x))])))
    assert np.mean(paired) > np.mean(random_) + 0.05
    # In [0, 1] for anything: noise images, a zero feature vector, an image with itself.
    noise_feats = model.apply(params, jax.random.uniform(jax.random.key(0), (50, 64), minval=-1, maxval=1),
                              features=True)
    s = np.asarray(df.similarity(noise_feats, feats[:50]))
    assert ((s >= 0) & (s <= 1)).all()
    assert float(df.similarity(jnp.zeros(64), feats[0])) == 0.0
    assert float(df.similarity(feats[0], feats[0])) == pytest.approx(1.0, abs=1e-6)


def test_caption_scores_are_per_caption_and_in_unit_interval(train_images, classifier):
    x, y = train_images
    model, params = classifier
    enc, den = df.TextEncoder(len(captions.VOCAB)), df.Denoiser(hidden=32, layers=2)
    e = enc.init(jax.random.key(0), jnp.zeros((1, captions.LENGTH), jnp.int32))
    d = den.init(jax.random.key(1), jnp.zeros((1, 64)), jnp.zeros((1,)), jnp.zeros((1, enc.features)))
    attrs = captions.attributes(x[:6], y[:6], captions.fit_thresholds(x, y))
    batch = (jnp.asarray(captions.tokens(attrs, "ja")), jax.random.normal(jax.random.key(4), (6, 64)),
             model.apply(params, df.to_unit(x[:6]), features=True))
    score_fn = df.caption_scores(den, enc, e, model, params, steps=4)
    s = np.asarray(score_fn(d, batch))
    assert s.shape == (6,) and ((s >= 0) & (s <= 1)).all()
    images = df.generate(den, enc, e, d, batch[0], batch[1], steps=4)
    np.testing.assert_allclose(s, np.asarray(df.similarity(model.apply(params, images, features=True), batch[2])),
                               atol=1e-6)


def np_frechet(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * root))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(200, 6)) @ rng.normal(size=(6, 6))
    assert float(df.frechet_distance(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))) == pytest.approx(
        np_frechet(a, b), rel=1e-3)
    assert abs(float(df.frechet_distance(jnp.asarray(a, jnp.float32), jnp.asarray(a, jnp.float32)))) < 1e-2
    # Only the second moment differs: still detected.
    wider = 2.0 * (a - a.mean(0)) + a.mean(0)
    assert float(df.frechet_distance(jnp.asarray(a, jnp.float32), jnp.asarray(wider, jnp.float32))) > 1.0


def test_ddpm_loss_trains_a_denoiser():
    """A few Adam steps lower the noise-prediction loss (the training path runs end to end)."""
    (x, y), _ = digits.load_digits()
    x = df.to_unit(x[:64])
    tokens = jnp.asarray(captions.tokens(np.stack([np.asarray(y[:64]), np.zeros(64, int), np.ones(64, int)], 1), "en"))
    enc, den = df.TextEncoder(len(captions.VOCAB)), df.Denoiser(hidden=64, layers=2)
    params = {"encoder": enc.init(jax.random.key(0), tokens[:1]),
              "denoiser": den.init(jax.random.key(1), x[:1], jnp.zeros((1,)), jnp.zeros((1, enc.features)))}
    opt = optax.adam(3e-3)
    loss = jax.jit(lambda p, k: df.loss(den, enc, p, x, tokens, k))
    grad = jax.jit(jax.grad(lambda p, k: df.loss(den, enc, p, x, tokens, k)))
    key = jax.random.key(5)
    before = np.mean([float(loss(params, jax.random.fold_in(key, i))) for i in range(8)])
    state = opt.init(params)
    for i in range(60):
        updates, state = opt.update(grad(params, jax.random.fold_in(key, 100 + i)), state)
        params = optax.apply_updates(params, updates)
    after = np.mean([float(loss(params, jax.random.fold_in(key, i))) for i in range(8)])
    assert after < 0.8 * before
