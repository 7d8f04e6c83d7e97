import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2n2_jax import merge_ops


def trees(rng, n=3, dtype=jnp.float32):
    """n random pytrees of one structure (a 'base' and models near it)."""
    base = {"w": rng.normal(size=(7, 5)), "b": rng.normal(size=(5,)), "e": {"x": rng.normal(size=(3, 2, 4))}}
    out = [base] + [jax.tree.map(lambda x: x + rng.normal(size=x.shape) * 0.5, base) for _ in range(n - 1)]
    return [jax.tree.map(lambda x: jnp.asarray(x, dtype), t) for t in out]


def np_leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def assert_leaves_close(tree, expected, **kw):
    for x, y in zip(np_leaves(tree), expected):
        np.testing.assert_allclose(x, y, **kw)


def np_ties_leaf(o, x, y, density, scale):
    """NumPy reference of TIES on one tensor."""
    trimmed = []
    for tau in (x - o, y - o):
        flat = np.abs(tau).ravel()
        k = min(max(int(np.round(density * flat.size)), 1), flat.size)
        threshold = np.sort(flat)[flat.size - k]
        trimmed.append(np.where(np.abs(tau) >= threshold, tau, 0.0))
    taus = np.stack(trimmed)
    elected = np.sign(taus.sum(0))
    out = np.zeros_like(o)
    for idx in np.ndindex(o.shape):
        vals = [t[idx] for t in taus if t[idx] != 0 and np.sign(t[idx]) == elected[idx]]
        out[idx] = np.mean(vals) if vals else 0.0
    return o + scale * out


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_linear_matches_numpy(transform, rng, w):
    _, a, b = trees(rng)
    out = transform(merge_ops.linear)(a, b, w)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, a)
    assert_leaves_close(out, [(1 - w) * x + w * y for x, y in zip(np_leaves(a), np_leaves(b))], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("w", [0.25, 0.7])
def test_slerp_matches_numpy(transform, rng, w):
    _, a, b = trees(rng)
    fa, fb = (np.concatenate([x.ravel() for x in np_leaves(t)]) for t in (a, b))
    omega = np.arccos(fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb))
    ca, cb = np.sin((1 - w) * omega) / np.sin(omega), np.sin(w * omega) / np.sin(omega)
    out = transform(merge_ops.slerp)(a, b, w)
    assert_leaves_close(out, [ca * x + cb * y for x, y in zip(np_leaves(a), np_leaves(b))], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.7])
def test_task_arithmetic_matches_numpy(transform, rng, scale):
    base, a, b = trees(rng)
    out = transform(merge_ops.task_arithmetic)(base, a, b, scale)
    expected = [o + scale * ((x - o) + (y - o)) for o, x, y in zip(*map(np_leaves, (base, a, b)))]
    assert_leaves_close(out, expected, rtol=1e-5, atol=1e-5)
    # scale 0.5 is the average of the two models.
    chex.assert_trees_all_close(merge_ops.task_arithmetic(base, a, b, 0.5), merge_ops.linear(a, b, 0.5), atol=1e-5)


@pytest.mark.parametrize("density,scale", [(0.2, 1.0), (0.5, 0.8), (1.0, 1.0), (0.01, 2.0)])
def test_ties_matches_numpy(transform, rng, density, scale):
    base, a, b = trees(rng)
    out = transform(merge_ops.ties)(base, a, b, density, scale)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, base)
    expected = [np_ties_leaf(o, x, y, density, scale) for o, x, y in zip(*map(np_leaves, (base, a, b)))]
    assert_leaves_close(out, expected, rtol=1e-5, atol=1e-5)


def test_ties_keeps_the_agreeing_mean_and_drops_the_minority():
    base = {"p": jnp.zeros(3)}
    a, b = {"p": jnp.array([1.0, 2.0, -1.0])}, {"p": jnp.array([3.0, -0.5, -3.0])}
    out = merge_ops.ties(base, a, b, 1.0, 1.0)
    np.testing.assert_allclose(out["p"], [2.0, 2.0, -2.0])


def test_dare_without_drop_is_task_arithmetic(transform, rng):
    base, a, b = trees(rng)
    out = transform(merge_ops.dare)(jax.random.key(0), base, a, b, 0.0, 0.8)
    chex.assert_trees_all_close(out, merge_ops.task_arithmetic(base, a, b, 0.8), atol=1e-5)


def test_dare_drops_and_rescales_each_entry(rng):
    base, a, b = trees(rng, dtype=jnp.float32)
    p, scale = 0.6, 0.9
    out = jax.jit(merge_ops.dare)(jax.random.key(3), base, a, b, p, scale)
    kept = []
    for o, x, y, z in zip(*map(np_leaves, (base, a, b, out))):
        ta, tb = (x - o) / (1 - p), (y - o) / (1 - p)
        # NumPy reference: every entry is one of the four drop patterns.
        candidates = np.stack([o, o + scale * ta, o + scale * tb, o + scale * (ta + tb)])
        which = np.argmin(np.abs(candidates - z), axis=0)
        np.testing.assert_allclose(np.take_along_axis(candidates, which[None], 0)[0], z, rtol=1e-5, atol=1e-5)
        kept += [np.isin(which, (1, 3)).ravel(), np.isin(which, (2, 3)).ravel()]
    keep_rate = np.concatenate(kept).mean()
    assert abs(keep_rate - (1 - p)) < 0.08, keep_rate
    # Another key drops other entries.
    other = merge_ops.dare(jax.random.key(4), base, a, b, p, scale)
    assert not np.allclose(np_leaves(other)[0], np_leaves(out)[0])


def test_operators_keep_low_precision_dtypes(rng):
    base, a, b = trees(rng, dtype=jnp.bfloat16)
    for out in (merge_ops.linear(a, b, 0.5), merge_ops.task_arithmetic(base, a, b, 1.0),
                merge_ops.ties(base, a, b, 0.5, 1.0), merge_ops.dare(jax.random.key(0), base, a, b, 0.5, 1.0)):
        chex.assert_trees_all_equal_shapes_and_dtypes(out, base)


def test_coefficients_can_be_traced_over_a_grid(rng):
    base, a, b = trees(rng)
    grid = jnp.array([0.2, 0.5, 1.0])
    outs = jax.jit(lambda d: jax.lax.map(lambda x: merge_ops.ties(base, a, b, x, 1.0), d))(grid)
    for i, d in enumerate([0.2, 0.5, 1.0]):
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], outs), merge_ops.ties(base, a, b, d, 1.0), atol=1e-6)
