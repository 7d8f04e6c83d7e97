"""Pre-trained merging: the specialists and the experiment script."""

import json
import os

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from experiments import pretrained
from experiments.specialists import HALVES, initial_flats, label_accuracy, load_or_train, train_specialist
from m2n2_jax.tasks import digits

TRAIN, TEST = digits.load_digits()


def test_specialists_are_specialists():
    sizes = digits.widths(256)
    for flat, own, other in zip(initial_flats("paper", 0, 19_210), HALVES, HALVES[::-1]):
        params = train_specialist(digits.mlp_from_flat(flat, sizes), *TRAIN, own)
        own_acc, other_acc = label_accuracy(params, TEST, own), label_accuracy(params, TEST, other)
        assert own_acc > 0.7 and other_acc < 0.1, (own_acc, other_acc)


def test_paper_initial_vectors_are_the_mlp_in_ravel_order():
    a, b = initial_flats("paper", 0, 19_210)
    assert abs(float(a.std()) - 0.01) < 5e-4 and not np.allclose(a, b)
    model = digits.mlp_from_flat(a, digits.widths(256))
    assert model[0].kernel.shape == (64, 256) and model[1].bias.shape == (10,)
    np.testing.assert_array_equal(ravel_pytree(model)[0], a)
    np.testing.assert_array_equal(model[0].bias, a[64 * 256 : 64 * 256 + 256])  # W1 then b1, as the paper


def test_specialists_are_cached_and_reused(tmp_path):
    first = load_or_train(TRAIN, 16, steps=3, cache=str(tmp_path))
    assert any(p.startswith("specialists_paper_h16") for p in os.listdir(tmp_path))
    again = load_or_train(TRAIN, 16, steps=3, cache=str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, first, again)


@pytest.mark.parametrize("method", pretrained.METHODS)
def test_short_pretrained_run_of_every_method(tmp_path, method):
    es = ["--population", "2", "--std-init", "0.2"] if method == "cma-es-slerp" else []  # 2 + 2k passes hit 20, 40
    record = pretrained.main(["--method", method, "--runs", "2", "--forward-passes", "40", "--log-every", "20",
                              "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--no-progress", *es])
    saved = json.loads((tmp_path / f"{method}.json").read_text())
    assert saved["method"] == method and saved["runs"] == 2 and saved["curve"]["forward_passes"] == [20, 40]
    assert saved["mutation_std"] == 0.0
    if method == "slerp-grid":
        assert 0 <= saved["best_ratio"] <= 1 and saved["final_test_accuracy"][0] == saved["final_test_accuracy"][1]
    acc = np.asarray(record["final_test_accuracy"])
    assert acc.shape == (2,) and np.all((acc > 0.3) & (acc <= 1))
