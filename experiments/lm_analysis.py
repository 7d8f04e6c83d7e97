"""What experiments/lm_skills.py reports beyond the scores: the summary over runs, the
linear path between the specialists, the task vectors' statistics, each method's
retention of the specialists' own skills, and the bar plot.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import harness
from m2n2_jax import merge_ops


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


def retention(means: dict, names, methods) -> dict:
    """{method: {skill: method's test score / its specialist's}} (specialist_a has skill
    names[0], specialist_b names[1]); 1 keeps the specialist's own skill."""
    return {m: {s: means[m][s] / max(means[spec][s], 1e-9) for s, spec in zip(names, ("specialist_a", "specialist_b"))}
            for m in methods}


def plot(path: str, methods, names, means: dict, stderr: dict) -> None:
    """Bars of each method's test exact match per skill and their mean (± stderr),
    written atomically to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    x = np.arange(len(methods))
    for j, skill in enumerate(tuple(names) + ("mean",)):
        ax.bar(x + (j - 1) * 0.27, [100 * means[m][skill] for m in methods], 0.27, label=skill,
               yerr=[100 * stderr[m][skill] for m in methods], capsize=2)
    ax.set_xticks(x, methods, rotation=20)
    ax.set_ylabel("test exact match (%)")
    ax.set_ylim(0, 115)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(ncol=3, loc="upper center")
    ax.set_title(f"Merging the {names[0]} and the {names[1]} specialists (mean over runs)")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".png") as f:
        try:
            fig.savefig(f, format="png", dpi=120)
        except BaseException:
            os.unlink(f.name)
            raise
        finally:
            plt.close(fig)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)  # as a plain savefig would (the temporary file is private)
    os.replace(f.name, path)
