import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from m2n2_jax.merge import (
    group_sizes,
    leaf_groups,
    num_params,
    pair_reductions,
    slerp,
    slerp_coefficients,
    split_point_slerp,
)


def np_split_slerp(a, b, w, k, eps=1e-6):
    """NumPy reference of docs/algorithm.md#merge on flat float64 vectors."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)
    omega = np.arccos(cos)
    wd = np.where(np.arange(a.size) < k, w, 1 - w)
    if np.sin(omega) < eps:
        return (1 - wd) * a + wd * b
    return np.sin((1 - wd) * omega) / np.sin(omega) * a + np.sin(wd * omega) / np.sin(omega) * b


def random_tree(rng, dtype=jnp.float32):
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), dtype),
                  "bias": jnp.asarray(rng.normal(size=(5,)), dtype)},
        "conv": jnp.asarray(rng.normal(size=(2, 3, 4)), dtype),
        "scale": jnp.asarray(rng.normal(size=()), dtype),
    }


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0], np.float64)


# Leaf order is conv (24), dense/bias (5), dense/kernel (30), scale (1): D = 60.
@pytest.mark.parametrize("k", [0, 1, 23, 24, 29, 30, 45, 59, 60])
def test_split_point_slerp_matches_numpy(transform, k):
    rng = np.random.default_rng(k)
    a, b = random_tree(rng), random_tree(rng)
    assert num_params(a) == 60
    w = float(rng.uniform())
    child = transform(split_point_slerp)(a, b, w, k)
    chex.assert_trees_all_equal_shapes_and_dtypes(child, a)
    np.testing.assert_allclose(flat(child), np_split_slerp(flat(a), flat(b), w, k), rtol=2e-5, atol=2e-6)


def test_split_point_at_ends_gives_plain_slerps(rng):
    a, b = random_tree(rng), random_tree(rng)
    w = 0.3
    chex.assert_trees_all_close(split_point_slerp(a, b, w, 60), slerp(a, b, w), atol=1e-6)
    chex.assert_trees_all_close(split_point_slerp(a, b, w, 0), slerp(a, b, 1 - w), atol=1e-6)
    np.testing.assert_allclose(flat(slerp(a, b, w)), np_split_slerp(flat(a), flat(b), w, 60), rtol=2e-5, atol=2e-6)


def test_ratio_zero_returns_first_parent_and_one_the_second(rng):
    a, b = random_tree(rng), random_tree(rng)
    chex.assert_trees_all_close(slerp(a, b, 0.0), a, atol=1e-6)
    chex.assert_trees_all_close(slerp(a, b, 1.0), b, atol=1e-5)


def test_parallel_parents_fall_back_to_linear(rng):
    a = random_tree(rng)
    b = jax.tree.map(lambda x: 2.0 * x, a)  # sin(Omega) = 0
    child = slerp(a, b, 0.25)
    chex.assert_tree_all_finite(child)
    chex.assert_trees_all_close(child, jax.tree.map(lambda x: 1.25 * x, a), rtol=1e-5)
    zero = jax.tree.map(jnp.zeros_like, a)
    chex.assert_trees_all_close(slerp(zero, a, 0.5), jax.tree.map(lambda x: 0.5 * x, a), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_leaves_keep_dtype_and_match_float32(rng, dtype):
    a, b = random_tree(rng, dtype), random_tree(rng, dtype)
    child = split_point_slerp(a, b, 0.4, 17)
    chex.assert_trees_all_equal_dtypes(child, a)
    ref = np_split_slerp(flat(a), flat(b), 0.4, 17)
    np.testing.assert_allclose(flat(child), ref, rtol=2e-2, atol=2e-2)


def test_merge_is_vmappable(rng):
    a, b = random_tree(rng), random_tree(rng)
    ws = jnp.array([0.1, 0.5, 0.9])
    ks = jnp.array([0, 30, 60])
    batched = jax.vmap(split_point_slerp, in_axes=(None, None, 0, 0))(a, b, ws, ks)
    for i in range(3):
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], batched), split_point_slerp(a, b, ws[i], ks[i]),
                                    atol=1e-6)


def mixed_tree(rng, num_leaves=23):
    """Shapes of random ranks 0-3 and dtypes cycling float32, bfloat16, float16."""
    dtypes = [jnp.float32, jnp.bfloat16, jnp.float16]
    shapes = [tuple(int(s) for s in rng.integers(1, 5, size=rng.integers(0, 4))) for _ in range(num_leaves)]
    return shapes, [dtypes[i % 3] for i in range(num_leaves)]


def build(rng, shapes, dtypes):
    return {f"l{i:02d}": jnp.asarray(rng.normal(size=s), d) for i, (s, d) in enumerate(zip(shapes, dtypes))}


def test_leafwise_merge_equals_flat_merge_on_many_mixed_dtype_leaves():
    rng = np.random.default_rng(7)
    shapes, dtypes = mixed_tree(rng)
    a, b = build(rng, shapes, dtypes), build(rng, shapes, dtypes)
    sizes = [int(np.prod(s)) for s in shapes]
    d = sum(sizes)
    bounds = list(np.cumsum(sizes))
    ends = [0, d, bounds[0], bounds[5], bounds[11] + 1, bounds[17] - 1, d // 2]
    to32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
    flat_a, unravel = ravel_pytree(to32(a))
    flat_b, _ = ravel_pytree(to32(b))
    for k in ends:
        w = float(rng.uniform())
        child = jax.jit(split_point_slerp)(a, b, w, k)
        chex.assert_trees_all_equal_shapes_and_dtypes(child, a)
        # The flat merge: one concatenated float32 vector, unraveled and cast back per leaf.
        flat_child = unravel(split_point_slerp({"v": flat_a}, {"v": flat_b}, w, k)["v"])
        flat_child = jax.tree.map(lambda x, ref: x.astype(ref.dtype), flat_child, a)
        for name in a:
            np.testing.assert_allclose(np.asarray(child[name], np.float32), np.asarray(flat_child[name], np.float32),
                                       rtol=1e-2 if a[name].dtype != jnp.float32 else 1e-5, atol=1e-2, err_msg=name)
        # And both equal the NumPy reference on the float64 vectors.
        ref = np_split_slerp(flat(to32(a)), flat(to32(b)), w, k)
        np.testing.assert_allclose(flat(to32(child)), ref, rtol=2e-2, atol=2e-2)
        f32 = np.concatenate([np.full(s, dt == jnp.float32) for s, dt in zip(sizes, dtypes)])
        np.testing.assert_allclose(flat(to32(child))[f32], ref[f32], rtol=2e-5, atol=2e-6)


# --- parameter groups and the antiparallel guard --------------------------------------

def by_top_key(path):
    """conv, dense (kernel and bias) and scale: three groups, leaves interleaved in order."""
    return path.split("/")[0]


def test_leaf_groups_label_leaves_by_path_in_order_of_first_appearance(rng):
    tree = random_tree(rng)  # leaves: conv, dense/bias, dense/kernel, scale
    assert leaf_groups(tree, None) == (0, 0, 0, 0)
    assert leaf_groups(tree, by_top_key) == (0, 1, 1, 2)
    assert leaf_groups(tree, lambda p: "attn" if "bias" in p or p == "scale" else "rest") == (0, 1, 0, 1)
    assert group_sizes(tree, (0, 1, 0, 1)) == (24 + 30, 5 + 1)


def np_grouped(a, b, ws, ks, groups, eps=1e-6):
    """NumPy reference: each group's leaves concatenated in leaf order, merged by
    `np_split_slerp` as their own vector with their own w, k and angle, put back."""
    la = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(a)]
    lb = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(b)]
    out = [None] * len(la)
    for g in range(max(groups) + 1):
        members = [i for i, gi in enumerate(groups) if gi == g]
        merged = np_split_slerp(np.concatenate([la[i] for i in members]), np.concatenate([lb[i] for i in members]),
                                ws[g], ks[g], eps)
        for i in members:
            out[i], merged = merged[:la[i].size], merged[la[i].size:]
    return np.concatenate(out)


@pytest.mark.parametrize("ks", [(0, 0), (10, 3), (54, 6), (31, 5)])
def test_grouped_split_point_slerp_matches_numpy(transform, ks):
    """Two interleaved groups (conv + dense/kernel, dense/bias + scale) of sizes 54 and 6:
    split points in each group's own ravel order, each group its own ratio and angle."""
    rng = np.random.default_rng(sum(ks))
    a, b = random_tree(rng), random_tree(rng)
    groups = (0, 1, 0, 1)
    ws = jnp.array([0.2, 0.7])
    child = transform(lambda a, b, w, k: split_point_slerp(a, b, w, k, groups=groups))(a, b, ws, jnp.array(ks))
    chex.assert_trees_all_equal_shapes_and_dtypes(child, a)
    np.testing.assert_allclose(flat(child), np_grouped(a, b, np.asarray(ws), ks, groups), rtol=2e-5, atol=2e-6)
    # Not the ungrouped merge: the angles and ratios really differ per group.
    assert not np.allclose(flat(child), np_split_slerp(flat(a), flat(b), 0.2, ks[0]), atol=1e-3)


