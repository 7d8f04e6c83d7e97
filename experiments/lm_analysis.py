"""What experiments/lm_skills.py reports beyond the scores: the summary over runs, the
linear path between the specialists, the task vectors' statistics, each method's
retention of the specialists' own skills, and the bar plot.

Measurements of a specialist pair before any method runs (docs/lm_pairs.md):
- `task_vector_stats`: each task vector tau = specialist - base's norm relative to the
  base's, their cosine, and DARE robustness (the share of a specialist's own-skill
  score kept when 90 % of its task vector is dropped and the rest rescaled);
- `reachability`: the scores of three families of models built from the pair alone,
  linear interpolations, whole-layer swaps and base + lambda (tau_a + tau_b);
- `skill_sets` and `skill_evaluator`: the questions (unequal small training sets,
  larger test sets) and each skill's scorer (addition exact match, reversal partial
  credit) that both are measured with.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import harness
from m2n2_jax import merge_ops
from m2n2_jax.merge import leaf_path
from m2n2_jax.tasks import skills
from m2n2_jax.tasks.transformer import SCORERS, decoded_scores


def summary(per_run: dict, methods, names) -> tuple[dict, dict, dict]:
    """(runs, means, stderr) from per_run[method] = [{skill: score}, ...] (one per run):
    runs[method][skill] lists the runs' scores, skill "mean" the mean of the skills;
    means and stderr (standard error over runs, 0 for one run) per method and skill."""
    runs = {m: {s: [r[s] for r in per_run[m]] for s in names} for m in methods}
    for m in methods:
        runs[m]["mean"] = [float(np.mean([r[s] for s in names])) for r in per_run[m]]
    means = {m: {s: float(np.mean(v)) for s, v in runs[m].items()} for m in methods}
    stderr = {m: {s: float(harness.stderr(np.asarray(v, np.float64))) for s, v in runs[m].items()} for m in methods}
    return runs, means, stderr


def linear_path(models: dict, test_scores: Callable, weights) -> dict:
    """{f"{w:.1f}": test_scores(linear merge)} along the straight line from specialist_a
    (w = 0) to specialist_b (w = 1): why interpolating merges fail or succeed."""
    pair = [models["specialist_a"], models["specialist_b"]]
    return {f"{w:.1f}": test_scores(merge_ops.linear(pair, jnp.stack([1 - jnp.float32(w), jnp.float32(w)]),
                                                     normalize=False))
            for w in weights}


def task_vectors(models: dict, names) -> dict:
    """The cosine between the task vectors tau = specialist - base, and each one's norm
    relative to the base's."""
    tau_a, tau_b = (jax.tree.map(jnp.subtract, models[s], models["base"]) for s in ("specialist_a", "specialist_b"))
    norm = lambda tree: float(optax.tree_utils.tree_norm(tree))
    return {"cosine": float(optax.tree_utils.tree_vdot(tau_a, tau_b)) / (norm(tau_a) * norm(tau_b)),
            "norm_over_base_norm": {s: norm(t) / norm(models["base"]) for s, t in zip(names, (tau_a, tau_b))}}


def skill_sets(names, train_sizes=(200, 50), test_size: int = 500, seed: int = 0) -> tuple[dict, dict, set]:
    """(train, test, test_prompts): {skill: (prompts, answers)} for the skills `names`,
    train_sizes[i] training and test_size test questions of names[i] (distinct, no
    training prompt among the test prompts), and the set of test prompts (the
    exclusion set of `lm_models.load_or_train`).

    The test questions are drawn first, skill by skill, from default_rng(seed), as
    experiments/lm_skills.py draws them, so both use the same cached models."""
    if len(train_sizes) != len(names):
        raise ValueError(f"train_sizes {train_sizes} must give one size per skill {tuple(names)}")
    rng = np.random.default_rng(seed)
    tokens = lambda qs: tuple(map(jnp.asarray, skills.tokenize(qs)))
    test = {s: skills.questions(s, test_size, rng) for s in names}
    prompts = {p for qs in test.values() for p, _ in qs}
    train = {s: tokens(skills.questions(s, n, rng, prompts)) for s, n in zip(names, train_sizes)}
    return train, {s: tokens(qs) for s, qs in test.items()}, prompts


