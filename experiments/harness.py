"""The experiments' shared harness: command lines from frozen dataclass specs, result
records, CPU devices and the train-and-cache helper.

Each script states its settings once, as a frozen dataclass whose fields carry their
help, their check and whether they change a result (`flag`). `parse` builds the
command line from it and checks every value before any work, so a refused run exits
with one line and touches no file. Checkpoint metadata is the fields that change a
result, so adding a harmless flag never breaks resuming an old checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import tempfile
import typing
from collections.abc import Callable
from typing import Any

import numpy as np

POSITIVE, NON_NEGATIVE, AT_LEAST_2 = (">", 0), (">=", 0), (">=", 2)


def flag(default, help: str, check=None, choices=None, result: bool = True, nargs=None, type=None):
    """A spec field: `check` is POSITIVE, NON_NEGATIVE, AT_LEAST_2 or None; `result` says
    whether the value changes the result (part of checkpoint metadata). `nargs` (the
    value is then a tuple) and `type` (str -> value; raise ValueError or
    argparse.ArgumentTypeError to refuse) are argparse's, for values an annotation
    cannot parse."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "choices": choices,
                                                       "result": result, "nargs": nargs, "type": type})


def use_cpu_devices(single_threaded_ops: bool = False) -> None:
    """One XLA CPU device per core, so that independent runs use every core (results
    do not depend on it). Call before jax creates its backends; GPUs are unaffected.

    single_threaded_ops: each device runs its operations on one thread
    (--xla_cpu_multi_thread_eigen=false), so the devices do not contend for the cores.
    Measured on the 2-core CPU with the LM experiment's scorer, runs split over 2
    devices: 4,100 questions/s against 3,330 with the default thread pool.
    """
    if single_threaded_ops and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    import jax

    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        jax.config.update("jax_num_cpu_devices", count or 1)
    except RuntimeError:  # jax already runs (a test, a notebook): keep the devices it has
        pass


def parse(spec: type, doc: str, argv=None, defaults: dict | None = None, choices: dict | None = None):
    """The spec instance from the command line (`--forward-passes` for `forward_passes`);
    `defaults` and `choices` override the fields' own, per script.

    Exits with one line on a value that makes no sense (zero or negative where that
    means nothing, an unknown choice, a combination the spec's `__post_init__` refuses
    with ValueError), before any work.
    """
    hints = typing.get_type_hints(spec)
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line, not the whole usage
    for f in dataclasses.fields(spec):
        name, default = "--" + f.name.replace("_", "-"), (defaults or {}).get(f.name, f.default)
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(name, action="store_true", help=f.metadata["help"])
            continue
        base = f.metadata.get("type") or next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        p.add_argument(name, type=base, default=default, help=f.metadata["help"], nargs=f.metadata.get("nargs"),
                       choices=(choices or {}).get(f.name, f.metadata["choices"]))
    args = vars(p.parse_args(argv))
    for f in dataclasses.fields(spec):
        value, check = args[f.name], f.metadata["check"]
        if check is not None and value is not None and not (value > check[1] if check[0] == ">" else value >= check[1]):
            p.exit(2, f"error: --{f.name.replace('_', '-')} must be {check[0]} {check[1]}, got {value}\n")
        if f.metadata.get("nargs") is not None:
            args[f.name] = tuple(value)
    try:
        return spec(**args)
    except ValueError as e:
        p.exit(2, f"error: {e}\n")


