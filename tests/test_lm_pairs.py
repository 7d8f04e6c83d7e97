"""experiments/lm_analysis.py's pair measurements and lm_models' fine-tuning options,
against NumPy on tiny pytrees and models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import lm_analysis, lm_models
from m2n2_jax.tasks import skills
from m2n2_jax.tasks.transformer import decoded_scores


def tree(seed, scale=1.0):
    """A small pytree shaped like a Transformer's parameters: 4 whole-layer units."""
    rng = np.random.default_rng(seed)
    n = lambda *shape: jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
    return {"params": {"embed": {"embedding": n(5, 4)}, "embed_pos": n(3, 4),
                       "layer_0": {"attn": {"kernel": n(4, 4)}, "mlp": {"bias": n(4)}},
                       "layer_1": {"attn": {"kernel": n(4, 4)}},
                       "ln_out": {"scale": n(4)}, "out": {"kernel": n(4, 5)}}}


def flat(t):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]).astype(np.float64)


def test_task_vector_stats_norms_cosine_and_dare_match_numpy():
    base, a, b = tree(0), tree(1), tree(2)
    a = jax.tree.map(lambda o, x: o + 0.1 * x, base, a)
    b = jax.tree.map(lambda o, x: o + 0.05 * x, base, b)
    ta, tb, o = flat(a) - flat(base), flat(b) - flat(base), flat(base)
    # Own-skill "scores": any function of the parameters will do.
    score_a = lambda p: float(jnp.sum(p["params"]["layer_0"]["attn"]["kernel"] ** 2))
    score_b = lambda p: float(jnp.sum(jnp.abs(p["params"]["out"]["kernel"])))
    key = jax.random.key(3)
    stats = lm_analysis.task_vector_stats(base, a, b, score_a, score_b, key=key, draws=4, keep=0.1)
    np.testing.assert_allclose(stats["norm_over_base_norm"]["a"], np.linalg.norm(ta) / np.linalg.norm(o), rtol=1e-5)
    np.testing.assert_allclose(stats["norm_over_base_norm"]["b"], np.linalg.norm(tb) / np.linalg.norm(o), rtol=1e-5)
    np.testing.assert_allclose(stats["cosine"], ta @ tb / np.linalg.norm(ta) / np.linalg.norm(tb), rtol=1e-4)
    for name, model, score in (("a", a, score_a), ("b", b, score_b)):
        dropped = [lm_analysis.dare_drop(k, base, model, 0.1) for k in jax.random.split(key, 4)]
        np.testing.assert_allclose(stats["dare"][name]["dropped"], [score(d) for d in dropped], rtol=1e-5)
        assert stats["dare"][name]["specialist"] == pytest.approx(score(model))
        assert stats["dare"][name]["kept_share"] == pytest.approx(np.mean([score(d) for d in dropped]) / score(model))
    # DARE itself: each entry is the base's (dropped) or base + tau / 0.1 (kept), about 10 % kept.
    tau = flat(a) - o
    kept = []
    for k in jax.random.split(jax.random.key(4), 20):
        d = flat(lm_analysis.dare_drop(k, base, a, 0.1)) - o
        keep = np.abs(d) > 1e-6
        np.testing.assert_allclose(d[keep], tau[keep] / 0.1, rtol=1e-4)
        np.testing.assert_allclose(d[~keep], 0, atol=1e-6)
        kept.append(keep.mean())
    assert 0.07 < np.mean(kept) < 0.13
    assert "dare" not in lm_analysis.task_vector_stats(base, a, b)


def test_dare_by_part_drops_only_that_part():
    base, a = tree(0), tree(1)
    key = jax.random.key(5)
    seen = []
    got = lm_analysis.dare_by_part(base, a, lambda p: seen.append(p) or len(seen), {"attn": "attn", "x": "embed"},
                                   key=key, draws=2)
    assert got == {"attn": [1, 2], "x": [3, 4]}
    full = [jax.tree.leaves(lm_analysis.dare_drop(k, base, a, 0.1)) for k in jax.random.split(key, 2)]
    for params, d, pattern in zip(seen, full + full, ["attn", "attn", "embed", "embed"]):
        for path, x, xd, xa in zip(lm_analysis.leaf_paths(a), jax.tree.leaves(params), d, jax.tree.leaves(a)):
            np.testing.assert_array_equal(x, xd if pattern in path else xa)