def skill_evaluator(model, train: dict, test: dict, scorers: dict | None = None) -> Callable:
    """evaluate(params, splits=("train", "test")) -> {"train": {skill: mean score},
    "test": {skill: mean score}} (the splits asked for),
    each skill scored by scorers[skill] (a name of `transformer.SCORERS`; default
    `skills.SCORERS`: addition exact match, reversal partial credit) on the greedy
    decoding of its questions (one jitted decoder serves every model and scorer)."""
    scorers = {s: (scorers or skills.SCORERS)[s] for s in test}
    decode = jax.jit(decoded_scores(model, lambda decoded, answers: decoded))

    def evaluate(params, splits=("train", "test")) -> dict:
        return {split: {s: float(SCORERS[scorers[s]](decode(params, d), d[1]).mean()) for s, d in data.items()}
                for split, data in (("train", train), ("test", test)) if split in splits}

    return evaluate


@jax.jit
def dare_drop(key, base, model, keep=0.1):
    """DARE on one task vector (`merge_ops.dare` with weight 1): base + m * tau / keep,
    m ~ Bernoulli(keep) drawn independently per entry (per leaf from `key`). Jitted."""
    return merge_ops.dare(key, base, [model], jnp.ones(1), keep)


def where_tau_sits(tau_a, tau_b, unit: Callable | None = None, top: float = 0.1) -> dict:
    """Whether two task vectors change the same parameters: "top_overlap", the share of
    tau_a's `top` largest-magnitude entries (over the whole model) that are also among
    tau_b's (`top` for independent positions, 1 for the same ones), and with `unit`
    (leaf path -> unit name), "unit_share": each unit's share of each task vector's
    squared norm."""
    flat = [np.abs(np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(t)]))
            for t in (tau_a, tau_b)]
    k = max(1, int(round(top * flat[0].size)))
    ia, ib = (np.argpartition(-f, k - 1)[:k] for f in flat)
    out = {"top": top, "top_overlap": len(np.intersect1d(ia, ib)) / k}
    if unit is not None:
        paths = leaf_paths(tau_a)
        for name, t in (("a", tau_a), ("b", tau_b)):
            sq = {}
            for p, x in zip(paths, jax.tree.leaves(t)):
                sq[unit(p)] = sq.get(unit(p), 0.0) + float(jnp.sum(jnp.square(x.astype(jnp.float32))))
            total = sum(sq.values()) or 1.0
            out.setdefault("unit_share", {})[name] = {u: v / total for u, v in sq.items()}
    return out


def task_vector_stats(base, a, b, own_score_a: Callable | None = None, own_score_b: Callable | None = None,
                      key=None, draws: int = 3, keep: float = 0.1, unit: Callable | None = None) -> dict:
    """The task vectors tau_a = a - base, tau_b = b - base of a specialist pair.

    Returns {"norm_over_base_norm": {"a", "b"}, "cosine", `where_tau_sits` (the overlap
    of their largest entries; with `unit`, e.g. `transformer_unit`, each unit's share of
    their squared norms), and, given own_score_a and
    own_score_b (params -> the specialist's own-skill score, e.g. on the test
    questions), "dare": {"keep", "draws", and per specialist "a"/"b": {"specialist"
    (its own score), "dropped" (the score of each draw), "kept_share" (mean over draws
    of dropped / specialist)}}}. Draw k uses `dare_drop(jax.random.split(key,
    draws)[k], ...)` for both specialists (independent entries per leaf)."""
    tau_a, tau_b = (jax.tree.map(jnp.subtract, m, base) for m in (a, b))
    norm = lambda tree: float(optax.tree_utils.tree_norm(tree))
    out = {"norm_over_base_norm": {"a": norm(tau_a) / norm(base), "b": norm(tau_b) / norm(base)},
           "cosine": float(optax.tree_utils.tree_vdot(tau_a, tau_b)) / (norm(tau_a) * norm(tau_b)),
           **where_tau_sits(tau_a, tau_b, unit)}
    if own_score_a is None or own_score_b is None:
        return out
    keys = jax.random.split(jax.random.key(0) if key is None else key, draws)
    out["dare"] = {"keep": keep, "draws": draws}
    for name, model, score in (("a", a, own_score_a), ("b", b, own_score_b)):
        full = float(score(model))
        dropped = [float(score(dare_drop(k, base, model, keep))) for k in keys]
        out["dare"][name] = {"specialist": full, "dropped": dropped,
                             "kept_share": float(np.mean(dropped)) / max(full, 1e-9)}
    return out