def result_fields(spec) -> dict:
    """The settings that change a result (checkpoint metadata, recorded in the JSON)."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.metadata["result"]}


def run_keys(seed: int, runs: int):
    """One key per run, from seeds seed, seed + 1, ..., seed + runs - 1."""
    import jax
    import jax.numpy as jnp

    return jax.vmap(jax.random.key)(jnp.arange(seed, seed + runs))


def machine() -> dict:
    """What identifies the processor and the library versions (results move across
    machines: XLA's code generation and rounding differ)."""
    import jax

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    d = jax.devices()[0]
    versions = {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "flax", "numpy", "evosax")}
    return {"device": f"{d.platform}:{d.device_kind}", "processor": cpu, "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions}


def device() -> str:
    """`machine()` in a few words, for a record's "device": "cpu:cpu (PROCESSOR, N cores)"."""
    m = machine()
    return f"{m['device']} ({m['processor']}, {m['cores']} cores)"


def commit() -> str:
    """The git commit the code ran at, "+dirty" when the library or the experiments
    differ from it (results files aside), or "unknown" outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *args: subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True).stdout
    try:
        head = git("rev-parse", "HEAD").strip()
        changed = git("status", "--porcelain", "--", "m2n2_jax", "experiments", "benchmarks",
                      ":!experiments/results", ":!benchmarks/results").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if changed else "")


def stderr(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Standard error of the mean over `axis` (0 for one value)."""
    n = values.shape[axis]
    return values.std(axis=axis, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(np.delete(values.shape, axis))


def run_record(method: str, seeds: list[int], result, **extra) -> dict:
    """The JSON contract of the digits experiments for one method's `RunResult`: the
    library's scores are the classifiers' accuracies there, hence the JSON names."""
    test = result.test_score
    err = stderr(test)
    return {
        "method": method,
        "forward_passes": int(result.passes[-1]),
        "runs": len(seeds),
        "seeds": seeds,
        "final_test_accuracy": result.final_test_score.tolist(),
        "final_train_accuracy": result.final_train_score.tolist(),
        "final_test_accuracy_mean": float(result.final_test_score.mean()),
        "final_test_accuracy_stderr": float(err[-1]),
        "curve": {
            "forward_passes": result.passes.tolist(),
            "test_accuracy_mean": test.mean(axis=0).tolist(),
            "test_accuracy_stderr": err.tolist(),
            "train_accuracy_mean": result.train_score.mean(axis=0).tolist(),
            "wall_seconds": result.log_wall_seconds.tolist(),
        },
        "test_accuracy_runs": test.tolist(),
        "stopped_by_time_limit": result.stopped_by_time_limit,
        "wall_seconds": result.wall_seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **extra,
    }


def write_json(path: str, record: dict) -> dict:
    """Write `record`, the machine it ran on and the code's commit atomically (a killed run never leaves a
    half-written file); returns what was written."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
        m = machine()
        device = f"{m['device']} ({m['processor']}, {m['cores']} cores)"
        record = {**record, "jax_version": m["versions"]["jax"], "device": device, "machine": m, "commit": commit()}
        json.dump(record, f, indent=1)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(f.name, path)
    return record


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Write a matplotlib figure to `path` atomically (PNG) and close it."""
    import matplotlib.pyplot as plt

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".png") as f:
        try:
            fig.savefig(f, format="png", dpi=dpi)
        except BaseException:
            os.unlink(f.name)
            raise
        finally:
            plt.close(fig)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)  # as a plain savefig would (the temporary file is private)
    os.replace(f.name, path)


def settings_of(cls: type, spec, **fixed):
    """cls (a dataclass of settings, e.g. a model's training) built from the fields of
    `spec` that share its field names, with `fixed` overriding or completing them."""
    names = {f.name for f in dataclasses.fields(spec)}
    return cls(**fixed, **{f.name: getattr(spec, f.name) for f in dataclasses.fields(cls)
                           if f.name in names and f.name not in fixed})


def train(loss_fn: Callable, params, optimizer, keys):
    """(params, losses): one optimizer step per key, loss_fn(params, key) -> scalar, in one `lax.scan`."""
    import jax
    import optax

    def step(carry, key):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), keys)
    return params, losses


def cached(path: str, template: Any, make: Callable[[], Any]):
    """The pytree saved at `path` with orbax, or `make()` saved there (orbax writes to a
    temporary directory and renames it, so a killed run leaves no half-written cache)."""
    import orbax.checkpoint as ocp

    path, checkpointer = os.path.abspath(path), ocp.StandardCheckpointer()
    if os.path.isdir(path):
        return checkpointer.restore(path, template)
    tree = make()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    return tree
