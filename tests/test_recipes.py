"""The recipe archive (m2n2_jax/recipes.py, M2N2(archive="recipes")): its primitives
against NumPy references, and runs equal to the model archive's."""

import bisect
import json

import jax
import jax.numpy as jnp
import numpy as np
import problems as P
import pytest

import m2n2_jax as mj
from m2n2_jax import recipes
from m2n2_jax.merge import WORD, leaf_groups
from m2n2_jax.tasks import digits

S = 3  # seeds


def np_build(seeds, cut_list, recipe, groups):
    """Reference: coordinate d of group g (group-local flat index) takes segment
    #{cuts of g <= d}; the leaf is sum_s recipe[g, segment, s] seed_s[d], in float64."""
    out, offsets = [], [0] * len(cut_list)
    for g, stacked in zip(groups, jax.tree.leaves(seeds)):
        flat = np.asarray(stacked, np.float64).reshape(stacked.shape[0], -1)
        d = offsets[g] + np.arange(flat.shape[1])
        segment = np.array([bisect.bisect_right(cut_list[g], x) for x in d])
        out.append((np.asarray(recipe)[g][segment] * flat.T).sum(1).reshape(stacked.shape[1:]))
        offsets[g] += flat.shape[1]
    return out


def cut_array(cut_list, capacity):
    """(G, capacity, 2) int32 words of sorted cut lists, sentinel-padded."""
    cuts = np.zeros((len(cut_list), capacity, 2), np.int32)
    cuts[..., 0] = recipes.SENTINEL
    for g, ks in enumerate(cut_list):
        for i, k in enumerate(sorted(ks)):
            cuts[g, i] = divmod(k, WORD)
    return jnp.asarray(cuts)


def stacked_seeds(shapes, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), len(shapes))
    return {f"l{i}": jax.random.normal(k, (S,) + s).astype(dtype) for i, (k, s) in enumerate(zip(keys, shapes))}


# Leaves of every kind: (40, 50) rows of 50, whose rows hold at most two cuts each here
# (the row plan) or three (every coordinate searched), vectors, a scalar, rank 3.
SHAPES = ((5, 4), (7,), (40, 50), (), (2, 3, 4))


@pytest.mark.parametrize("groups", [None, (0, 1, 0, 1, 1)])
def test_build_takes_each_coordinates_segment(groups):
    """Cuts at a leaf's first and last coordinates, a row boundary, inside a row, at the
    group's start and twice at one place: an off-by-one in a segment index, a cut or a
    group boundary changes coordinates by a whole coefficient. Without groups, row 3 of
    the (40, 50) leaf holds three cuts (every coordinate searched); with groups, two
    equal ones (the row plan)."""
    seeds = stacked_seeds(SHAPES)
    g = (0,) * len(SHAPES) if groups is None else groups
    if groups is None:  # leaves at 0, 20, 27 (rows of 50), 2027 (a scalar), 2028
        cut_list = [[0, 20, 21, 21, 26, 27, 27 + 150, 27 + 157, 27 + 160, 27 + 163, 27 + 1999, 2027, 2028, 2051]]
    else:  # group 0: (5, 4) at 0, (40, 50) at 20; group 1: (7,) at 0, () at 7, (2, 3, 4) at 8
        cut_list = [[0, 20, 21, 21, 20 + 150, 20 + 157, 20 + 157, 2019], [6, 7, 8, 31]]
    capacity = max(len(ks) for ks in cut_list) + 2
    recipe = jax.random.normal(jax.random.key(1), (len(cut_list), capacity + 1, S))
    built = jax.jit(lambda r: recipes.build(seeds, cut_array(cut_list, capacity), r, groups))(recipe)
    for got, want in zip(jax.tree.leaves(built), np_build(seeds, cut_list, recipe, g)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [None, (0, 1, 0, 1, 1)])