PARTS = {"token embedding": "embed/embedding", "position embedding": "embed_pos", "attention qkv": "attn/qkv",
         "attention out": "attn/out", "MLP": "/mlp_", "LayerNorm": "/ln_", "output layer": "params/out/"}


def dare_by_part(base, model, score: Callable, parts: dict = PARTS, key=None, draws: int = 3,
                 keep: float = 0.1) -> dict:
    """Where DARE hurts a specialist: {part: [score of each draw]} where only the leaves
    whose path matches the part's regex (re.search) are DARE-dropped (`dare_drop`, draw
    k from jax.random.split(key, draws)[k]) and the rest of the task vector is kept whole."""
    paths = leaf_paths(base)
    keys = jax.random.split(jax.random.key(0) if key is None else key, draws)
    dropped = [jax.tree.leaves(dare_drop(k, base, model, keep)) for k in keys]
    whole, treedef = jax.tree.flatten(model)
    out = {}
    for name, pattern in parts.items():
        chosen = [re.search(pattern, p) is not None for p in paths]
        out[name] = [float(score(jax.tree.unflatten(treedef, [x if c else y for c, x, y in zip(chosen, d, whole)])))
                     for d in dropped]
    return out


def transformer_unit(path: str) -> str:
    """The whole-layer unit of a `Transformer` leaf path ("params/layer_1/attn/qkv/kernel"
    -> "layer_1"): "embedding" for the token and position embeddings, "layer_i" for
    block i, "head" for the final LayerNorm and the output layer."""
    top = path.split("/")[1] if path.startswith("params/") else path.split("/")[0]
    if top.startswith("embed"):
        return "embedding"
    if re.fullmatch(r"layer_\d+", top):
        return top
    if top in ("ln_out", "out"):
        return "head"
    raise ValueError(f"leaf {path!r} belongs to no unit (embedding, layer_i, head)")


