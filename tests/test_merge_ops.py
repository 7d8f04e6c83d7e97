"""merge_ops against NumPy references (both conventions), against values mergekit 0.1.5
computed (tests/fixtures/mergekit_0.1.5.npz, made by make_mergekit_fixtures.py), and
the rules where the conventions differ.

The models are the fixture's own model sets, and the operators are jitted once at
module level with their numbers (and `normalize`) traced, so the whole file compiles
few programs (compiling is most of its time); `test_eager_matches_jit` runs the two
operators with the most Python (ties, DARE) without jit. No torch or mergekit here.
"""

import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2n2_jax import merge_ops

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "mergekit_0.1.5.npz")
TOL = dict(rtol=1e-5, atol=1e-5)
CONVENTIONS = ("m2n2", "mergekit")


# The operators jitted once each. The wrappers pass every switch and turn every number
# into a float32 (or bool) array, density into shape (K,), so calls that differ only in
# values share one compiled program (compiling dominates this file's time).
def f32(x):
    return np.asarray(x, np.float32)


def per_model(x, k):
    return np.broadcast_to(f32(x), (k,))


_LINEAR = jax.jit(lambda models, w, normalize: merge_ops.linear(models, w, normalize=normalize))
_TASK_ARITHMETIC = jax.jit(lambda base, models, w, normalize, scale: merge_ops.task_arithmetic(
    base, models, w, normalize=normalize, scale=scale))
_SLERP = jax.jit(lambda a, b, t, per_tensor, threshold: merge_ops.slerp(
    a, b, t, per_tensor=per_tensor, dot_threshold=threshold), static_argnums=3)
_TIES = {c: jax.jit(lambda base, models, w, d, normalize, scale, c=c: merge_ops.ties(
    base, models, w, d, normalize=normalize, scale=scale, convention=c)) for c in CONVENTIONS}
_DARE_MASKS = jax.jit(lambda base, models, w, masks, d, normalize, scale, rescale, consensus, convention:
                      merge_ops._dare_with_masks(base, models, w, masks, d, rescale=rescale, sign_consensus=consensus,
                                                 normalize=normalize, scale=scale, convention=convention),
                      static_argnums=(7, 8, 9))
_DARE = jax.jit(lambda key, base, models, w, d, scale: merge_ops.dare(key, base, models, w, d, scale=scale))


def LINEAR(models, w, normalize=True):
    return _LINEAR(list(models), f32(w), np.bool_(normalize))


def TASK_ARITHMETIC(base, models, w, normalize=False, scale=1.0):
    return _TASK_ARITHMETIC(base, list(models), f32(w), np.bool_(normalize), f32(scale))


def SLERP(a, b, t, per_tensor=False, dot_threshold=1.0):
    return _SLERP(a, b, f32(t), per_tensor, f32(dot_threshold))


def _ties(convention, base, models, w, density, normalize=True, scale=1.0):
    return _TIES[convention](base, list(models), f32(w), per_model(density, len(models)), np.bool_(normalize),
                             f32(scale))


TIES = {c: functools.partial(_ties, c) for c in CONVENTIONS}


def DARE_MASKS(base, models, w, masks, density, rescale="inverse", sign_consensus=False, normalize=False, scale=1.0,
               convention="m2n2"):
    masks = [jax.tree.map(lambda m: np.asarray(m, bool), tree) for tree in masks]
    return _DARE_MASKS(base, list(models), f32(w), masks, per_model(density, len(models)), np.bool_(normalize),
                       f32(scale), rescale, sign_consensus, convention)


def DARE(key, base, models, w, density, scale=1.0):
    """`merge_ops.dare` with its default switches (each random DARE is a slow compile)."""
    return _DARE(key, base, list(models), f32(w), per_model(density, len(models)), f32(scale))


@functools.cache
def fixtures():
    data = np.load(FIXTURES)
    arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(str(arrays.pop("header")))


@functools.cache
def model_set(name):
    """The fixture's model set `name` as a list of {tensor: float32 array} (model 0 is
    the base): "k2" and "k3" (a base and 2 or 3 models), "pair" (slerp's two)."""
    arrays, _ = fixtures()
    out = {}
    for key, x in arrays.items():
        parts = key.split("/")
        if parts[0] == name and len(parts) == 3:
            out.setdefault(int(parts[1]), {})[parts[2]] = jnp.asarray(x)
    return [out[i] for i in sorted(out)]