def test_grouped_slerp_gives_each_group_its_own_ratio_and_angle(rng):
    a, b = random_tree(rng), random_tree(rng)
    groups = (0, 1, 1, 2)
    ws = np.array([0.1, 0.5, 0.8])
    child = slerp(a, b, ws, groups=groups)
    np.testing.assert_allclose(flat(child), np_grouped(a, b, ws, (24, 35, 1), groups), rtol=2e-5, atol=2e-6)


def test_one_group_is_the_ungrouped_merge_bit_for_bit(rng):
    a, b = random_tree(rng, jnp.bfloat16), random_tree(rng, jnp.bfloat16)
    for w, k in [(0.3, 17), (0.9, 0), (0.55, 60)]:
        one = jax.jit(lambda a, b, w, k: split_point_slerp(a, b, w, k, groups=(0, 0, 0, 0)))(
            a, b, jnp.array([w]), jnp.array([k]))
        chex.assert_trees_all_equal(one, jax.jit(split_point_slerp)(a, b, w, k))


def test_groups_must_name_every_leaf(rng):
    a = random_tree(rng)
    with pytest.raises(ValueError, match="groups names 3 leaves"):
        split_point_slerp(a, a, jnp.array([0.5]), jnp.array([3]), groups=(0, 0, 0))