def test_where_task_vectors_sit():
    base, a, b = tree(0), tree(1), tree(2)
    ta, tb = (jax.tree.map(jnp.subtract, m, base) for m in (a, b))
    got = lm_analysis.where_tau_sits(ta, tb, lm_analysis.transformer_unit, top=0.2)
    fa, fb = np.abs(flat(ta)), np.abs(flat(tb))
    k = round(0.2 * fa.size)
    top_a, top_b = set(np.argsort(-fa)[:k]), set(np.argsort(-fb)[:k])
    assert got["top_overlap"] == pytest.approx(len(top_a & top_b) / k)
    assert lm_analysis.where_tau_sits(ta, ta)["top_overlap"] == 1.0
    sq = {"embedding": 0.0, "layer_0": 0.0, "layer_1": 0.0, "head": 0.0}
    for path, x in zip(lm_analysis.leaf_paths(ta), jax.tree.leaves(ta)):
        sq[lm_analysis.transformer_unit(path)] += float(np.sum(np.asarray(x, np.float64) ** 2))
    for u, v in sq.items():
        assert got["unit_share"]["a"][u] == pytest.approx(v / sum(sq.values()), rel=1e-5)


def test_units_swaps_and_their_cap():
    a = tree(0)
    assert lm_analysis.layer_units(a) == ["embedding", "layer_0", "layer_1", "head"]
    with pytest.raises(ValueError, match="no unit"):
        lm_analysis.transformer_unit("params/mystery/kernel")
    combos, complete = lm_analysis.swap_combinations(["u"] * 4)
    assert complete and len(combos) == 16 and len(set(combos)) == 16
    combos, complete = lm_analysis.swap_combinations(list(range(12)), max_swaps=100)
    assert not complete and len(set(combos)) == 100 and combos[:2] == [(0,) * 12, (1,) * 12]


def test_reachability_enumerates_each_family():
    base, a, b = tree(0), tree(1), tree(2)
    seen = []

    def evaluate(params):  # scores read off the parameters; the models are kept to check them
        seen.append(params)
        x = float(params["params"]["embed_pos"][0, 0])
        y = float(params["params"]["out"]["kernel"][0, 0])
        return {"train": {"s": x, "t": y}, "test": {"s": -x, "t": -y}}

    reach = lm_analysis.reachability(base, a, b, evaluate, weights=[0, 0.25, 1], lambdas=[0.5, 1.0])
    linear, swaps, arithmetic = seen[:3], seen[3:19], seen[19:]
    assert len(seen) == 3 + 16 + 2 and reach["swap"]["complete"] and len(reach["swap"]["points"]) == 16
    for w, m in zip([0, 0.25, 1], linear):
        np.testing.assert_allclose(flat(m), (1 - w) * flat(a) + w * flat(b), rtol=1e-6, atol=1e-6)
    for lam, m in zip([0.5, 1.0], arithmetic):
        np.testing.assert_allclose(flat(m), flat(base) + lam * (flat(a) + flat(b) - 2 * flat(base)), atol=1e-5)
    assignments = set()
    for point, m in zip(reach["swap"]["points"], swaps):  # each unit wholly from a or from b
        from_b = point["from_b"]
        assignments.add(tuple(from_b.values()))
        for path, x, xa, xb in zip(lm_analysis.leaf_paths(m), jax.tree.leaves(m), jax.tree.leaves(a),
                                   jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, xb if from_b[lm_analysis.transformer_unit(path)] else xa)
    assert len(assignments) == 16
    for family in ("linear", "swap", "task_arithmetic"):  # best = highest mean of the training scores
        points = reach[family]["points"]
        assert all(p["train_mean"] == pytest.approx(np.mean(list(p["train"].values()))) for p in points)
        assert reach[family]["best"] is points[int(np.argmax([p["train_mean"] for p in points]))]
    summary = lm_analysis.reachability_summary(reach)
    assert summary["linear"]["weight"] == reach["linear"]["best"]["weight"]
    assert summary["swap"]["test_mean"] == pytest.approx(np.mean(list(reach["swap"]["best"]["test"].values())))