def np_leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def assert_leaves_close(tree, expected, **kw):
    got = np_leaves(tree)
    assert len(got) == len(expected)
    for x, y in zip(got, expected):
        np.testing.assert_allclose(x, y, **{**TOL, **kw})


# --- NumPy references (float64) --------------------------------------------------------

def np_linear(xs, w, normalize):
    out = sum(wi * x for wi, x in zip(w, xs))
    total = np.sum(w)
    return out / (total if abs(total) >= 1e-8 else 1.0) if normalize else out


def np_trim(tau, density, convention):
    """The entries TIES keeps. m2n2: the round(d n) largest magnitudes (at least one),
    every tie of the k-th kept. mergekit: exactly int(d n) (at least one), lower indices
    first among ties; all for d >= 1, none for d <= 0."""
    mag, n = np.abs(tau).ravel(), tau.size
    keep = np.zeros(n, bool)
    if convention == "m2n2":
        k = min(max(int(np.round(density * n)), 1), n)
        keep = mag >= np.sort(mag)[n - k]
    elif density >= 1:
        keep[:] = True
    elif density > 0:
        keep[np.argsort(-mag, kind="stable")[:max(1, int(density * n))]] = True
    return keep.reshape(tau.shape)


def np_combine(deltas, w, normalize, consensus, convention):
    """Mix the weighted task vectors w_i tau_i, deltas (K, ...), of one tensor."""
    deltas = np.asarray(deltas)
    wb = np.asarray(w, np.float64).reshape(-1, *[1] * (deltas.ndim - 1))
    if consensus:
        total = deltas.sum(0)
        sign = np.sign(total) if convention == "m2n2" else np.where(total >= 0, 1.0, -1.0)
        agree = (np.sign(deltas) == sign) & (deltas != 0)
        mixed, divisor = (deltas * agree).sum(0), (wb * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(0), wb.sum()
        divisor = divisor if abs(divisor) >= 1e-8 else 1.0
    return mixed / divisor if normalize else mixed


def np_task_arithmetic(base, models, w, normalize, scale):
    return [o + scale * np_combine([wi * (x - o) for wi, x in zip(w, xs)], w, normalize, False, "m2n2")
            for o, *xs in zip(*map(np_leaves, (base, *models)))]


def np_ties(base, models, w, density, normalize=True, scale=1.0, convention="m2n2"):
    dens = np.broadcast_to(np.asarray(density, np.float64), (len(models),))
    out = []
    for o, *xs in zip(*map(np_leaves, (base, *models))):
        deltas = [wi * np.where(np_trim(x - o, d, convention), x - o, 0.0) for wi, d, x in zip(w, dens, xs)]
        out.append(o + scale * np_combine(deltas, w, normalize, True, convention))
    return out


def np_dare(base, models, w, masks, density, rescale, consensus, normalize, scale, convention):
    dens = np.broadcast_to(np.asarray(density, np.float64), (len(models),))
    out = []
    for j, (o, *xs) in enumerate(zip(*map(np_leaves, (base, *models)))):
        deltas = []
        for i, x in enumerate(xs):
            tau = x - o
            kept = np.where(np_leaves(masks[i])[j] > 0, tau, 0.0)
            if rescale == "inverse":
                kept = kept / dens[i] if dens[i] > 0 else 0 * kept
            elif rescale == "l1":
                before, after = np.abs(tau).sum(), np.abs(kept).sum()
                kept = kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept
            deltas.append(w[i] * kept)
        out.append(o + scale * np_combine(deltas, w, normalize, consensus, convention))
    return out


def np_ties_two_models(o, x, y, density, scale):
    """M2N2 0.1's two-model TIES, entry by entry: trim with round(), all magnitude ties
    kept, the sign of the sum (0 on a tie), the mean of the agreeing values."""
    trimmed = []
    for tau in (x - o, y - o):
        flat = np.abs(tau).ravel()
        k = min(max(int(np.round(density * flat.size)), 1), flat.size)
        trimmed.append(np.where(np.abs(tau) >= np.sort(flat)[flat.size - k], tau, 0.0))
    taus = np.stack(trimmed)
    elected = np.sign(taus.sum(0))
    out = np.zeros_like(o)
    for idx in np.ndindex(o.shape):
        vals = [t[idx] for t in taus if t[idx] != 0 and np.sign(t[idx]) == elected[idx]]
        out[idx] = np.mean(vals) if vals else 0.0
    return o + scale * out


def np_slerp(x, y, t, dot_threshold=1.0, eps=1e-6):
    """Coefficients of M2N2's slerp of two flat vectors (linear where sin < eps or
    |cos| > dot_threshold)."""
    cos = np.clip(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), -1, 1)
    omega = np.arccos(cos)
    if np.sin(omega) < eps or abs(cos) > dot_threshold:
        return 1 - t, t
    return np.sin((1 - t) * omega) / np.sin(omega), np.sin(t * omega) / np.sin(omega)