def test_reductions_are_the_sums_of_the_two_recipes_models(groups):
    """<A, B>, |A|^2, |B|^2 per group of the models of two recipes, against float64 sums
    of the reference builds, over the cut lists of the build test (both plans); the
    reductions see each coordinate's segment once for both recipes, so a recipe or a
    group taken for the other changes the sums."""
    seeds = stacked_seeds(SHAPES)
    g = (0,) * len(SHAPES) if groups is None else groups
    cut_list = ([[0, 20, 21, 21, 26, 27, 27 + 150, 27 + 157, 27 + 160, 27 + 163, 27 + 1999, 2027, 2028, 2051]]
                if groups is None else [[0, 20, 21, 21, 20 + 150, 20 + 157, 20 + 157, 2019], [6, 7, 8, 31]])
    capacity = max(len(ks) for ks in cut_list) + 2
    ra, rb = jax.random.normal(jax.random.key(2), (2, len(cut_list), capacity + 1, S))
    book = recipes.Recipes(seeds, cut_array(cut_list, capacity), ra, tuple(g))
    got = jax.jit(recipes.reductions)(book, ra, rb)
    a, b = np_build(seeds, cut_list, ra, g), np_build(seeds, cut_list, rb, g)
    want = np.zeros((3, len(cut_list)))
    for group, x, y in zip(g, a, b):
        want[:, group] += [np.sum(x * y), np.sum(x * x), np.sum(y * y)]
    np.testing.assert_allclose(np.stack([np.asarray(x) for x in got]), want, rtol=1e-5)
    assert not np.allclose(want[0], want[1])  # <A, B> is not |A|^2: the two recipes differ


# Leaves that repeat their shapes (a Llama's layers), in two groups: group 0 holds
# (5, 4) at 0, (7,) at 20, (40, 50) at 27; group 1 (40, 50) at 0, (5, 4) at 2000,
# (7,) at 2020, (5, 4) at 2027.
REPEATED, REPEATED_GROUPS = ((5, 4), (40, 50), (7,), (5, 4), (40, 50), (7,), (5, 4)), (0, 1, 0, 1, 0, 1, 1)
REPEATED_CUTS = [[3, 20, 25, 27 + 50, 27 + 120, 27 + 121, 2026], [0, 1999, 2000, 2005, 2019, 2020, 2023, 2027, 2040]]


def test_leaves_of_one_shape_share_one_loop_and_keep_their_own_group_offset_and_seeds():
    """The angle's sums, and the build's lookups of where the cuts fall, run leaves of
    one shape and dtype through one loop with their group and offset traced
    (`recipes._each_leaf`): against the NumPy reference, a leaf given another's group,
    offset or seeds would change by whole coefficients. The top level of the sums'
    program holds one loop per repeated shape and no per-leaf search (the code XLA:CPU
    keeps per leaf); the build's, one loop per repeated shape besides each leaf's
    choice of plan."""
    seeds = stacked_seeds(REPEATED)
    capacity = max(len(ks) for ks in REPEATED_CUTS) + 2
    cuts = cut_array(REPEATED_CUTS, capacity)
    ra, rb = jax.random.normal(jax.random.key(3), (2, 2, capacity + 1, S))
    build = lambda r: recipes.build(seeds, cuts, r, REPEATED_GROUPS)
    built = jax.jit(build)(ra)
    a, b = np_build(seeds, REPEATED_CUTS, ra, REPEATED_GROUPS), np_build(seeds, REPEATED_CUTS, rb, REPEATED_GROUPS)
    for got, want in zip(jax.tree.leaves(built), a):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    book = recipes.Recipes(seeds, cuts, ra, REPEATED_GROUPS)
    want = np.zeros((3, 2))
    for group, x, y in zip(REPEATED_GROUPS, a, b):
        want[:, group] += [np.sum(x * y), np.sum(x * x), np.sum(y * y)]
    np.testing.assert_allclose(np.stack([np.asarray(x) for x in jax.jit(recipes.reductions)(book, ra, rb)]), want,
                               rtol=1e-5)
    loops = lambda fn: [e.primitive.name for e in jax.make_jaxpr(fn)(ra).eqns if e.primitive.name in ("scan", "while")]
    assert loops(lambda r: recipes.reductions(book, r, rb)) == ["scan"] * 3
    assert loops(build) == ["scan"] * 3


def test_build_counts_a_cut_at_its_own_coordinate():
    """The counter-case of `<=` against `<`: one cut at k, coefficient 1 on seed 0
    before it and on seed 1 from it on; coordinate k is seed 1's."""
    seeds = stacked_seeds(((10,), (4, 300)))
    for k in (3, 10, 10 + 300, 10 + 301):
        recipe = jnp.zeros((1, 2, S)).at[0, 0, 0].set(1.0).at[0, 1, 1].set(1.0)
        built = recipes.build(seeds, cut_array([[k]], 1), recipe)
        flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(built)])
        seed = [np.concatenate([np.asarray(x[s]).ravel() for x in jax.tree.leaves(seeds)]) for s in (0, 1)]
        np.testing.assert_array_equal(flat[:k], seed[0][:k])
        np.testing.assert_array_equal(flat[k:], seed[1][k:])


