"""experiments/llm_real.py: its command lines and JSON fields are a contract.

A tiny random Llama with SmolLM2's vocabulary stands in for the 135M model (the
protocol's code paths are the same; the real run is an experiment): specialists are
trained for 2 steps, then every method runs on a few questions.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m2n2_jax as mj
from experiments import llm_real, llm_real_data, llm_real_protocol, llm_real_train, lm_protocol
from m2n2_jax.llm import gguf, hf, llama
from m2n2_jax.tasks import lora


@pytest.fixture(scope="module")
def tiny_base():
    config = llama.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8, rope_theta=1e5,
                               tie_word_embeddings=True)
    model = llama.Llama(config)
    return model, llama.init(model, jax.random.key(0)), hf.load_tokenizer(gguf.smollm2_gguf())


@pytest.fixture(scope="module")
def tiny_specialists(tiny_base, tmp_path_factory):
    """A folder with both skills' adapters, trained 2 steps on the tiny base."""
    folder = tmp_path_factory.mktemp("specialists")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llm_real, "base_model", lambda: tiny_base)
        for skill in llm_real_data.SKILLS:
            llm_real.main(["train", "--skill", skill, "--steps", "2", "--batch", "4", "--eval-questions", "3",
                           "--out", str(folder)])
    return folder


def test_protocol_writes_the_json_contract(tiny_base, tiny_specialists, tmp_path, monkeypatch):
    monkeypatch.setattr(llm_real, "base_model", lambda: tiny_base)
    folder = str(tiny_specialists)
    for skill in llm_real_data.SKILLS:
        log = json.loads((tiny_specialists / f"{skill}_train.json").read_text())
        assert len(log["losses"]) == 2 and set(log["fitness_accuracy"]) == {"base", "specialist"}
    argv = ["--runs", "2", "--forward-passes", "11", "--population", "3", "--warmup", "2", "--archive-size", "4",
            "--archive", "recipes", "--fitness-questions", "3", "--test-questions", "4", "--log-every", "5",
            "--no-progress", "--specialists", folder, "--out", str(tmp_path / "out")]
    record = llm_real.main(argv)
    on_disk = json.loads((tmp_path / "out" / "llm_real.json").read_text())
    assert on_disk["test_skill_mean"] == json.loads(json.dumps(record["test_skill_mean"]))
    methods = list(llm_real_protocol.METHODS)
    assert list(record["test_skill_mean"]) == ["base", "specialist-a", "specialist-b", *methods]
    for name, entry in record["test_skill_mean"].items():
        assert set(entry) == {"mean", "stderr", "runs"}
        assert len(entry["runs"]) == (1 if name in ("base", "specialist-a", "specialist-b", "task_arithmetic")
                                      else 2)
        per_skill = [record["test_score"][name][s]["runs"] for s in llm_real_data.SKILLS]
        np.testing.assert_allclose(entry["runs"], np.mean(per_skill, axis=0))
        assert entry["mean"] == pytest.approx(np.mean(entry["runs"]))
        assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for s in per_skill for v in s)  # 4 test questions per skill
    assert record["seconds_per_evaluation"] > 0 and record["evaluations"] == 5 * 2 * 11
    # --archive recipes where an archive can be recipes; m2n2-task-vectors keeps whole models
    assert record["archive"] == {"m2n2": "recipes", "m2n2-no-attraction": "recipes", "m2n2-no-splitpoint": "recipes",
                                 "m2n2-task-vectors": "models"}
    assert (record["fitness_questions_per_skill"], record["test_questions_per_skill"]) == (3, 4)
    assert record["curves"]["m2n2"][0]["forward_passes"][-1] == 11
    assert (tmp_path / "out" / "llm_real.png").stat().st_size > 1000
    assert not os.listdir(tmp_path / "out" / "checkpoints")  # each run's checkpoints removed once it is kept
    # a rerun resumes every finished run from the partial file instead of running it again
    monkeypatch.setattr(llm_real_protocol.mj, "run", lambda *a, **k: pytest.fail("ran again"))
    again = llm_real.main(argv)
    assert again["test_skill_mean"] == record["test_skill_mean"]


