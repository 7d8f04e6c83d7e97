"""Classic model-merging operators over pytrees, with mergekit's conventions.

Models are pytrees of one structure (leaf shapes too). Every operator is pure and
jittable, its numbers (weights, density, scale, t) may be traced, so a grid of them is
one `lax.map`; it works leaf by leaf (never concatenating a model), computes in float32
and returns each leaf in the dtype of its first pytree argument (the base for the
task-vector operators, as mergekit). For those, tau_i = model_i - base is model i's
task vector and w_i its weight. The equations are in docs/merge_ops.md.

- `linear(models, weights)`:                  sum_i w_i x_i (/ sum_i w_i)
- `slerp(a, b, t)`:                            spherical interpolation, one angle for
                                               the whole model or one per tensor
- `task_arithmetic(base, models, weights)`:    base + scale sum_i w_i tau_i    (Ilharco et al. 2023)
- `ties(base, models, weights, density)`:      trim, elect sign, disjoint mean (Yadav et al. 2023)
- `dare(key, base, models, weights, density)`: drop, rescale, task arithmetic
                                               or TIES's sign consensus        (Yu et al. 2024)

`OPERATORS` names the five under one signature, for callers that pick one by name
(`MergeES`, the experiments): OPERATORS[name](key, base, models, weights, *, density,
scale, eps, convention), each interpolating from the base (zero weights) toward the
models (the registry section below; `operator(name)` refuses unknown names).

Names follow mergekit 0.1.5 (`weight`, `density` = the fraction KEPT, `normalize`,
`lambda` = our `scale`, `rescale`, `t`); `sign_consensus=True` is its `dare_ties`.
`convention` picks the rules where our earlier operators and mergekit differ; both
are checked against NumPy references and the mergekit ones against values mergekit
itself computed (tests/fixtures/mergekit_0.1.5.npz).

| option | our default | mergekit 0.1.5 default | what it does |
|---|---|---|---|
| linear `normalize` | True | True | divide by sum_i w_i (a sum with abs < 1e-8 counts as 1) |
| task_arithmetic `normalize` | False | False | divide the mixed task vector by sum_i w_i (same guard) |
| ties `normalize` | True | True | divide by the sum of the weights whose tau_i has the elected sign (0 counts as 1) |
| dare `normalize` | False | False (dare_linear, dare_ties) | as task_arithmetic, or as ties with `sign_consensus` |
| `scale` | 1.0 | `lambda` 1.0 | multiplies the mixed task vector |
| ties / dare `density` | required | 1.0 | fraction of each tau_i kept; scalar or one per model |
| dare `rescale` | "inverse" | rescale=True, i.e. "l1" | how kept entries are scaled (see `rescale` below) |
| dare `sign_consensus` | False | dare_ties: True, else False | TIES's sign election and disjoint sum after the drop |
| ties / dare `convention` | "m2n2" | "mergekit" | see below |
| slerp `per_tensor` | False | True | one angle per leaf (mergekit) instead of one for the whole model (M2N2) |
| slerp `dot_threshold` | 1.0 | 0.9995 | interpolate linearly where abs(cos angle) > it |
| slerp `eps` | 1e-6 | 1e-8 (norm floor) | linear where sin(angle) < eps; per tensor, a norm <= eps counts as 1 |

`rescale` (dare): kept entries times 1/density ("inverse", the DARE paper), times
norm1(tau_i)/norm1(kept tau_i) per tensor ("l1", mergekit), or 1 ("none").

`convention` ("m2n2": the rules our operators always had; "mergekit": mergekit 0.1.5):
- TIES count: k = round(density n) (half to even), clipped to [1, n] | k = int(density n)
  (at least 1), all of the tensor where density >= 1, none where density <= 0.
- TIES magnitude ties: every entry tied with the k-th largest |tau| is kept, so more
  than k may be | exactly k: among tied entries the lowest flat indices (torch's
  order for small tensors; for large ones torch's unstable sort picks some k).
- Sign election (ties; dare with sign_consensus): sign(sum_i w_i tau_i), 0 on an exact
  tie, where no model agrees and the entry stays at the base | + on an exact tie.
- Density 0: TIES keeps the single largest entry (and its ties) | returns the base.
  DARE drops everything and returns the base under both (no NaN).
Under "mergekit", density n is computed in float32 (density may be traced) where
mergekit uses float64: at sizes where density n is an integer up to rounding the two
may keep one entry more or fewer (mergekit: int(0.29 * 100) = 28).

Switches (per_tensor, convention, rescale, sign_consensus) are static Python values:
bind them with `functools.partial` before `jax.jit`. normalize may be a traced bool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from m2n2_jax import merge

__all__ = ["OPERATORS", "dare", "linear", "operator", "slerp", "task_arithmetic", "ties"]

Convention = Literal["m2n2", "mergekit"]
Rescale = Literal["inverse", "l1", "none"]
_CONVENTIONS = ("m2n2", "mergekit")
_RESCALES = ("inverse", "l1", "none")
# mergekit's guards: a weight sum below this counts as 1; an l1 norm below RESCALE_EPS
# leaves the masked task vector unscaled (mergekit.sparsify.rescaled_masked_tensor).
_SUM_EPS = 1e-8
_RESCALE_EPS = 1e-7


# --- Validation ------------------------------------------------------------------------

def _check_trees(trees: Sequence, names: Sequence[str]) -> None:
    """ValueError unless every tree has the structure and leaf shapes of the first."""
    ref = jax.tree.structure(trees[0])
    shapes = [jnp.shape(x) for x in jax.tree.leaves(trees[0])]
    for tree, name in zip(trees[1:], names[1:]):
        if jax.tree.structure(tree) != ref:
            raise ValueError(f"{name} has tree structure {jax.tree.structure(tree)}, {names[0]} has {ref}")
        other = [jnp.shape(x) for x in jax.tree.leaves(tree)]
        if other != shapes:
            bad = next(i for i, (s, t) in enumerate(zip(shapes, other)) if s != t)
            raise ValueError(f"leaf {bad} of {name} has shape {other[bad]}, of {names[0]} {shapes[bad]}")


def _models(models, base=None) -> list:
    """The K >= 1 models as a list, checked against each other and the base."""
    if not isinstance(models, (list, tuple)):
        raise ValueError(f"models must be a list or tuple of K >= 1 pytrees, got {type(models).__name__}")
    if len(models) < 1:
        raise ValueError("models must hold at least one pytree (K >= 1)")
    trees = ([] if base is None else [base]) + list(models)
    names = ([] if base is None else ["base"]) + [f"models[{i}]" for i in range(len(models))]
    _check_trees(trees, names)
    return list(models)


def _per_model(value, k: int, name: str) -> jax.Array:
    """value as a float32 (k,) array; a scalar is broadcast only where allowed."""
    v = jnp.asarray(value, jnp.float32)
    if name != "weights" and v.ndim == 0:
        return jnp.broadcast_to(v, (k,))
    if v.shape != (k,):
        allowed = "shape (K,)" if name == "weights" else "a scalar or shape (K,)"
        raise ValueError(f"{name} must have {allowed} with K = {k} models, got shape {v.shape}")
    return v


def _scalar(value, name: str) -> jax.Array:
    v = jnp.asarray(value, jnp.float32)
    if v.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {v.shape}")
    return v


def _within(value: jax.Array, low: float, high: float, name: str) -> jax.Array:
    """value, after a ValueError if it is concrete (not traced) and outside [low, high]."""
    if not isinstance(value, jax.core.Tracer) and not bool(jnp.all((value >= low) & (value <= high))):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def _choice(value, allowed, name: str):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


# --- Shared steps ----------------------------------------------------------------------

def _combine(deltas, w, normalize, sign_consensus: bool, convention: str):
    """Mix the weighted task vectors w_i tau_i of one leaf (a list of K arrays).

    Without sign consensus: sum_i w_i tau_i, optionally / sum_i w_i. With it (TIES):
    the sum over the models whose w_i tau_i has the elected sign, optionally / the sum
    of their weights (mergekit's `get_mask(method="sum")` and divisor).
    """
    if sign_consensus:
        total = sum(deltas[1:], deltas[0])
        if convention == "m2n2":
            sign = jnp.sign(total)
        else:
            sign = jnp.where(total >= 0, 1.0, -1.0)
        agree = [(jnp.sign(d) == sign) & (d != 0) for d in deltas]
        mixed = sum((jnp.where(a, d, 0.0) for a, d in zip(agree[1:], deltas[1:])), jnp.where(agree[0], deltas[0], 0.0))
        divisor = sum((jnp.where(a, w[i + 1], 0.0) for i, a in enumerate(agree[1:])), jnp.where(agree[0], w[0], 0.0))
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum(deltas[1:], deltas[0])
        divisor = w.sum()
        divisor = jnp.where(jnp.abs(divisor) < _SUM_EPS, 1.0, divisor)
    return jnp.where(normalize, mixed / divisor, mixed)


def _trim_mask(tau, density, convention: str):
    """Which entries of tau TIES keeps: its largest magnitudes, density of them (see the
    module docstring for the count and the tie rule of each convention)."""
    n = tau.size
    if n == 0:
        return jnp.zeros(tau.shape, bool)
    mag = jnp.abs(tau).ravel()
    count = density * n
    if convention == "m2n2":
        k = jnp.clip(jnp.round(count).astype(jnp.int32), 1, n)
        keep = mag >= jnp.sort(mag)[n - k]
    else:
        k = jnp.clip(jnp.floor(count).astype(jnp.int32), 1, n)
        # Exactly k: the first k entries by decreasing magnitude, ties by index.
        iota = jax.lax.iota(jnp.int32, n)
        _, order = jax.lax.sort((-mag, iota), num_keys=1, is_stable=True)
        _, rank = jax.lax.sort((order, iota), num_keys=1)
        keep = (rank < k) | (density >= 1)
        keep = keep & (density > 0)
    return keep.reshape(tau.shape)


def _rescaled(tau, keep, density, rescale: str):
    """DARE's kept task vector: tau where `keep`, times the `rescale` factor."""
    kept = jnp.where(keep, tau, 0.0)
    if rescale == "inverse":
        return jnp.where(density > 0, kept / jnp.where(density > 0, density, 1.0), 0.0)
    if rescale == "l1":
        before, after = jnp.abs(tau).sum(), jnp.abs(kept).sum()
        small = (before < _RESCALE_EPS) | (after < _RESCALE_EPS)
        return kept * jnp.where(small, 1.0, before / jnp.where(small, 1.0, after))
    return kept


# --- Operators -------------------------------------------------------------------------

def linear(models, weights, *, normalize=True):
    """sum_i w_i x_i, divided by sum_i w_i if `normalize` (mergekit's `linear`).

    Two models with weights (1 - w, w) and normalize=False are (1 - w) a + w b.
    A weight sum with abs < 1e-8 counts as 1 (mergekit divides by it).
    """
    models = _models(models)
    w = _per_model(weights, len(models), "weights")

    def leaf(*xs):
        out = sum((w[i] * _f32(x) for i, x in enumerate(xs[1:], 1)), w[0] * _f32(xs[0]))
        divisor = w.sum()
        divisor = jnp.where(jnp.abs(divisor) < _SUM_EPS, 1.0, divisor)
        return jnp.where(normalize, out / divisor, out).astype(xs[0].dtype)

    return jax.tree.map(leaf, *models)


def slerp(a, b, t, *, per_tensor=False, eps=1e-6, dot_threshold=1.0):
    """Spherical interpolation: t = 0 gives a, t = 1 gives b (mergekit: a is the base).

    per_tensor=False: one angle Omega between the whole models (M2N2's slerp,
    `m2n2_jax.merge.slerp`), linear where sin(Omega) < eps, a model is zero, or
    |cos Omega| > dot_threshold.
    per_tensor=True: one angle per leaf, as mergekit's `slerp` (with dot_threshold
    0.9995 it is exactly mergekit's): norms <= eps count as 1, cos = <a/|a|, b/|b|>,
    linear where |cos| > dot_threshold or sin(Omega) < eps.
    """
    _check_trees([a, b], ["a", "b"])
    t = _within(_scalar(t, "t"), 0.0, 1.0, "t")
    if not per_tensor:
        return merge.slerp(a, b, t, eps, dot_threshold)

    def leaf(x, y):
        x32, y32 = _f32(x), _f32(y)
        if x.size == 0:
            return ((1 - t) * x32 + t * y32).astype(x.dtype)
        norm_x, norm_y = jnp.linalg.norm(x32), jnp.linalg.norm(y32)
        norm_x = jnp.where(norm_x > eps, norm_x, 1.0)
        norm_y = jnp.where(norm_y > eps, norm_y, 1.0)
        cos = jnp.clip(jnp.sum((x32 / norm_x) * (y32 / norm_y)), -1.0, 1.0)
        omega = jnp.arccos(jnp.where(jnp.abs(cos) > dot_threshold, 0.0, cos))
        sin = jnp.sin(omega)
        lin = (jnp.abs(cos) > dot_threshold) | (sin < eps)
        safe_sin = jnp.where(lin, 1.0, sin)
        c_x = jnp.where(lin, 1 - t, jnp.sin((1 - t) * omega) / safe_sin)
        c_y = jnp.where(lin, t, jnp.sin(t * omega) / safe_sin)
        return (c_x * x32 + c_y * y32).astype(x.dtype)

    return jax.tree.map(leaf, a, b)


def task_arithmetic(base, models, weights, *, normalize=False, scale=1.0):
    """base + scale sum_i w_i tau_i (divided by sum_i w_i if `normalize`).

    Weights (0.5, 0.5) are the plain average of two models; mergekit's `task_arithmetic`.
    """
    models = _models(models, base)
    w = _per_model(weights, len(models), "weights")
    s = _scalar(scale, "scale")

    def leaf(o, *xs):
        o32 = _f32(o)
        deltas = [w[i] * (_f32(x) - o32) for i, x in enumerate(xs)]
        return (o32 + s * _combine(deltas, w, normalize, False, "m2n2")).astype(o.dtype)

    return jax.tree.map(leaf, base, *models)


def ties(base, models, weights, density, *, normalize=True, scale=1.0, convention: Convention = "m2n2"):
    """TIES merging, each tensor trimmed on its own (mergekit's `ties`).

    1. Trim: keep the `density` fraction of largest-magnitude entries of each tau_i
       (density: scalar or one per model), zero the rest.
    2. Elect: per entry, the sign of sum_i w_i trim(tau_i).
    3. Disjoint sum: per entry, the sum of the w_i trim(tau_i) with the elected sign,
       divided by the sum of their weights if `normalize` (then with unit weights it is
       their mean). Result: base + scale * that.
    `convention` sets the trim count, magnitude ties, sign ties and density 0 (module
    docstring); with weights (1, 1) and "m2n2" it is the two-model TIES of M2N2 0.1.
    """
    models, w, d, s = _sparse_arguments(base, models, weights, density, scale, convention)

    def leaf(o, *xs):
        o32 = _f32(o)
        deltas = []
        for i, x in enumerate(xs):
            tau = _f32(x) - o32
            deltas.append(w[i] * jnp.where(_trim_mask(tau, d[i], convention), tau, 0.0))
        return (o32 + s * _combine(deltas, w, normalize, True, convention)).astype(o.dtype)

    return jax.tree.map(leaf, base, *models)


def dare(key, base, models, weights, density, *, rescale: Rescale = "inverse", sign_consensus=False,
         normalize=False, scale=1.0, convention: Convention = "m2n2"):
    """DARE (mergekit's `dare_linear`, or `dare_ties` with sign_consensus=True).

    Each entry of each tau_i is kept with probability density_i (dropped with
    1 - density_i; independent draws per leaf and model from `key`), the kept ones
    rescaled by `rescale`; then the weighted task vectors are summed as in
    `task_arithmetic`, or with TIES's sign election and disjoint sum if
    `sign_consensus`; `normalize` and `scale` as there. Density 0 returns the base.
    `convention` only sets the sign-tie rule of sign_consensus.
    """
    keys = jax.random.split(key, (len(jax.tree.leaves(base)), _num_models(models)))
    # Drawn leaf by leaf inside the merge, so no mask of the whole model is held.
    draw = lambda j, i, d_i, shape: jax.random.bernoulli(keys[j, i], d_i, shape)
    return _dare(base, models, weights, density, draw, rescale, sign_consensus, normalize, scale, convention)


def _dare_with_masks(base, models, weights, masks, density, *, rescale="inverse", sign_consensus=False,
                     normalize=False, scale=1.0, convention="m2n2"):
    """`dare` with the keep masks given (K pytrees of bools like base): its
    deterministic part, which the tests compare with mergekit on stored masks."""
    if len(masks) != _num_models(models):
        raise ValueError(f"masks must hold one pytree per model, got {len(masks)}")
    _check_trees([base] + list(masks), ["base"] + [f"masks[{i}]" for i in range(len(masks))])
    leaves = [jax.tree.leaves(m) for m in masks]
    draw = lambda j, i, d_i, shape: jnp.asarray(leaves[i][j], bool)
    return _dare(base, models, weights, density, draw, rescale, sign_consensus, normalize, scale, convention)


def _sparse_arguments(base, models, weights, density, scale, convention):
    """(models, weights (K,), densities (K,), scale) of TIES / DARE, validated."""
    _choice(convention, _CONVENTIONS, "convention")
    models = _models(models, base)
    k = len(models)
    density = _within(_per_model(density, k, "density"), 0.0, 1.0, "density (the fraction kept)")
    return models, _per_model(weights, k, "weights"), density, _scalar(scale, "scale")


def _num_models(models) -> int:
    return len(_models(models))


def _dare(base, models, weights, density, draw, rescale, sign_consensus, normalize, scale, convention):
    """DARE given draw(leaf index, model index, density_i, shape) -> keep mask."""
    _choice(rescale, _RESCALES, "rescale")
    models, w, d, s = _sparse_arguments(base, models, weights, density, scale, convention)
    k = len(models)
    leaves, treedef = jax.tree.flatten(base)
    model_leaves = [jax.tree.leaves(m) for m in models]
    out = []
    for j, o in enumerate(leaves):
        o32 = _f32(o)
        deltas = [w[i] * _rescaled(_f32(model_leaves[i][j]) - o32, draw(j, i, d[i], jnp.shape(o)), d[i], rescale)
                  for i in range(k)]
        out.append((o32 + s * _combine(deltas, w, normalize, sign_consensus, convention)).astype(o.dtype))
    return jax.tree.unflatten(treedef, out)


# --- The registry ----------------------------------------------------------------------
#
# Every operator under one signature, so that a caller (MergeES, the experiments' static
# merges) picks one by name:
#
#     OPERATORS[name](key, base, models, weights, *, density=1.0, scale=1.0, eps=1e-6,
#                     convention="m2n2") -> merged model (a pytree like base)
#
# key: a PRNG key (only dare draws from it); base: a pytree; models: a list of K >= 1
# pytrees like it; weights: (K,) float, zero weights give the base (but for the sparse
# operators' trims, which act on the task vectors); density: TIES / DARE's kept fraction
# (scalar or (K,)); scale: the task-vector operators' lambda; eps: slerp's threshold;
# convention: "m2n2" (our rules and defaults) or "mergekit" (mergekit 0.1.5's, DARE with
# its "l1" rescale). An operator ignores the arguments it does not read.

def _registry_linear(key, base, models, weights, *, density=1.0, scale=1.0, eps=1e-6, convention="m2n2"):
    """(1 - sum_i w_i) base + sum_i w_i x_i: mergekit's `linear` over the base and the
    models, weights (1 - sum_i w_i, w_1 .. w_K), not normalised. K = 1: (1 - w) base + w x."""
    del key, density, scale, eps, convention
    w = _per_model(weights, _num_models(models), "weights")
    return linear([base, *models], jnp.concatenate([(1 - w.sum())[None], w]), normalize=False)


def _registry_slerp(key, base, models, weights, *, density=1.0, scale=1.0, eps=1e-6, convention="m2n2"):
    """slerp(base, x_1, t = w_1), one angle for the whole pytree (M2N2's); K must be 1."""
    del key, density, scale, convention
    if _num_models(models) != 1:
        raise ValueError(f"slerp merges the base with one model (K = 1), got K = {len(models)}")
    return slerp(base, models[0], _per_model(weights, 1, "weights")[0], eps=eps)


def _registry_task_arithmetic(key, base, models, weights, *, density=1.0, scale=1.0, eps=1e-6, convention="m2n2"):
    """base + scale sum_i w_i tau_i."""
    del key, density, eps, convention
    return task_arithmetic(base, models, weights, scale=scale)


def _registry_ties(key, base, models, weights, *, density=1.0, scale=1.0, eps=1e-6, convention="m2n2"):
    """TIES, normalised (both conventions' default)."""
    del key, eps
    return ties(base, models, weights, density, scale=scale, convention=convention)


def _registry_dare(key, base, models, weights, *, density=1.0, scale=1.0, eps=1e-6, convention="m2n2"):
    """DARE as task arithmetic (mergekit's dare_linear), rescaled by 1 / density under
    "m2n2", by the l1 ratio under "mergekit" (each convention's default)."""
    del eps
    rescale = "inverse" if _choice(convention, _CONVENTIONS, "convention") == "m2n2" else "l1"
    return dare(key, base, models, weights, density, rescale=rescale, scale=scale, convention=convention)


OPERATORS = {  # name (mergekit's) -> op(key, base, models, weights, *, density, scale, eps, convention)
    "linear": _registry_linear,
    "slerp": _registry_slerp,
    "task_arithmetic": _registry_task_arithmetic,
    "ties": _registry_ties,
    "dare": _registry_dare,
}


def operator(name: str):
    """OPERATORS[name]; a ValueError naming the registry for any other name."""
    if name not in OPERATORS:
        raise ValueError(f"unknown merge operator {name!r}; choose one of {', '.join(OPERATORS)}")
    return OPERATORS[name]
