"""Shared pieces of the digits experiments: data, model, seeds, the command line, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
            "wall_seconds": None if result.log_wall_seconds is None else result.log_wall_seconds.tolist(),
        },
        "test_accuracy_runs": test.tolist(),
        "wall_seconds": result.wall_seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
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


def make_parser(doc: str, methods, forward_passes: int, out: str, mutation_std: float) -> argparse.ArgumentParser:
    """The experiment scripts' command line (a contract: keep it stable)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="m2n2", help=f"one of: {', '.join(methods)}")
    p.add_argument("--runs", type=int, default=10, help="independent runs (seeds)")
    p.add_argument("--forward-passes", type=int, default=forward_passes, help="budget per run, seeds included")
    p.add_argument("--seed", type=int, default=42, help="first seed; runs use seed .. seed+runs-1")
    p.add_argument("--out", default=out, help="output directory")
    p.add_argument("--hidden", type=int, default=256, help="MLP hidden width (paper: 256)")
    p.add_argument("--archive-size", type=int, default=20)
    p.add_argument("--mutation-std", type=float, default=mutation_std)
    p.add_argument("--log-every", type=int, default=100, help="log every this many passes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="save the full run state with orbax every this many passes (into --checkpoint-dir)")
    p.add_argument("--checkpoint-dir", default=None, help="default: OUT/checkpoints/METHOD")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run checkpointed in DIR (same command line otherwise); keeps checkpointing there")
    return p


# Arguments that do not change a run's result, so a resumed run may differ in them.
_VOLATILE = {"out", "no_progress", "checkpoint_every", "checkpoint_dir", "resume"}


def checkpointing(args, experiment: str) -> mj.Checkpointing | None:
    """The run's `Checkpointing` from --checkpoint-every / --checkpoint-dir / --resume."""
    if args.resume is None and args.checkpoint_every is None:
        return None
    meta = {"experiment": experiment, **{k: v for k, v in sorted(vars(args).items()) if k not in _VOLATILE}}
    every = args.checkpoint_every or 1000
    if args.resume is not None:
        if not os.path.isdir(args.resume):
            raise SystemExit(f"error: --resume {args.resume}: no such checkpoint directory")
        return mj.Checkpointing(args.resume, every, resume=True, meta=meta)
    directory = args.checkpoint_dir or os.path.join(args.out, "checkpoints", args.method)
    return mj.Checkpointing(directory, every, meta=meta)


def check_args(args, methods) -> None:
    if args.method not in methods:
        raise SystemExit(f"error: unknown method {args.method!r}; choose one of {', '.join(methods)}")
    if args.runs < 1:
        raise SystemExit(f"error: --runs must be >= 1, got {args.runs}")


def evolve(args, experiment: str, seed_models, score_fn, train, test, descriptor_fn, **extra) -> dict:
    """Run args.method through `m2n2_jax.run`, write OUT/METHOD.json, return the record."""
    try:
        algo = mj.make_method(
            args.method, mutation_std=args.mutation_std, archive_size=args.archive_size, descriptor_fn=descriptor_fn
        )
        result = mj.run(
            run_keys(args.seed, args.runs), seed_models, score_fn, train, args.forward_passes, algo,
            test_data=test, log_every=args.log_every, progress=not args.no_progress,
            checkpoint=checkpointing(args, experiment),
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return save(args, experiment, result, archive_size=args.archive_size, mutation_std=args.mutation_std, **extra)


def save(args, experiment: str, result: mj.RunResult, **extra) -> dict:
    """Write OUT/METHOD.json for `result` and print a one-line summary."""
    seeds = list(range(args.seed, args.seed + args.runs))
    record = result_record(
        args.method, seeds, result, experiment=experiment, hidden=args.hidden,
        num_params=mj.num_params(jax.tree.map(lambda x: x[0], result.best_params)), **extra,
    )
    path = os.path.join(args.out, f"{args.method}.json")
    write_json(path, record)
    print(f"{args.method}: final test accuracy {record['final_test_accuracy_mean']:.4f} "
          f"± {record['final_test_accuracy_stderr']:.4f} (stderr, {args.runs} runs), "
          f"{result.wall_seconds:.1f} s -> {path}")
    return record