def np_slerp_per_tensor(x, y, t, dot_threshold, eps=1e-6):
    """mergekit's slerp of one tensor: norms <= eps count as 1."""
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    cos = np.clip(np.sum((x / (nx if nx > eps else 1)) * (y / (ny if ny > eps else 1))), -1, 1)
    if abs(cos) > dot_threshold or np.sin(np.arccos(cos)) < eps:
        return (1 - t) * x + t * y
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * x + np.sin(t * omega) * y) / np.sin(omega)


# --- Each operator against its NumPy reference -----------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
def test_linear_matches_numpy(rng, k):
    models = model_set("k3")[1:k + 1]
    for normalize in (True, False):
        w = rng.uniform(-0.5, 1.5, size=k)
        out = LINEAR(models, w, normalize=normalize)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, models[0])
        assert_leaves_close(out, [np_linear(xs, w, normalize) for xs in zip(*map(np_leaves, models))])


def test_linear_of_two_models_is_the_old_interpolation_and_a_zero_sum_is_guarded():
    a, b = model_set("k2")[1:]
    out = LINEAR([a, b], [0.7, 0.3], normalize=False)
    assert_leaves_close(out, [0.7 * x + 0.3 * y for x, y in zip(np_leaves(a), np_leaves(b))])
    # Unnormalised weights are rescaled to sum 1 by default (mergekit's normalize=True).
    chex.assert_trees_all_close(LINEAR([a, b], [1.4, 0.6]), out, atol=1e-6)
    # Weights summing to zero: no division (mergekit would give inf / NaN).
    assert_leaves_close(LINEAR([a, b], [1.0, -1.0]), [x - y for x, y in zip(np_leaves(a), np_leaves(b))])


def test_slerp_matches_numpy():
    a, b = model_set("pair")
    fa, fb = (np.concatenate([x.ravel() for x in np_leaves(tree)]) for tree in (a, b))
    for t in (0.0, 0.25, 0.7, 1.0):
        for threshold in (1.0, 0.9995):
            ca, cb = np_slerp(fa, fb, t, threshold)
            out = SLERP(a, b, t, dot_threshold=threshold)
            assert_leaves_close(out, [ca * x + cb * y for x, y in zip(np_leaves(a), np_leaves(b))])
            per = SLERP(a, b, t, per_tensor=True, dot_threshold=threshold)
            chex.assert_tree_all_finite(per)
            for name in a:
                if threshold < 1 or name not in ("par", "anti"):  # else ~1/sin(Omega): float32 noise
                    np.testing.assert_allclose(per[name], np_slerp_per_tensor(
                        np.asarray(a[name], np.float64), np.asarray(b[name], np.float64), t, threshold), **TOL)


def test_slerp_dot_threshold_interpolates_near_antiparallel_tensors_linearly():
    a, b = model_set("pair")  # "anti": b = -0.8 a + noise 1e-3, |cos| > 0.9995
    lin = 0.7 * np.asarray(a["anti"], np.float64) + 0.3 * np.asarray(b["anti"], np.float64)
    for threshold, close in ((0.9995, True), (1.0, False)):
        out = SLERP(a, b, 0.3, per_tensor=True, dot_threshold=threshold)["anti"]
        # Without the threshold the coefficients are ~1 / sin(Omega): far from linear.
        assert np.allclose(out, lin, rtol=1e-5, atol=1e-5) == close
    near = {"p": a["anti"]}, {"p": b["anti"]}
    np.testing.assert_allclose(SLERP(*near, 0.3, dot_threshold=0.9995)["p"], lin, rtol=1e-5, atol=1e-5)