def test_paths_scores_the_ends_of_each_path_as_the_specialists(tiny_base, tiny_specialists, tmp_path, monkeypatch):
    monkeypatch.setattr(llm_real, "base_model", lambda: tiny_base)
    # a score that tells the models apart (the tiny specialists answer nothing right)
    probe = lambda p: (1e3 * sum(x.sum() for x in jax.tree.leaves(p))) % 1.0
    monkeypatch.setattr(llm_real.decode, "forced_exact_match_scores",
                        lambda *a: lambda params, batch: jnp.full(batch[0].shape[0], probe(params)))
    out = tmp_path / "paths.json"
    record = llm_real.main(["paths", "--ratios", "0", "0.5", "1", "--scales", "0", "1", "--layer-splits", "1",
                            "--fitness-questions", "3", "--test-questions", "4", "--specialists",
                            str(tiny_specialists), "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows == json.loads(json.dumps(record["rows"]))
    assert list(rows) == ["specialist-a", "specialist-b", "slerp w=0.0", "slerp w=0.5", "slerp w=1.0",
                          "task arithmetic s=0.0", "task arithmetic s=1.0", "a below layer 1, b above",
                          "b below layer 1, a above"]
    assert rows["specialist-a"] != rows["specialist-b"]
    assert rows["slerp w=0.0"] == rows["specialist-a"] and rows["slerp w=1.0"] == rows["specialist-b"]
    assert rows["a below layer 1, b above"] != rows["b below layer 1, a above"]
    for row in rows.values():
        for split in ("fitness", "test"):
            assert row[split]["mean"] == pytest.approx(np.mean([row[split][s] for s in llm_real_data.SKILLS]))
    with pytest.raises(SystemExit):
        llm_real.main(["paths", "--layer-splits", "2", "--specialists", str(tiny_specialists)])


def test_archive_scores_each_member_of_the_protocols_run(tiny_base, tiny_specialists, tmp_path, monkeypatch):
    monkeypatch.setattr(llm_real, "base_model", lambda: tiny_base)
    # a score that tells the models apart and ignores the questions: a member's fitness
    # and test rows are then equal iff the member built is the slot whose scores it shows
    # (to 2e-4: a child built inside the step and again from its recipe may differ in the
    # last bits, and float32 sums of its weights in two programs by ~3e-5)
    probe = lambda p: sum(x.sum() for x in jax.tree.leaves(p)) % 1.0
    monkeypatch.setattr(llm_real.decode, "forced_exact_match_scores",
                        lambda *a: lambda params, batch: jnp.full(batch[0].shape[0], probe(params)))
    common = ["--forward-passes", "11", "--fitness-questions", "3", "--test-questions", "4", "--no-progress",
              "--specialists", str(tiny_specialists)]
    record = llm_real.main(["archive", "--run", "1", "--out", str(tmp_path / "archive.json"), *common])
    assert json.loads((tmp_path / "archive.json").read_text())["members"] == json.loads(json.dumps(record["members"]))
    members = record["members"]
    assert (record["method"], record["run"], record["seed"]) == ("m2n2", 1, 43)
    fitness = np.asarray([m["fitness"]["mean"] for m in members])
    assert len(members) == 11 and len(set(np.round(fitness, 3))) > 5
    for i, m in enumerate(members):
        assert m["test"] == pytest.approx(m["fitness"], abs=2e-4)
        assert np.argmin(np.abs(fitness - m["test"]["mean"])) == i or fitness[i] in np.delete(fitness, i)
    returned = [m for m in members if m["returned"]]
    assert returned and all(m["fitness"]["mean"] == max(fitness) for m in returned)
    assert record["returned"]["test"] == pytest.approx(returned[0]["test"], abs=2e-4)
    # the same run as the protocol's run 1 of m2n2: its returned model scores the same
    protocol = llm_real.main(["--methods", "m2n2", "--runs", "2", "--archive", "recipes", "--out",
                              str(tmp_path / "protocol"), *common])
    for s in llm_real_data.SKILLS:
        assert protocol["test_score"]["m2n2"][s]["runs"][1] == pytest.approx(record["returned"]["test"][s], abs=2e-4)


def test_protocol_refuses_bad_command_lines(capsys):
    for argv, message in [(["--methods", "m2n2", "nope"], "unknown"), (["--forward-passes", "5"], ">= 2 seeds"),
                          (["--runs", "0"], "--runs must be > 0")]:
        with pytest.raises(SystemExit):
            llm_real.main(argv)
        assert message in capsys.readouterr().err


def test_nll_prints_one_line(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The library opens at 9 o'clock.")
    value = llm_real.main(["nll", str(text), "--window", "4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"nll_per_token {value:.6f}"] and 0 < value < 20


def test_questions_are_disjoint_and_reproducible():
    fit = llm_real_data.questions("arithmetic", "fitness", None, 0)
    test = llm_real_data.questions("arithmetic", "test", None, 0)
    tune = llm_real_data.questions("arithmetic", "finetune", None, 0)
    assert not {q for q, _ in fit} & {q for q, _ in test} and not {q for q, _ in tune} & {q for q, _ in fit + test}
    for q, a in fit[:50]:
        assert int(eval(q.split(": ")[1].replace("/", "//"))) == int(a)  # the calculator steps are right
    assert llm_real_data.questions("reversal", "test", 5, 3) == llm_real_data.questions("reversal", "test", 5, 3)
    q, a = llm_real_data.questions("reversal", "test", 1, 3)[0]
    assert q.split(": ")[1].split()[::-1] == a.split()


def test_sequences_mask_the_answer_only():
    tokens, mask = llm_real_train.sequences([[5, 6, 7], [8]], [[1, 2], [3, 4, 2]], 6, pad_id=0)
    np.testing.assert_array_equal(tokens, [[5, 6, 7, 1, 2, 0], [8, 3, 4, 2, 0, 0]])
    # position i predicts token i + 1: the answer's tokens are predicted from positions 2, 3 and 0, 1, 2
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]])


def test_lora_merge_adds_the_low_rank_delta(tiny_base):
    _, params, _ = tiny_base
    adapters = lora.init(jax.random.key(1), params, 3, llm_real_train.is_target)
    assert len(adapters) == 2 * 7
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # B = 0 at init: make the delta nonzero
    merged = lora.merge(params, adapters, 6.0)
    name = "params/layers_1/mlp/up_proj/weight"
    a, b = np.asarray(adapters[name]["a"]), np.asarray(adapters[name]["b"])
    expected = np.asarray(params["params"]["layers_1"]["mlp"]["up_proj"]["weight"]) + 2.0 * b @ a
    np.testing.assert_allclose(merged["params"]["layers_1"]["mlp"]["up_proj"]["weight"], expected, rtol=1e-6)
    np.testing.assert_array_equal(merged["params"]["embed_tokens"], params["params"]["embed_tokens"])
    with pytest.raises(ValueError, match="name no leaf"):
        lora.merge(params, {**adapters, "params/nope/weight": adapters[name]}, 6.0)
    assert jnp.all(lora.merge(params, lora.init(jax.random.key(2), params, 2, llm_real_train.is_target), 4.0)
                   ["params"]["layers_0"]["self_attn"]["q_proj"]["weight"]
                   == params["params"]["layers_0"]["self_attn"]["q_proj"]["weight"])


def test_merge_plans_and_runs_two_checkpoints_on_gsm8k(tiny_base, tmp_path):
    model, params, tokenizer = tiny_base
    dirs = []
    for i in (1, 2):
        noisy = jax.tree.map(lambda x, i=i: x + 0.01 * jax.random.normal(jax.random.key(i), x.shape), params)
        hf.save_hf(model.config, noisy, str(tmp_path / f"m{i}"))
        tokenizer.save(str(tmp_path / f"m{i}" / "tokenizer.json"))
        dirs.append(str(tmp_path / f"m{i}"))
    small = ["--fitness-problems", "4", "--prompt-length", "200", "--max-new-tokens", "3", "--chunk-size", "2",
             "--dtype", "float32", "--archive-size", "3", "--warmup", "1"]
    plan = llm_real.main(["merge", "--model-a", dirs[0], "--plan", "--out", str(tmp_path / "plan"), *small])
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["temp_bytes"] == plan["temp_bytes"]
    assert plan["parameters"] == sum(x.size for x in jax.tree.leaves(params))
    assert plan["argument_bytes"] > 3 * 4 * plan["parameters"]  # at least the archive of 3 float32 models
    record = llm_real.main(["merge", "--model-a", dirs[0], "--model-b", dirs[1], "--prompt", "chatml",
                            "--forward-passes", "4", "--test-problems", "3", "--out", str(tmp_path / "out"), *small])
    on_disk = json.loads((tmp_path / "out" / "gsm8k_merge.json").read_text())
    assert on_disk["test_accuracy"] == record["test_accuracy"] and len(record["test_accuracy"]["m2n2"]) == 1
    assert record["fitness_curve"]["forward_passes"][-1] == 4


def test_skill_weights_count_every_skill_and_refuse_an_empty_one():
    """Three skills of 2, 1 and 3 questions: each skill's mean, and question weights
    whose weighted mean over questions is the mean of the three skills (a default of
    two skills gave the third a weight of zero)."""
    skill = np.array([0, 0, 1, 2, 2, 2])
    scores = np.array([1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(scores @ np.asarray(lm_protocol.skill_weights(skill)), [0.5, 1.0, 2 / 3], rtol=1e-6)
    weights = np.asarray(lm_protocol.question_weights(skill))
    assert weights.mean() == pytest.approx(1.0)
    assert (scores * weights).mean() == pytest.approx(np.mean([0.5, 1.0, 2 / 3]))
    with pytest.raises(ValueError, match=r"skills \[1\] have no question"):
        lm_protocol.skill_weights(np.array([0, 2, 2]))


def test_returned_model_is_the_algorithms_best_of_the_skill_weighted_archive():
    """Slot 0 has the best mean over the 6 questions (5/6) but slot 1 the best mean of
    the three skills (0.72 against 0.67); the pick is the algorithm's own `best`,
    called on the archive with its scores weighted per question."""
    skill = np.array([0, 0, 1, 2, 2, 2])
    scores = jnp.asarray([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], jnp.float32)
    state = mj.Archive(models={"w": jnp.arange(3.0)}, scores=scores, occupied=jnp.array([True, True, False]))
    seen = []

    class Spy:
        def best(self, state, params):
            seen.append(np.asarray(state.scores))
            return mj.M2N2().best(state, params)

    model, mean = lm_protocol.returned_model(Spy(), state, None, None, None, lm_protocol.skill_weights(skill))
    assert float(model["w"]) == 1.0 and float(mean) == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    np.testing.assert_allclose(seen[0], np.asarray(scores) * np.asarray(lm_protocol.question_weights(skill)),
                               rtol=1e-6)
    assert int(jnp.argmax(jnp.where(state.occupied, scores.mean(1), -1))) == 0  # the counter-case