def test_build_keeps_each_leafs_dtype_and_a_seed_recipe_is_the_seed_bit_for_bit():
    seeds = stacked_seeds(((6, 5), (5,)), jnp.bfloat16)
    for s in range(S):
        built = recipes.build(seeds, cut_array([[7, 12]], 4), recipes.seed_recipe(s, S, 1, 4))
        for got, stacked in zip(jax.tree.leaves(built), jax.tree.leaves(seeds)):
            assert got.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(stacked[s], np.float32))


def test_insert_cuts_keeps_each_list_sorted_and_names_the_split_segment():
    rng = np.random.default_rng(0)
    capacity, lists = 6, [[], [5, 9]]
    cuts = cut_array(lists, capacity)
    for _ in range(4):
        ks = rng.integers(0, 12, size=2)
        hi, lo = (jnp.asarray(x, jnp.int32) for x in np.divmod(ks, WORD))
        cuts, position, full = recipes.insert_cuts(cuts, hi, lo)
        for g, k in enumerate(ks):
            assert int(position[g]) == bisect.bisect_right(lists[g], k)
            bisect.insort_right(lists[g], int(k))
        np.testing.assert_array_equal(cuts, cut_array(lists, capacity))
        assert not np.asarray(full).any()
    cuts, _, full = recipes.insert_cuts(cuts, jnp.zeros(2, jnp.int32), jnp.ones(2, jnp.int32))
    assert list(np.asarray(full)) == [False, True]  # group 1 held 6 cuts: nothing inserted there
    np.testing.assert_array_equal(cuts[1], cut_array(lists, capacity)[1])


def test_a_cut_beyond_one_word_is_ordered_by_both_words():
    cuts = cut_array([[WORD - 1, WORD + 5]], 4)
    cuts, position, _ = recipes.insert_cuts(cuts, jnp.asarray([1], jnp.int32), jnp.asarray([0], jnp.int32))
    assert int(position[0]) == 1
    np.testing.assert_array_equal(cuts[0, :3], [[0, WORD - 1], [1, 0], [1, 5]])


def test_split_segments_duplicates_the_cut_segment_and_moves_later_ones_up():
    r = jnp.arange(2 * 2 * 5 * S, dtype=jnp.float32).reshape(2, 2, 5, S)  # (N, G, C + 1, S)
    out = np.asarray(recipes.split_segments(r, jnp.asarray([1, 3])))
    for n in range(2):
        np.testing.assert_array_equal(out[n, 0], np.asarray(r)[n, 0][[0, 1, 1, 2, 3]])
        np.testing.assert_array_equal(out[n, 1], np.asarray(r)[n, 1][[0, 1, 2, 3, 3]])


def test_child_recipe_is_the_merge_before_and_after_the_cut():
    ra, rb = (jax.random.normal(k, (2, 4, S)) for k in jax.random.split(jax.random.key(2)))
    c_a, c_b = jnp.asarray([[0.2, 0.7], [0.4, 0.1]]), jnp.asarray([[0.8, 0.3], [0.5, 0.9]])
    out = np.asarray(recipes.child_recipe(ra, rb, c_a, c_b, jnp.asarray([0, 2])))
    for g, position in enumerate((0, 2)):
        for j in range(4):
            i = 0 if j <= position else 1
            np.testing.assert_allclose(out[g, j], c_a[g, i] * ra[g, j] + c_b[g, i] * rb[g, j], rtol=1e-6)