def test_slerp_per_tensor_uses_one_angle_per_leaf():
    a, b = model_set("pair")
    # "par" is nearly parallel: its own angle is ~0 (nearly linear), the global one is not.
    per, glob = SLERP(a, b, 0.4, per_tensor=True)["par"], SLERP(a, b, 0.4)["par"]
    lin = 0.6 * np.asarray(a["par"]) + 0.4 * np.asarray(b["par"])
    np.testing.assert_allclose(per, lin, rtol=1e-3, atol=1e-3)
    assert np.abs(np.asarray(glob) - lin).max() > 0.05
    # A zero tensor: mergekit's norm floor gives sin(t pi / 2) b, not t b.
    np.testing.assert_allclose(SLERP(a, b, 0.4, per_tensor=True)["zero"], np.sin(0.2 * np.pi) * b["zero"], rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_task_arithmetic_matches_numpy(rng, k):
    base, *models = model_set("k3")
    models = models[:k]
    for normalize, scale in ((False, 1.0), (True, 0.7), (False, 1.3)):
        w = rng.uniform(0.2, 1.2, size=k)
        out = TASK_ARITHMETIC(base, models, w, normalize=normalize, scale=scale)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, base)
        assert_leaves_close(out, np_task_arithmetic(base, models, w, normalize, scale))
    if k == 2:  # weights (0.5, 0.5) are the average of the two models
        chex.assert_trees_all_close(TASK_ARITHMETIC(base, models, [0.5, 0.5]), LINEAR(models, [1.0, 1.0]), atol=1e-5)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("k", [2, 3])
def test_ties_matches_numpy(rng, convention, k):
    base, *models = model_set(f"k{k}")
    for density in (0.0, 0.2, 0.5, 1.0, rng.uniform(0.1, 0.9, size=k)):
        for normalize in (True, False):
            w = rng.uniform(0.3, 1.5, size=k)
            dens = np.broadcast_to(np.asarray(density, np.float32), (k,))
            out = TIES[convention](base, models, w, dens, normalize=normalize, scale=0.8)
            chex.assert_trees_all_equal_shapes_and_dtypes(out, base)
            assert_leaves_close(out, np_ties(base, models, w, dens, normalize, 0.8, convention))


def test_ties_with_unit_weights_is_the_old_two_model_ties():
    base, a, b = model_set("k2")
    for density, scale in ((0.2, 1.0), (0.5, 0.8), (1.0, 1.0), (0.01, 2.0)):
        out = TIES["m2n2"](base, [a, b], [1.0, 1.0], jnp.full(2, density), scale=scale)
        assert_leaves_close(out, [np_ties_two_models(o, x, y, density, scale)
                                  for o, x, y in zip(*map(np_leaves, (base, a, b)))])


def test_ties_keeps_the_agreeing_mean_and_drops_the_minority():
    base = {"p": jnp.zeros(3)}
    a, b = {"p": jnp.array([1.0, 2.0, -1.0])}, {"p": jnp.array([3.0, -0.5, -3.0])}
    np.testing.assert_allclose(TIES["m2n2"](base, [a, b], [1, 1], 1.0)["p"], [2.0, 2.0, -2.0])
    # Weights: the weighted mean of the agreeing values (normalize), or their weighted sum.
    np.testing.assert_allclose(TIES["m2n2"](base, [a, b], [1, 3], 1.0)["p"], [2.5, 2.0, -2.5])
    np.testing.assert_allclose(TIES["m2n2"](base, [a, b], [1, 3], 1.0, normalize=False)["p"], [10.0, 2.0, -10.0])


# --- Where the conventions differ (each check fails if the rule is swapped) ------------

def one_model_ties(tau, density, convention):
    base = {"p": jnp.zeros(len(tau))}
    return np.asarray(TIES[convention](base, [{"p": jnp.asarray(tau, jnp.float32)}], [1.0], density)["p"])


