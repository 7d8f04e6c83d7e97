"""experiments/lm_skills.py: its command line and JSON fields are a contract."""

import argparse
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m2n2_jax as mj
from experiments import lm_models, lm_operators, lm_protocol, lm_skills

TINY = ["--d-model", "16", "--num-layers", "1", "--num-heads", "2", "--batch", "16", "--pool", "300",
        "--base-steps", "4", "--finetune-steps", "3", "--train-questions", "6", "4", "--test-questions", "5",
        "--runs", "2", "--forward-passes", "30", "--population", "3", "--warmup", "2", "--log-every", "10",
        "--no-progress", "--pairs", "a"]
# One method of each kind: M2N2 (here in our task-vector mode, which runs every part of
# the paper's M2N2 and more), a merge-coefficient CMA-ES and a static operator; the
# full list runs in the experiment.
METHODS = ["m2n2-task-vectors", "cma-es-slerp", "ties"]


def test_lm_skills_writes_the_json_contract(tmp_path):
    argv = TINY + ["--methods", *METHODS, "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    record = lm_skills.main(argv)
    on_disk = json.loads((tmp_path / "out" / "lm_skills.json").read_text())
    assert on_disk["pairs"]["a"]["test_skill_mean"] == record["pairs"]["a"]["test_skill_mean"]
    assert set(lm_skills.METHODS) == {"m2n2", "m2n2-no-attraction", "m2n2-no-splitpoint", "ga", "map-elites",
                                      "cma-es-slerp", "cma-es-task-arithmetic", "linear", "slerp",
                                      "task_arithmetic", "ties", "dare", "m2n2-task-vectors"}
    pair = record["pairs"]["a"]
    assert list(pair["test_skill_mean"]) == ["base", "specialist_a", "specialist_b", *METHODS]
    assert pair["scorers"] == {"addition": "exact_match", "reversal": "partial_credit"}
    assert pair["train_questions"] == {"addition": 6, "reversal": 4}
    for method, mean in pair["test_skill_mean"].items():
        runs = pair["test_score_runs"][method]
        assert all(len(runs[s]) == 2 and all(0 <= v <= 1 for v in runs[s]) for s in ("addition", "reversal"))
        assert pair["test_score"][method]["addition"] == pytest.approx(sum(runs["addition"]) / 2)
        assert mean == pytest.approx((pair["test_score"][method]["addition"]
                                      + pair["test_score"][method]["reversal"]) / 2)
    assert record["seeds"] == [42, 43] and record["forward_passes"] == 30 and record["pairs"].keys() == {"a"}
    assert pair["curves"]["m2n2-task-vectors"]["forward_passes"][-1] == 30
    assert -1 <= pair["task_vectors"]["cosine"] <= 1 and "dare" in pair["task_vectors"]
    assert set(pair["reachability_best"]) == {"linear", "swap", "task_arithmetic"}
    assert (tmp_path / "out" / "lm_skills_a.png").stat().st_size > 1000
    assert (tmp_path / "out" / "lm_skills_a_curves.png").stat().st_size > 1000


def test_models_are_cached_per_test_set(tmp_path, monkeypatch):
    # the sizes of TINY above: the training programs compiled by the contract test are reused
    t = lm_models.Training(d_model=16, num_layers=1, num_heads=2, batch=16, pool=300, base_steps=4, finetune_steps=3)
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
    (["--forward-passes", "5"], "--forward-passes must be >= 3 seeds + --population (6)"),
    (["--methods", "m2n2", "cmaes"], "unknown --methods"),
    (["--methods", "m2n2", "ta-cma-es"], "method 'ta-cma-es' is now called 'cma-es-task-arithmetic'"),
    (["--pairs", "z"], "unknown --methods / --pairs ['z']"),
    (["--train-questions", "1", "2", "3"], "one or two numbers"),
    (["--archive-size", "1"], "--archive-size must be >= 2"),
    (["--train-questions", "0"], "--train-questions must be one or two numbers > 0"),
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


def test_returned_model_is_the_best_mean_of_skills_not_of_questions():
    """Three skill-0 questions and one skill-1 question: slot 0 wins the mean over
    questions (0.75) but slot 1 the mean of the two skills (0.67 against 0.5), and an
    empty slot with perfect scores is never returned."""
    weights = lm_protocol.skill_weights(np.array([0, 0, 0, 1]))
    np.testing.assert_allclose(np.asarray(weights), [[1 / 3, 0], [1 / 3, 0], [1 / 3, 0], [0, 1]])
    scores = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 1], [1, 1, 1, 1]], jnp.float32)
    archive = mj.Archive(models={"w": jnp.arange(3.0)}, scores=scores, occupied=jnp.array([True, True, False]))
    model, mean = lm_protocol.returned_model(mj.M2N2(), archive, None, None, None, weights)
    assert float(model["w"]) == 1.0 and float(mean) == pytest.approx(2 / 3)
    assert int(jnp.argmax(jnp.where(archive.occupied, scores.mean(1), -1))) == 0  # the counter-case


def test_question_weights_give_each_skill_an_equal_share():
    """Three skill-0 questions and one skill-1 question: weights 2/3 and 2 (mean 1, each
    skill 2 in all); the CMA-ES score is scaled to [0, 1] and ranks models as the mean of
    the skills' means does, not as the mean over questions."""
    skill_of_point = np.array([0, 0, 0, 1])
    np.testing.assert_allclose(np.asarray(lm_protocol.question_weights(skill_of_point)), [2 / 3, 2 / 3, 2 / 3, 2])
    fn = lm_protocol.skill_weighted(lambda params, batch: params, skill_of_point)
    a, b = jnp.asarray([1.0, 1, 1, 0]), jnp.asarray([1.0, 0, 0, 1])  # skill means 0.5 and 0.67
    assert float(fn(a, None).max()) <= 1 and float(fn(b, None).mean()) > float(fn(a, None).mean())
    assert float(a.mean()) > float(b.mean())  # the counter-case
    np.testing.assert_allclose(float(fn(b, None).mean()), (1 / 3 + 1) / 2 / 2, rtol=1e-6)


def test_the_operators_are_the_registrys_and_a_grid_must_name_one():
    """The static operators are merge_ops.OPERATORS (its order) that have a grid here; a
    grid keyed by any other name is refused."""
    assert lm_protocol.OPERATORS == lm_operators.BASELINES == tuple(mj.merge_ops.OPERATORS)
    with pytest.raises(ValueError, match=r"grids for \['avg'\], not merge operators; the registry: linear, slerp"):
        lm_operators.checked_grids({"ties": {"density": (0.5,)}, "avg": {"weight": (0.5,)}})
