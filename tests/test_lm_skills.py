"""experiments/lm_skills.py: its command line and JSON fields are a contract."""

import argparse
import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

import lm_models  # noqa: E402
import lm_skills  # noqa: E402

TINY = ["--d-model", "16", "--num-layers", "1", "--num-heads", "2", "--batch", "16", "--pool", "300",
        "--base-steps", "4", "--finetune-steps", "3", "--train-questions", "6", "--test-questions", "5",
        "--runs", "2", "--forward-passes", "8", "--log-every", "4", "--no-progress"]


def test_lm_skills_writes_the_json_contract(tmp_path):
    argv = TINY + ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    record = lm_skills.main(argv)
    on_disk = json.loads((tmp_path / "out" / "lm_skills.json").read_text())
    assert on_disk["test_exact_match"] == record["test_exact_match"]
    assert set(lm_skills.METHODS) >= {"base", "specialist_a", "specialist_b", "linear", "slerp",
                                      "task_arithmetic", "ties", "dare", "m2n2"}
    assert set(record["test_exact_match"]) == set(lm_skills.METHODS)
    for method in lm_skills.METHODS:
        assert set(record["test_exact_match"][method]) == {"addition", "reversal"}
        runs = record["test_exact_match_runs"][method]
        assert all(len(runs[s]) == 2 and all(0 <= v <= 1 for v in runs[s]) for s in ("addition", "reversal"))
        assert record["test_exact_match"][method]["addition"] == pytest.approx(sum(runs["addition"]) / 2)
    assert record["seeds"] == [42, 43] and record["forward_passes"] == 8
    assert record["m2n2_seeded_operator"] in lm_skills.BASELINES
    assert record["m2n2_curve"]["forward_passes"][-1] == 8
    assert -1 <= record["task_vectors"]["cosine"] <= 1
    assert (tmp_path / "out" / "lm_skills.png").stat().st_size > 1000


def test_models_are_cached_per_test_set(tmp_path, monkeypatch):
    t = lm_models.Training(d_model=16, num_layers=1, num_heads=2, batch=8, pool=100, base_steps=2, finetune_steps=2)
    models = lm_models.load_or_train(t, {"r:abc="}, str(tmp_path), log=lambda *a: None)
    assert set(models) == {"base", "addition", "reversal"}

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(lm_models, "train", no_training)
    again = lm_models.load_or_train(t, {"r:abc="}, str(tmp_path), log=lambda *a: None)
    jax.tree.map(np.testing.assert_array_equal, again, models)
    with pytest.raises(AssertionError, match="trained again"):  # another test set: never reuse
        lm_models.load_or_train(t, {"r:abd="}, str(tmp_path), log=lambda *a: None)


def test_mixture_argument_and_training_validation():
    assert lm_skills.mixture_arg("copy:0.6,addition_short:0.4") == (("copy", 0.6), ("addition_short", 0.4))
    assert lm_skills.mixture_arg("") == ()
    for bad in ("copy", "copy:x", "division:1", "copy:-1"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            lm_skills.mixture_arg(bad)
    with pytest.raises(ValueError, match="sum"):
        lm_models.Training(finetune_replay=(("copy", 0.6), ("addition_short", 0.4)))
    with pytest.raises(ValueError, match="different"):
        lm_models.Training(specialists=("reversal", "reversal"))
    for argv in (["--skills", "reversal", "reversal"], ["--finetune-replay", "copy:0.7,addition_short:0.3"]):
        with pytest.raises(SystemExit):
            lm_skills.main(argv)