def test_ties_count_is_round_for_m2n2_and_int_for_mergekit():
    tau = [6.0, -5.0, 4.0, 3.0, -2.0, 1.0]
    # 0.25 * 6 = 1.5: round (half to even) keeps 2, int keeps 1.
    np.testing.assert_array_equal(one_model_ties(tau, 0.25, "m2n2"), [6, -5, 0, 0, 0, 0])
    np.testing.assert_array_equal(one_model_ties(tau, 0.25, "mergekit"), [6, 0, 0, 0, 0, 0])
    # 0.6 * 6 = 3.6: 4 against 3.
    np.testing.assert_array_equal(one_model_ties(tau, 0.6, "m2n2"), [6, -5, 4, 3, 0, 0])
    np.testing.assert_array_equal(one_model_ties(tau, 0.6, "mergekit"), [6, -5, 4, 0, 0, 0])


def test_ties_magnitude_ties_all_kept_by_m2n2_exactly_k_by_mergekit():
    tau = [1.0, 2.0, -3.0, 2.0, -2.0, 0.5]
    # k = 2 (0.4 * 6 = 2.4): -3, then the magnitude 2, held by three entries.
    np.testing.assert_array_equal(one_model_ties(tau, 0.4, "m2n2"), [0, 2, -3, 2, -2, 0])
    np.testing.assert_array_equal(one_model_ties(tau, 0.4, "mergekit"), [0, 2, -3, 0, 0, 0])


def test_sign_tie_gives_zero_for_m2n2_and_plus_for_mergekit():
    base = {"p": jnp.array([10.0, 10.0, 10.0])}
    a, b = {"p": jnp.array([11.0, 12.0, 10.5])}, {"p": jnp.array([9.0, 9.0, 10.25])}  # tau_0: 1 and -1
    np.testing.assert_array_equal(TIES["m2n2"](base, [a, b], [1, 1], 1.0)["p"], [10.0, 12.0, 10.375])
    np.testing.assert_array_equal(TIES["mergekit"](base, [a, b], [1, 1], 1.0)["p"], [11.0, 12.0, 10.375])
    masks = [{"p": jnp.ones(3, bool)}] * 2
    for convention, first in (("m2n2", 10.0), ("mergekit", 11.0)):
        out = DARE_MASKS(base, [a, b], [1, 1], masks, 1.0, sign_consensus=True, normalize=True, convention=convention)
        np.testing.assert_array_equal(out["p"], [first, 12.0, 10.375])


def test_density_zero_is_finite_and_follows_the_convention():
    base, *models = model_set("k2")
    kept_one = TIES["m2n2"](base, models, [1.0, 1.0], 0.0)
    for o, x in zip(np_leaves(base), np_leaves(kept_one)):
        assert np.count_nonzero(x != o) <= 2  # each model's largest entry (the "flat" task vectors are zero)
    assert np.count_nonzero(np_leaves(kept_one)[1] != np_leaves(base)[1]) >= 1
    chex.assert_trees_all_equal(TIES["mergekit"](base, models, [1.0, 1.0], 0.0), base)
    # DARE at density 0 drops everything: the base, not 0 / 0 (more in test_dare_matches_numpy).
    chex.assert_trees_all_equal(DARE(jax.random.key(0), base, models, [1.0, 1.0], 0.0), base)


# --- DARE ------------------------------------------------------------------------------

def np_masks(rng, base, density):
    return [{n: rng.random(x.shape) < d for n, x in base.items()} for d in density]


@pytest.mark.parametrize("rescale,consensus,convention", [
    ("inverse", False, "m2n2"), ("l1", False, "mergekit"), ("none", True, "m2n2"), ("l1", True, "mergekit")])
def test_dare_matches_numpy(rng, rescale, consensus, convention):
    base, *models = model_set("k3")
    w = rng.uniform(0.3, 1.2, size=3)
    for density in ([0.6, 0.6, 0.6], [0.2, 0.5, 0.9], [0.0, 0.0, 0.0]):
        masks = np_masks(rng, base, density)
        for normalize in (False, True):
            out = DARE_MASKS(base, models, w, masks, jnp.asarray(density), rescale=rescale, sign_consensus=consensus,
                             normalize=normalize, scale=0.9, convention=convention)
            chex.assert_tree_all_finite(out)
            assert_leaves_close(out, np_dare(base, models, w, masks, density, rescale, consensus, normalize, 0.9,
                                             convention))
    chex.assert_trees_all_equal(out, base)  # density 0: the base


