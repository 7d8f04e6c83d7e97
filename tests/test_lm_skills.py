"""experiments/lm_skills.py: its command line and JSON fields are a contract."""

import argparse
import hashlib
import json

import jax
import numpy as np
import pytest

import lm_models
import lm_skills

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


@pytest.mark.parametrize("argv, message", [
    (["--skills", "reversal", "reversal"], "different"),
    (["--skills", "reversal"], "--skills"),
    (["--finetune-replay", "copy:0.7,addition_short:0.3"], "sum"),
    (["--base-mixture", "copy:0"], "sum to > 0"),
    (["--base-mixture", "copy:nan"], "finite"),
    (["--runs", "0"], "--runs must be > 0"),
    (["--forward-passes", "3"], "--forward-passes must be >= 4"),
    (["--archive-size", "1"], "--archive-size must be >= 2"),
    (["--train-questions", "0"], "--train-questions must be > 0"),
    (["--base-lr", "nan"], "--base-lr must be > 0"),
    (["--d-model", "10", "--num-heads", "4"], "multiple of --num-heads"),
    (["--data-seed", "-1"], "--data-seed must be >= 0"),
])
def test_refused_runs_exit_2_with_one_line_and_touch_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lm_skills.json").write_text('{"earlier": "result"}')
    before = hashlib.sha1((out / "lm_skills.json").read_bytes()).hexdigest()
    # TINY first (the case overrides it): a check that failed to refuse would run a tiny experiment, not a long one.
    with pytest.raises(SystemExit) as e:
        lm_skills.main(TINY + argv + ["--out", str(out), "--cache", str(tmp_path / "cache")])
    error = capsys.readouterr().err
    assert e.value.code == 2 and message in error and error.count("\n") == 1, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["lm_skills.json"]
    assert hashlib.sha1((out / "lm_skills.json").read_bytes()).hexdigest() == before
