"""Captions of the 8x8 digits in two vocabularies, for the bilingual diffusion merge
(experiments/diffusion.py; the paper's JSDXL experiment in miniature).

Each image is described by its digit and two attributes computed from the image
itself (`attributes`):
- stroke: "thick" or "thin", its ink mass (sum of pixels) above or at most the median
  ink mass of its digit in the training images (a style, not a digit cue);
- slant: "left", "upright" or "right", from the image moments: the shear
  -mu11 / mu02 of the ink (x right, y down; positive when the top leans right),
  split at the training images' tertiles.

The two languages use disjoint words and different word orders (one shared token
table, so that one encoder can read both):
    EN: "a thick seven rightward"       (article, stroke, digit, slant)
    JA: "migi no futoi nana"            (slant, particle, stroke, digit)
Every caption has `LENGTH` tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DIGITS_EN = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_JA = ("rei", "ichi", "ni", "san", "yon", "go", "roku", "nana", "hachi", "kyuu")
STROKES = {"en": ("thin", "thick"), "ja": ("hosoi", "futoi")}
SLANTS = {"en": ("leftward", "upright", "rightward"), "ja": ("hidari", "massugu", "migi")}
FILLER = {"en": "a", "ja": "no"}
LANGUAGES = ("en", "ja")
VOCAB = ("<pad>", FILLER["en"], *DIGITS_EN, *STROKES["en"], *SLANTS["en"],
         FILLER["ja"], *DIGITS_JA, *STROKES["ja"], *SLANTS["ja"])
TOKEN = {w: i for i, w in enumerate(VOCAB)}
LENGTH = 4


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The cut points of the attributes, from the training images (`fit_thresholds`).

    Attributes:
      ink: (10,) median ink mass of each digit; thick is above it.
      slant: (2,) the tertiles of the shear; left below the first, right above the second.
    """

    ink: np.ndarray
    slant: np.ndarray


def ink(images: np.ndarray) -> np.ndarray:
    """(n,) ink mass of images (n, 64) with pixel values >= 0 (0..16 for the digits)."""
    return np.asarray(images, np.float64).reshape(len(images), -1).sum(1)


def shear(images: np.ndarray) -> np.ndarray:
    """(n,) -mu11 / mu02 of each image's ink (x column, y row, y down): > 0 when the top
    leans right. Images (n, 64) with pixel values >= 0, at least one > 0."""
    w = np.asarray(images, np.float64).reshape(len(images), 8, 8)
    y, x = np.mgrid[0:8, 0:8].astype(np.float64)
    mass = w.sum((1, 2))
    if (mass <= 0).any():
        raise ValueError("an image has no ink, so it has no slant")
    cx, cy = (w * x).sum((1, 2)) / mass, (w * y).sum((1, 2)) / mass
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    return -(w * dx * dy).sum((1, 2)) / (w * dy * dy).sum((1, 2))


def fit_thresholds(images: np.ndarray, labels: np.ndarray) -> Thresholds:
    """The attribute cut points of the training images (n, 64), labels (n,)."""
    mass, labels = ink(images), np.asarray(labels)
    missing = sorted(set(range(10)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"the training images must hold every digit; missing {missing}")
    return Thresholds(ink=np.array([np.median(mass[labels == d]) for d in range(10)]),
                      slant=np.quantile(shear(images), [1 / 3, 2 / 3]))


def attributes(images: np.ndarray, labels: np.ndarray, t: Thresholds) -> np.ndarray:
    """(n, 3) int: (digit, stroke 0 thin / 1 thick, slant 0 left / 1 upright / 2 right)."""
    labels = np.asarray(labels, np.int64)
    stroke = (ink(images) > t.ink[labels]).astype(np.int64)
    slant = np.searchsorted(t.slant, shear(images), side="right")
    return np.stack([labels, stroke, slant], axis=1)


def words(attrs, language: str) -> list[str]:
    """The caption of one image's attributes (digit, stroke, slant) in `language`."""
    digit, stroke, slant = (int(a) for a in attrs)
    if language == "en":
        return [FILLER["en"], STROKES["en"][stroke], DIGITS_EN[digit], SLANTS["en"][slant]]
    if language == "ja":
        return [SLANTS["ja"][slant], FILLER["ja"], STROKES["ja"][stroke], DIGITS_JA[digit]]
    raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")


def tokens(attrs: np.ndarray, language: str) -> np.ndarray:
    """(n, LENGTH) int32 token ids of the captions of attributes (n, 3)."""
    return np.asarray([[TOKEN[w] for w in words(a, language)] for a in np.asarray(attrs)], np.int32)


def text(token_ids) -> str:
    """The words of one caption's token ids."""
    return " ".join(VOCAB[int(i)] for i in token_ids if int(i))