def test_dare_drops_with_probability_one_minus_density_and_rescales():
    base, a, b = model_set("k2")
    density, scale = 0.4, 0.9
    kept = []
    for seed in range(3):
        out = DARE(jax.random.key(seed), base, [a, b], [1.0, 1.0], density, scale=scale)
        for o, x, y, z in zip(*map(np_leaves, (base, a, b, out))):
            ta, tb = (x - o) / density, (y - o) / density
            # Every entry is one of the four drop patterns (a kept, b kept), rescaled.
            candidates = np.stack([o, o + scale * ta, o + scale * tb, o + scale * (ta + tb)])
            which = np.argmin(np.abs(candidates - z), axis=0)
            np.testing.assert_allclose(np.take_along_axis(candidates, which[None], 0)[0], z, **TOL)
            kept += [np.isin(which, (1, 3)).ravel()[o.ravel() != x.ravel()],
                     np.isin(which, (2, 3)).ravel()[o.ravel() != y.ravel()]]
    kept = np.concatenate(kept)
    assert abs(kept.mean() - density) < 0.1, kept.mean()
    # Another key drops other entries; density 1 keeps all (density is traced: one program).
    other = DARE(jax.random.key(4), base, [a, b], [1.0, 1.0], density, scale=scale)
    assert not np.allclose(other["mat"], out["mat"])
    chex.assert_trees_all_close(DARE(jax.random.key(4), base, [a, b], [1.0, 1.0], 1.0, scale=scale),
                                TASK_ARITHMETIC(base, [a, b], [1.0, 1.0], scale=scale), atol=1e-5)


def test_dare_l1_rescale_keeps_each_task_vectors_l1_norm(rng):
    base, a, _ = model_set("k2")
    masks = np_masks(rng, base, [0.3])
    masks[0]["flat"][:] = True  # a zero task vector, unscaled
    out = DARE_MASKS(base, [a], [1.0], masks, 0.3, rescale="l1")
    for name in base:
        tau, kept = np.asarray(a[name] - base[name], np.float64), np.asarray(out[name] - base[name], np.float64)
        np.testing.assert_allclose(np.abs(kept).sum(), np.abs(tau).sum(), rtol=1e-5)
        assert np.all((kept == 0) | masks[0][name])


def test_dare_without_drop_is_task_arithmetic_or_ties():
    base, *models = model_set("k2")
    w, ones = [0.8, 0.5], [{n: np.ones(x.shape, bool) for n, x in base.items()}] * 2
    for rescale in ("l1", "none"):  # (inverse: 1 / 1)
        out = DARE_MASKS(base, models, w, ones, 1.0, rescale=rescale, scale=0.8, convention="mergekit")
        chex.assert_trees_all_close(out, TASK_ARITHMETIC(base, models, w, scale=0.8), atol=1e-5)
        out = DARE_MASKS(base, models, w, ones, 1.0, rescale=rescale, sign_consensus=True, normalize=True,
                         convention="mergekit")
        chex.assert_trees_all_close(out, TIES["mergekit"](base, models, w, 1.0), atol=1e-5)


# --- mergekit 0.1.5's own values -------------------------------------------------------

def split(flat, like, names):
    """A concatenated fixture vector back into {name: tensor} shaped like `like`."""
    out, start = {}, 0
    for n in names:
        size = like[n].size
        out[n] = flat[..., start:start + size].reshape(*flat.shape[:-1], *like[n].shape)
        start += size
    return out


def run_case(case):
    """Our operator on a fixture case with mergekit's settings and convention="mergekit"
    (per-model densities passed as (K,) so that cases share compiled programs)."""
    arrays, _ = fixtures()
    p, op = case["params"], case["op"]
    models = model_set(case["set"])
    if op == "linear":
        return LINEAR(models[1:], p["weight"], normalize=p["normalize"])
    if op == "slerp":
        return SLERP(models[0], models[1], p["t"], per_tensor=True, dot_threshold=0.9995)
    base, rest = models[0], models[1:]
    if op == "task_arithmetic":
        return TASK_ARITHMETIC(base, rest, p["weight"], normalize=p["normalize"], scale=p["lambda"])
    density = np.broadcast_to(np.asarray(p["density"], np.float32), (len(rest),))
    if op == "ties":
        return TIES["mergekit"](base, rest, p["weight"], density, normalize=p["normalize"], scale=p["lambda"])
    masks = split(arrays[case["name"] + "/mask"].astype(bool), base, case["tensors"])
    masks = [{n: m[i] for n, m in masks.items()} for i in range(len(rest))]
    return DARE_MASKS(base, rest, p["weight"], masks, density, normalize=p["normalize"], scale=p["lambda"],
                      rescale="l1" if p["rescale"] else "none", sign_consensus=op == "dare_ties",
                      convention="mergekit")


