"""Pre-trained merging: specialists, the brute-force baseline and the experiment script."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

import pretrained  # noqa: E402
from common import digits_problem  # noqa: E402
from m2n2_jax.baselines.brute_force import slerp_ratio_search  # noqa: E402
from specialists import HALVES, half_accuracy, paper_initial_params, train_specialist  # noqa: E402


def test_specialists_are_specialists():
    model, _, train, test, _ = digits_problem()
    for start, own, other in zip(paper_initial_params(), HALVES, HALVES[::-1]):
        params = train_specialist(start, model, *train, own)
        own_acc, other_acc = half_accuracy(model, params, test, own), half_accuracy(model, params, test, other)
        assert own_acc > 0.7 and other_acc < 0.1, (own_acc, other_acc)


def test_paper_initial_params_have_the_mlp_layout():
    a, b = paper_initial_params()
    assert a["params"]["Dense_0"]["kernel"].shape == (64, 256) and b["params"]["Dense_1"]["bias"].shape == (10,)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
    assert flat.size == 19_210 and abs(flat.std() - 0.01) < 5e-4
    assert not np.allclose(a["params"]["Dense_0"]["kernel"], b["params"]["Dense_0"]["kernel"])


def test_brute_force_finds_the_known_best_ratio():
    # slerp([1, 0], [0, 1], w) = [cos(w pi/2), sin(w pi/2)]; the score peaks where the
    # second coordinate is 0.5, i.e. at w = 1/3.
    a, b = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
    score_fn = lambda p, batch: jnp.broadcast_to(jnp.exp(-100.0 * (p[1] - 0.5) ** 2), batch.shape)
    ratios, scores = slerp_ratio_search(a, b, score_fn, jnp.zeros(5), 10_000)
    assert abs(float(ratios[np.argmax(scores)]) - 1 / 3) < 2e-4
    with pytest.raises(ValueError, match="num_ratios"):
        slerp_ratio_search(a, b, score_fn, jnp.zeros(5), 1)


@pytest.mark.parametrize("method", pretrained.METHODS)
def test_short_pretrained_run_of_every_method(tmp_path, method):
    record = pretrained.main(["--method", method, "--runs", "2", "--forward-passes", "40", "--log-every", "20",
                              "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--no-progress"])
    saved = json.loads((tmp_path / f"{method}.json").read_text())
    assert saved["method"] == method and saved["runs"] == 2 and saved["curve"]["forward_passes"] == [20, 40]
    assert saved["mutation_std"] == 0.0 if method != "brute-force" else "best_ratio" in saved
    acc = np.asarray(record["final_test_accuracy"])
    assert acc.shape == (2,) and np.all((acc > 0.3) & (acc <= 1))
    # The specialists were cached with orbax (no pickle) and are reused.
    assert any(p.startswith("specialists_paper") for p in os.listdir(tmp_path / "cache"))
