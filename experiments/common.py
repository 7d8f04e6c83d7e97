"""Shared pieces of the digits experiments: data, model, seeds, JSON output."""

from __future__ import annotations

import json
import os
import platform
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import m2n2_jax as mj
from m2n2_jax.baselines.map_elites import group_means
from m2n2_jax.data.digits import load_digits, parity_groups
from m2n2_jax.models.mlp import MLP


def digits_problem(hidden: int = 256):
    """(model, score_fn, train, test, descriptor_fn) of the paper's digits task."""
    train, test = load_digits()
    model = MLP(features=(hidden, 10))
    descriptor_fn = group_means(parity_groups(train[1]))
    return model, mj.classification_scores(model.apply), train, test, descriptor_fn


def run_keys(seed: int, runs: int) -> jax.Array:
    """One key per run, from seeds seed, seed + 1, ..., seed + runs - 1."""
    return jax.vmap(jax.random.key)(jnp.arange(seed, seed + runs))


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def result_record(method: str, seeds: list[int], result: mj.RunResult, **extra) -> dict:
    """The JSON contract of the experiment scripts."""
    runs = len(seeds)
    test = result.test_accuracy
    stderr = test.std(axis=0, ddof=1) / np.sqrt(runs) if runs > 1 else np.zeros(test.shape[1])
    return {
        "method": method,
        "forward_passes": int(result.passes[-1]),
        "runs": runs,
        "seeds": seeds,
        "final_test_accuracy": result.final_test_accuracy.tolist(),
        "final_train_accuracy": result.final_train_accuracy.tolist(),
        "final_test_accuracy_mean": float(result.final_test_accuracy.mean()),
        "final_test_accuracy_stderr": float(stderr[-1]),
        "curve": {
            "forward_passes": result.passes.tolist(),
            "test_accuracy_mean": test.mean(axis=0).tolist(),
            "test_accuracy_stderr": stderr.tolist(),
            "train_accuracy_mean": result.train_accuracy.mean(axis=0).tolist(),
        },
        "test_accuracy_runs": test.tolist(),
        "wall_seconds": result.wall_seconds,
        "jax_version": jax.__version__,
        "device": device_name(),
        **extra,
    }


def write_json(path: str, record: dict) -> None:
    """Write atomically: a killed run never leaves a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
        json.dump(record, f, indent=1)
    os.replace(f.name, path)