SEEDS = [P.init_model(jax.random.key(i)) for i in range(3)]
VARIANTS = {"m2n2": {}, "no-splitpoint": {"split_point": False}, "groups": {"groups": digits.layer_of},
            "no-attraction": {"attraction": False}, "no-crossover": {"crossover": False}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_recipe_archive_runs_as_the_model_archive(variant):
    """Same seeds, keys and budget (warm-up 5): the same archive scores, curves and
    parents at the end; the best models agree to float32 rounding."""
    out = {}
    for archive in ("models", "recipes"):
        algo = mj.M2N2(archive_size=6, mutation=False, archive=archive, max_children=120, **VARIANTS[variant])
        params = algo.default_params().replace(warmup=jnp.int32(5))
        out[archive] = mj.run(algo, P.KEYS, P.score_fn, P.TRAIN, 123, params=params, seed_models=SEEDS,
                              test_data=P.TEST, log_every=20, progress=False)
    a, b = out["models"], out["recipes"]
    np.testing.assert_array_equal(a.state.scores, b.state.scores)
    np.testing.assert_array_equal(a.state.occupied, b.state.occupied)
    np.testing.assert_array_equal(a.test_score, b.test_score)
    for x, y in zip(jax.tree.leaves(a.best_models), jax.tree.leaves(b.best_models)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-6)


def test_each_step_draws_the_same_parents_from_either_archive():
    algos = {a: mj.M2N2(archive_size=5, mutation=False, archive=a, max_children=40) for a in ("models", "recipes")}
    params = algos["models"].default_params()
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *SEEDS)
    seed_scores = jax.vmap(lambda m: P.score_fn(m, P.TRAIN))(stacked)
    states = {a: algo.init(jax.random.key(0), stacked, seed_scores, params) for a, algo in algos.items()}
    step = jax.jit(lambda algo, s, k: mj.step(algo, P.score_fn, s, k, params, P.TRAIN)[0], static_argnums=0)
    parents = jax.jit(lambda algo, s, k: algo.parents(k, s, s.asked, params), static_argnums=0)
    for i in range(40):
        key = jax.random.key(100 + i)
        ask_key = jax.random.split(jax.random.split(key)[0], 4)[0]  # the key `ask` draws parents with
        drawn = {a: parents(algo, states[a], ask_key) for a, algo in algos.items()}
        assert [int(x) for x in drawn["models"]] == [int(x) for x in drawn["recipes"]], i
        states = {a: step(algo, states[a], key) for a, algo in algos.items()}
        np.testing.assert_array_equal(states["models"].scores, states["recipes"].scores)


def test_what_leaves_the_seeds_span_is_refused_by_name():
    ok = {"archive": "recipes", "mutation": False, "max_children": 10}
    for change, name in (({"mutation": True}, "mutation"), ({"task_vectors": True}, "task_vectors"),
                         ({"population_size": 2}, "population_size"), ({"max_children": None}, "max_children")):
        with pytest.raises(ValueError, match=name):
            mj.M2N2(**{**ok, **change})
    with pytest.raises(ValueError, match="archive must be one of"):
        mj.M2N2(archive="disk")
    mj.M2N2(archive="recipes", mutation=False, split_point=False)  # no cuts: no capacity needed


def test_a_budget_past_max_children_is_refused_before_any_work():
    algo = mj.M2N2(archive_size=4, mutation=False, archive="recipes", max_children=10)
    with pytest.raises(ValueError, match="max_children = 10 is below the 11 children"):
        mj.run(algo, P.KEYS[:1], P.score_fn, P.TRAIN, 3 + 11, seed_models=SEEDS, progress=False)
    mj.run(algo, P.KEYS[:1], P.score_fn, P.TRAIN, 3 + 10, seed_models=SEEDS, progress=False)


def test_past_its_capacity_a_manual_loop_gets_a_nan_child_not_an_approximation():
    algo = mj.M2N2(archive_size=4, mutation=False, archive="recipes", max_children=2)
    params = algo.default_params()
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *SEEDS)
    state = algo.init(jax.random.key(0), stacked, jax.vmap(lambda m: P.score_fn(m, P.TRAIN))(stacked), params)
    for i in range(3):
        children, state = algo.ask(jax.random.key(i), state, params)
        finite = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(children))
        assert finite == (i < 2)
        if finite:
            state = algo.tell(jax.random.key(i), state, children, P.score_fn(
                jax.tree.map(lambda x: x[0], children), P.TRAIN)[None], params)


def test_a_recipe_archive_keeps_its_seeds_in_host_memory_with_the_same_results():
    algo = mj.M2N2(archive_size=6, mutation=False, archive="recipes", max_children=60)
    kw = dict(seed_models=SEEDS, test_data=P.TEST, log_every=20, progress=False)
    device = mj.run(algo, P.KEYS[:2], P.score_fn, P.TRAIN, 63, **kw)
    host = mj.run(algo, P.KEYS[:2], P.score_fn, P.TRAIN, 63, archive_memory="pinned_host", **kw)
    assert host.state.recipes.seeds[0].kernel.sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(device.test_score, host.test_score)
    for x, y in zip(jax.tree.leaves(device.best_models), jax.tree.leaves(host.best_models)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_returned_model_is_its_recipe_built_bit_for_bit():
    algo = mj.M2N2(archive_size=6, mutation=False, archive="recipes", max_children=60, groups=digits.layer_of)
    result = mj.run(algo, P.KEYS[:2], P.score_fn, P.TRAIN, 63, seed_models=SEEDS, progress=False)
    for r in range(2):
        state = jax.tree.map(lambda x: x[r], result.state)
        best = int(np.argmax(np.where(state.occupied, state.scores.mean(1), -np.inf)))
        rebuilt = jax.jit(lambda s, i: s.recipes.build(s.models[i]))(state, best)
        for x, y in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(result.best_models)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y)[r])
    assert state.recipes.groups == leaf_groups(SEEDS[0], digits.layer_of)