def leaf_paths(params) -> list[str]:
    """The leaves' key paths joined by "/" (`m2n2_jax.merge.leaf_path`), in `jax.tree.leaves` order."""
    return [leaf_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def layer_units(params, unit: Callable = transformer_unit) -> list[str]:
    """The units of `params` in the order their first leaf appears (depth order for a
    `Transformer`)."""
    return list(dict.fromkeys(unit(p) for p in leaf_paths(params)))


def layer_swap(a, b, from_b: dict, unit: Callable = transformer_unit):
    """The model whose leaves of each unit u come wholly from b where from_b[u], else from a."""
    leaves_a, treedef = jax.tree.flatten(a)
    leaves_b = jax.tree.leaves(b)
    paths = leaf_paths(a)
    return jax.tree.unflatten(treedef, [y if from_b[unit(p)] else x for p, x, y in zip(paths, leaves_a, leaves_b)])


def swap_combinations(units, max_swaps: int = 1024, seed: int = 0) -> tuple[list[tuple], bool]:
    """(combinations, complete): every assignment of the units to A (0) or B (1), in
    binary order (units[0] the most significant), if there are at most max_swaps of
    them (complete = True); else all-A, all-B and max_swaps - 2 other distinct
    assignments drawn uniformly (complete = False)."""
    n = len(units)
    if 2 ** n <= max_swaps:
        return list(itertools.product((0, 1), repeat=n)), True
    if max_swaps < 2:
        raise ValueError(f"max_swaps must be >= 2, got {max_swaps}")
    rng = np.random.default_rng(seed)
    chosen = {(0,) * n, (1,) * n}
    while len(chosen) < max_swaps:
        chosen.add(tuple(int(x) for x in rng.integers(0, 2, n)))
    return [(0,) * n, (1,) * n] + sorted(chosen - {(0,) * n, (1,) * n}), False


def reachability(base, a, b, evaluate: Callable, weights=np.linspace(0, 1, 11),
                 lambdas=np.round(np.linspace(0, 2, 21), 2), unit: Callable = transformer_unit,
                 max_swaps: int = 1024) -> dict:
    """What a pair reaches before any method runs: three families of models built from
    the specialists a and b (and the base), each point scored by evaluate(params) ->
    {"train": {skill: score}, "test": {skill: score}} (`skill_evaluator`).

    - "linear": (1 - w) a + w b for w in `weights`;
    - "swap": every whole-layer swap, each unit (`unit` of its leaf paths; embedding,
      layer_i and head for a `Transformer`) wholly from a or from b: 2^units
      combinations, or max_swaps of them (`swap_combinations`, "complete": False);
    - "task_arithmetic": base + lambda (tau_a + tau_b) for lambda in `lambdas`.

    Returns per family {"points": [{coordinate, "train", "test", "train_mean"}...],
    "best": the point with the highest mean of the skills' training scores (the first
    on a tie)}, and for "swap" also "units" and "complete".
    """
    linear = jax.jit(lambda w: jax.tree.map(lambda x, y: (1 - w) * x + w * y, a, b))
    arithmetic = jax.jit(lambda lam: jax.tree.map(lambda o, x, y: o + lam * ((x - o) + (y - o)), base, a, b))
    units = layer_units(a, unit)
    combos, complete = swap_combinations(units, max_swaps)

    def point(coordinate: dict, params) -> dict:
        scores = evaluate(params)
        return {**coordinate, **scores, "train_mean": float(np.mean(list(scores["train"].values())))}

    families = {
        "linear": [point({"weight": round(float(w), 6)}, linear(jnp.float32(w))) for w in weights],
        "swap": [point({"from_b": dict(zip(units, map(bool, c)))}, layer_swap(a, b, dict(zip(units, c)), unit))
                 for c in combos],
        "task_arithmetic": [point({"lambda": round(float(lam), 6)}, arithmetic(jnp.float32(lam))) for lam in lambdas],
    }
    out = {name: {"points": pts, "best": max(pts, key=lambda p: p["train_mean"])} for name, pts in families.items()}
    out["swap"].update(units=units, complete=complete)
    return out


def reachability_summary(reach: dict) -> dict:
    """{family: the best point's coordinate, train mean and test scores (and their mean)}."""
    out = {}
    for name, family in reach.items():
        best = family["best"]
        coordinate = {k: v for k, v in best.items() if k not in ("train", "test", "train_mean")}
        out[name] = {**coordinate, "train_mean": best["train_mean"], "test": best["test"],
                     "test_mean": float(np.mean(list(best["test"].values())))}
    return out


def retention(means: dict, names, methods) -> dict:
    """{method: {skill: method's test score / its specialist's}} (specialist_a has skill
    names[0], specialist_b names[1]); 1 keeps the specialist's own skill."""
    return {m: {s: means[m][s] / max(means[spec][s], 1e-9) for s, spec in zip(names, ("specialist_a", "specialist_b"))}
            for m in methods}


def plot(path: str, methods, names, means: dict, stderr: dict, title: str = "") -> None:
    """Bars of each method's test score per skill and their mean (± stderr), written
    atomically to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    x = np.arange(len(methods))
    for j, skill in enumerate(tuple(names) + ("mean",)):
        ax.bar(x + (j - 1) * 0.27, [100 * means[m][skill] for m in methods], 0.27, label=skill,
               yerr=[100 * stderr[m][skill] for m in methods], capsize=2)
    ax.set_xticks(x, methods, rotation=35, ha="right")
    ax.set_ylabel("test score (%)")
    ax.set_ylim(0, 115)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(ncol=3, loc="upper center")
    ax.set_title(title or f"Merging the {names[0]} and the {names[1]} specialists (mean over runs)")
    fig.tight_layout()
    harness.save_figure(fig, path)


def plot_curves(path: str, curves: dict, title: str = "") -> None:
    """Training and test mean of the skills of each evolutionary method's returned
    model against evaluations (means over runs; `curves` as in lm_skills.json), to
    `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, split in zip(axes, ("train", "test")):
        for method, c in curves.items():
            ax.plot(c["forward_passes"], [100 * v for v in c[f"{split}_score_mean"]], marker=".", label=method)
        ax.set_xlabel("evaluations")
        ax.set_title(f"{split}: mean of the two skills")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    harness.save_figure(fig, path)