def antiparallel(rng):
    a = random_tree(rng)
    b = jax.tree.map(lambda x: -1.5 * x + 1e-3 * jnp.asarray(rng.normal(size=x.shape), x.dtype), a)
    return a, b


def test_antiparallel_parents_explode_under_the_paper_rule_and_not_with_the_guard(rng):
    """B ~ -1.5 A (sin(Omega) ~ 1e-3): the paper's rule gives coefficients ~ 1 / sin(Omega),
    a child far outside the parents' scale; with mergekit's 0.9995 the merge is linear:
    the child is (1 - w) A + w B, no larger than the parents."""
    a, b = antiparallel(rng)
    scale = max(np.abs(flat(a)).max(), np.abs(flat(b)).max())
    paper = flat(slerp(a, b, 0.3))
    guarded = flat(slerp(a, b, 0.3, dot_threshold=0.9995))
    assert np.abs(paper).max() > 50 * scale
    np.testing.assert_allclose(guarded, 0.7 * flat(a) + 0.3 * flat(b), rtol=1e-5, atol=1e-6)
    assert np.abs(guarded).max() <= scale
    # The guard is inactive for ordinary parents: the same child bit for bit.
    c, d = random_tree(rng), random_tree(rng)
    chex.assert_trees_all_equal(split_point_slerp(c, d, 0.3, 20, dot_threshold=0.9995),
                                split_point_slerp(c, d, 0.3, 20))


def test_path_prefix_groups_a_flax_transformer_by_layer():
    from m2n2_jax.merge import PathPrefix
    from m2n2_jax.tasks.transformer import Transformer

    model = Transformer(40, 14, d_model=16, num_layers=2, num_heads=2)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 14), jnp.int32))
    groups = leaf_groups(params, PathPrefix(2))
    # embed, embed_pos, layer_0 (12 leaves), layer_1 (12), ln_out (2), out (2)
    assert groups == (0, 1) + (2,) * 12 + (3,) * 12 + (4, 4, 5, 5)
    assert PathPrefix(2) == PathPrefix(2) and hash(PathPrefix(2)) == hash(PathPrefix(2)) != hash(PathPrefix(3))


@pytest.mark.parametrize("merge", ["slerp", "split_point_slerp", "vmapped slerp"])
def test_compiled_merge_grows_linearly_with_the_number_of_leaves(merge):
    """The angle's sums over all L leaves are computed once, not copied into each
    leaf's fusion (L^2 operations: a 272-leaf model took 115 s and 8 GB to compile),
    also under vmap over parents (where a conditional would become a select)."""

    def operations(num_leaves: int) -> int:
        shape = (3, 8, 8) if merge == "vmapped slerp" else (8, 8)
        model = {f"w{i:03d}": jax.ShapeDtypeStruct(shape, jnp.float32) for i in range(num_leaves)}
        fn = {"slerp": lambda k, a, b: slerp(a, b, 0.3),
              "split_point_slerp": lambda k, a, b: split_point_slerp(
                  a, b, 0.3, jax.random.randint(k, (), 0, num_params(a))),
              "vmapped slerp": lambda k, a, b: jax.vmap(lambda a, b, w: slerp(a, b, w))(
                  a, b, jax.random.uniform(k, (3,)))}[merge]
        text = jax.jit(fn).lower(jax.random.key(0), model, model).compile().as_text()
        return sum(line.lstrip().startswith("%") for line in text.splitlines())

    small, large = operations(16), operations(128)
    assert large < 12 * small, (small, large)  # 8x the leaves: about 8x the operations; L^2 would be 64x


@pytest.mark.parametrize("shape", [(), (7,), (3, 576), (5, 97), (2, 3, 256), (0, 4)])
def test_pair_reductions_are_the_dot_product_and_squared_norms_like_numpy(shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    y = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    got = np.asarray(jax.jit(pair_reductions)(jnp.asarray(x), jnp.asarray(y)), np.float64)
    x64, y64 = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
    np.testing.assert_allclose(got, [x64 @ y64, x64 @ x64, y64 @ y64], rtol=1e-6, atol=1e-6)


def test_the_angle_of_two_archive_slots_reads_them_where_they_lie():
    """slerp_coefficients of two slots of a stacked archive (`models[i]`) takes no
    temporary memory of a slot's size: the reduction reads the slots in place (three dot
    products took both slots copied out)."""
    models = {"w": jnp.ones((4, 256, 128)), "b": jnp.ones((4, 128))}
    angle = lambda m, i, j: slerp_coefficients(*(jax.tree.map(lambda p: p[k], m) for k in (i, j)), jnp.float32(0.3))
    compiled = jax.jit(angle).lower(models, jnp.int32(1), jnp.int32(2)).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 256 * 128 * 4 // 8