@pytest.mark.parametrize("op", ["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_matches_mergekit_fixtures(op):
    arrays, header = fixtures()
    assert header["mergekit"] == "0.1.5"
    cases = [c for c in header["cases"] if c["op"] == op]
    assert len(cases) >= 4
    for case in cases:
        out = run_case(case)
        expected = split(arrays[case["name"] + "/out"], out, case["tensors"])
        for name in case["tensors"]:
            np.testing.assert_allclose(out[name], expected[name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{case['name']} {name}")


def test_matches_mergekit_sparsify_fixtures():
    arrays, header = fixtures()
    trim = jax.jit(lambda tau, d: jnp.where(merge_ops._trim_mask(tau, d, "mergekit"), tau, 0.0))
    rescale = jax.jit(lambda tau, mask: merge_ops._rescaled(tau, mask, 0.5, "l1"))
    cases = [c for c in header["cases"] if c["op"] in ("magnitude", "rescaled_masked_tensor")]
    assert len(cases) > 20
    for case in cases:
        tau, expected = arrays[case["name"] + "/in"], arrays[case["name"] + "/out"]
        if case["op"] == "magnitude":
            # The same entries kept (exactly int(density n) of them), with their values.
            np.testing.assert_array_equal(trim(tau, case["params"]["density"]), expected, err_msg=case["name"])
        else:
            out = rescale(tau, arrays[case["name"] + "/mask"] > 0)
            np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7, err_msg=case["name"])


# --- Without jit, dtypes, traced coefficients, validation -------------------------------

def test_eager_matches_jit():
    base, a, b = ({"tie": m["tie"]} for m in model_set("k2"))
    masks = np_masks(np.random.default_rng(0), base, [0.5, 0.5])
    pairs = [
        (merge_ops._dare_with_masks(base, [a, b], [1.0, 1.0], masks, 0.5, rescale="l1", sign_consensus=True),
         DARE_MASKS(base, [a, b], [1.0, 1.0], masks, 0.5, rescale="l1", sign_consensus=True)),
        (merge_ops.ties(base, [a, b], [1.0, 2.0], 0.3, convention="mergekit"),
         TIES["mergekit"](base, [a, b], [1.0, 2.0], 0.3)),
    ]
    for eager, jitted in pairs:
        chex.assert_trees_all_close(eager, jitted, atol=1e-6)


def test_operators_keep_low_precision_dtypes():
    base, a, b = ({"tie": m["tie"].astype(jnp.bfloat16)} for m in model_set("k2"))
    masks = np_masks(np.random.default_rng(0), base, [0.5, 0.5])
    for out in (LINEAR([a, b], [0.5, 0.5]), SLERP(a, b, 0.3, per_tensor=True), SLERP(a, b, 0.3),
                TASK_ARITHMETIC(base, [a, b], [1.0, 1.0]), TIES["mergekit"](base, [a, b], [1, 1], 0.5),
                DARE_MASKS(base, [a, b], [1, 1], masks, 0.5, rescale="l1", sign_consensus=True)):
        chex.assert_trees_all_equal_shapes_and_dtypes(out, base)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_coefficients_can_be_traced_over_a_grid(convention):
    base, a, b = model_set("k2")
    grid = np.array([[0.2, 1.0], [0.5, 0.3], [1.0, 0.8]], np.float32)  # (density, weight of a)
    ties = functools.partial(merge_ops.ties, convention=convention)
    outs = jax.jit(lambda g: jax.lax.map(lambda x: ties(base, [a, b], jnp.stack([x[1], 1.0]), x[0]), g))(grid)
    for i, (d, wa) in enumerate(grid):
        assert_leaves_close(jax.tree.map(lambda x: x[i], outs),
                            np_ties(base, [a, b], [wa, 1.0], d, convention=convention))
    if convention == "m2n2":
        slerps = jax.jit(lambda t: jax.lax.map(lambda x: merge_ops.slerp(a, b, x, per_tensor=True), t))(grid[:, 0])
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[2], slerps), b, atol=1e-6)


def test_invalid_inputs_raise_clear_errors():
    base, a, b = model_set("k2")
    with pytest.raises(ValueError, match="at least one"):
        merge_ops.linear([], [])
    with pytest.raises(ValueError, match="list or tuple"):
        merge_ops.task_arithmetic(base, a, [1.0])
    with pytest.raises(ValueError, match="weights must have shape"):
        merge_ops.ties(base, [a, b], [1.0, 1.0, 1.0], 0.5)
    with pytest.raises(ValueError, match="density must have"):
        merge_ops.dare(jax.random.key(0), base, [a, b], [1.0, 1.0], [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="tree structure"):
        merge_ops.linear([a, {"tie": a["tie"]}], [1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        merge_ops.task_arithmetic(base, [a, {**b, "vec": jnp.zeros(6)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="convention"):
        merge_ops.ties(base, [a, b], [1.0, 1.0], 0.5, convention="torch")
    with pytest.raises(ValueError, match="rescale"):
        merge_ops.dare(jax.random.key(0), base, [a, b], [1.0, 1.0], 0.5, rescale="l2")
    with pytest.raises(ValueError, match="tree structure"):
        merge_ops.slerp(a, {"tie": a["tie"]}, 0.5)


# --- The registry ----------------------------------------------------------------------

@pytest.mark.parametrize("convention", CONVENTIONS)
def test_the_registry_calls_each_operator_with_its_documented_arguments(convention):
    """OPERATORS[name](key, base, models, weights, *, density, scale, eps, convention) is
    the operator itself: linear over the base and the models with weights (1 - sum w, w),
    slerp from the base to the one model, task arithmetic, TIES, and DARE with each
    convention's rescale; every operator returns the base at zero weights."""
    base, a, b = model_set("k2")
    key, w, d, s = jax.random.key(3), jnp.array([0.3, 0.6]), 0.4, 1.2
    expected = {
        "linear": merge_ops.linear([base, a, b], jnp.array([0.1, 0.3, 0.6]), normalize=False),
        "task_arithmetic": merge_ops.task_arithmetic(base, [a, b], w, scale=s),
        "ties": merge_ops.ties(base, [a, b], w, d, scale=s, convention=convention),
        "dare": merge_ops.dare(key, base, [a, b], w, d, scale=s, convention=convention,
                               rescale="inverse" if convention == "m2n2" else "l1"),
    }
    assert list(merge_ops.OPERATORS) == ["linear", "slerp", "task_arithmetic", "ties", "dare"]
    for name, merged in expected.items():
        out = merge_ops.OPERATORS[name](key, base, [a, b], w, density=d, scale=s, convention=convention)
        chex.assert_trees_all_close(out, merged, atol=1e-6)
        zero = merge_ops.OPERATORS[name](key, base, [a, b], jnp.zeros(2), density=1.0, convention=convention)
        chex.assert_trees_all_close(zero, base, atol=1e-6)
    slerp = merge_ops.OPERATORS["slerp"](key, base, [a], jnp.array([0.3]), eps=1e-4, convention=convention)
    chex.assert_trees_all_close(slerp, merge_ops.slerp(base, a, 0.3, eps=1e-4), atol=1e-6)


def test_the_registry_refuses_unknown_names_and_a_slerp_of_two_models():
    base, a, b = model_set("k2")
    with pytest.raises(ValueError, match="unknown merge operator 'avg'; choose one of linear, slerp, task_arithmetic"):
        merge_ops.operator("avg")
    assert merge_ops.operator("ties") is merge_ops.OPERATORS["ties"]
    with pytest.raises(ValueError, match="K = 1"):
        merge_ops.OPERATORS["slerp"](jax.random.key(0), base, [a, b], jnp.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="convention"):
        merge_ops.OPERATORS["dare"](jax.random.key(0), base, [a, b], jnp.ones(2), convention="torch")