def test_skill_sets_and_evaluator():
    train, test, prompts = lm_analysis.skill_sets(("addition", "reversal"), (7, 3), 5, seed=1)
    assert [len(train[s][0]) for s in train] == [7, 3] and all(len(test[s][0]) == 5 for s in test)
    rng = np.random.default_rng(1)  # the test questions come first, as experiments/lm_skills.py draws them
    expected = skills.questions("addition", 5, rng) + skills.questions("reversal", 5, rng)
    assert prompts == {p for p, _ in expected}
    assert not {skills.decode(q) for p, _ in train.values() for q in np.asarray(p)} & prompts
    # The evaluator on a tiny model (train = test here, one shape to compile): addition by
    # exact match, reversal by partial credit, from the decoded tokens.
    model = lm_models.make_model(lm_models.Training(d_model=16, num_layers=1, num_heads=2))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, model.max_len), jnp.int32))
    got = lm_analysis.skill_evaluator(model, test, test)(params)
    answers = {s: np.asarray(test[s][1]) for s in test}
    decoded = {s: np.asarray(jax.jit(decoded_scores(model, lambda d, a: d))(params, test[s])) for s in test}
    right = {s: (decoded[s] == answers[s]) & ((decoded[s] != 0) | (answers[s] != 0)) for s in test}
    counted = {s: (decoded[s] != 0) | (answers[s] != 0) for s in test}
    assert got["test"] == got["train"]
    assert got["test"]["addition"] == pytest.approx(np.mean(np.all(decoded["addition"] == answers["addition"], 1)))
    assert got["test"]["reversal"] == pytest.approx(np.mean(right["reversal"].sum(1) / counted["reversal"].sum(1)))


def test_finetuning_options_touch_only_their_parameters():
    assert lm_models.Training().tag() == (  # pair (a)'s cache tag must never change
        "lm_d128_l3_h4_b128_p60000_s0_base1500_lr0.001_copy0.4-addition_short0.3-reversal_short0.3"
        "_addition-reversal_ft1000_lr0.0003_copy0.2_addition_short0.15_reversal_short0.15")
    assert not lm_models.Training().delta_finetuning()
    with pytest.raises(ValueError, match="one regex per specialist"):
        lm_models.Training(finetune_params=("mlp",))
    base = tree(0)  # (compiling a training step takes seconds: the delta's structure is what matters)
    rng = np.random.default_rng(0)
    for pattern, rank in (("layer_0/", 0), ("", 2), ("attn", 1)):
        delta, params_of = lm_models.delta_parametrization(base, jax.random.key(1), pattern, rank)
        jax.tree.map(np.testing.assert_array_equal, params_of(delta), base)  # training starts at the base
        delta = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), delta)
        for path, x, o in zip(lm_analysis.leaf_paths(base), jax.tree.leaves(params_of(delta)), jax.tree.leaves(base)):
            changed = not np.allclose(x, o)
            if rank:  # only the blocks' kernels, each by a matrix of rank <= `rank`
                assert changed == (pattern in path and "layer_" in path and path.endswith("kernel")), path
                assert not changed or np.linalg.matrix_rank(np.asarray(x - o), tol=1e-5) == rank
            else:
                assert changed == (pattern in path), path
    with pytest.raises(ValueError, match="no parameter matches"):
        lm_models.delta_parametrization(base, jax.random.key(1), "embed", rank=2)