def _dir_bytes(path) -> int:
    import os

    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_a_recipe_checkpoint_holds_no_seed_resumes_bit_for_bit_and_refuses_other_seeds(tmp_path):
    wide = [digits.mlp_from_flat(jax.random.normal(jax.random.key(i), (P.D,)), P.SIZES) for i in range(3)]
    kw = dict(seed_models=wide, test_data=P.TEST, log_every=20, progress=False, steps_per_call=20)
    sizes = {}
    for archive in ("models", "recipes"):
        algo = mj.M2N2(archive_size=6, mutation=False, archive=archive, max_children=60)
        full = mj.run(algo, P.KEYS[:2], P.score_fn, P.TRAIN, 63, **kw)
        where = tmp_path / archive
        part = mj.run(algo, P.KEYS[:2], P.score_fn, P.TRAIN, 63, checkpoint=mj.Checkpointing(str(where), every=20),
                      time_limit=1e-9, **kw)
        assert part.stopped_by_time_limit and part.passes[-1] == 23
        sizes[archive] = _dir_bytes(where)
        resumed = mj.run(algo, P.KEYS[:2], P.score_fn, P.TRAIN, 63,
                         checkpoint=mj.Checkpointing(str(where), every=20, resume=True), **kw)
        for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(full.test_score, resumed.test_score)
    other = wide[:2] + [SEEDS[2]]
    with pytest.raises(ValueError, match="seeds model 2: checkpoint"):
        mj.run(algo, P.KEYS[:2], P.score_fn, P.TRAIN, 63, **{**kw, "seed_models": other},
               checkpoint=mj.Checkpointing(str(tmp_path / "recipes"), every=20, resume=True))
    # 6 models of 8 -> 16 -> 4 in the archive against 3 seeds left out and 6 recipes.
    assert sizes["recipes"] < sizes["models"] - 6 * P.D * 4 // 2


def test_a_recipe_archive_without_cuts_checkpoints_and_resumes_bit_for_bit(tmp_path):
    """Without split points the recipes hold zero cuts: a zero-size leaf, which orbax
    refuses to save; the checkpoint leaves it out and the resumed run is the same."""
    algo = mj.M2N2(archive_size=6, mutation=False, archive="recipes", split_point=False)
    kw = dict(seed_models=SEEDS, log_every=20, progress=False, steps_per_call=20)
    full = mj.run(algo, P.KEYS[:2], P.score_fn, P.TRAIN, 63, **kw)
    assert full.state.recipes.cuts.size == 0
    where = str(tmp_path / "cuts")
    part = mj.run(algo, P.KEYS[:2], P.score_fn, P.TRAIN, 63, checkpoint=mj.Checkpointing(where, every=20),
                  time_limit=1e-9, **kw)
    assert part.passes[-1] == 23
    resumed = mj.run(algo, P.KEYS[:2], P.score_fn, P.TRAIN, 63,
                     checkpoint=mj.Checkpointing(where, every=20, resume=True), **kw)
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_recipe_as_json_rebuilds_the_returned_model_bit_for_bit_and_names_a_wrong_seed():
    algo = mj.M2N2(archive_size=6, mutation=False, archive="recipes", max_children=60, groups=digits.layer_of)
    result = mj.run(algo, P.KEYS[:1], P.score_fn, P.TRAIN, 63, seed_models=SEEDS, progress=False)
    state = jax.tree.map(lambda x: x[0], result.state)
    best = int(np.argmax(np.where(state.occupied, state.scores.mean(1), -np.inf)))
    recipe = json.loads(json.dumps(recipes.to_json(state.recipes, state.models[best], ["a", "b", "c"])))
    assert [s["name"] for s in recipe["seeds"]] == ["a", "b", "c"]
    kernel = recipe["leaves"][0]
    assert kernel["path"] == "0/kernel" and kernel["ranges"][0][0] == 0 and kernel["ranges"][-1][1] == 8 * 16
    rebuilt = recipes.from_json(recipe, SEEDS)
    for x, y in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(result.best_models)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y)[0])
    with pytest.raises(ValueError, match="seed 'b': the model given differs"):
        recipes.from_json(recipe, [SEEDS[0], SEEDS[2], SEEDS[1]])
