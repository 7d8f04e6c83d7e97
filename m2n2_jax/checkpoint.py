"""Checkpoint and resume a run with orbax-checkpoint: atomic, no pickle.

A checkpoint after `steps` steps holds the full run state:
  state: every run's algorithm state (archive models, scores, occupancy), as placed
    on the devices (orbax saves sharded arrays, also across hosts); a recipe
    archive's seeds are left out (the run has them; meta holds each one's digest);
  logs: the runs' key data (R, ...) and the logged metrics so far, each (R, steps + 1),
    NaN where nothing was logged, and wall stamps (steps + 1,);
  meta (JSON): what must match to resume (budget, runs, seeds, log_every, the state's
    shapes and anything the caller adds, e.g. an experiment's command line).
Orbax writes each checkpoint to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact. The step of a
checkpoint is the pass count it reached. With several processes (jax.distributed),
every process makes the same calls (orbax's are collective): process 0 writes meta and
logs, each process the state shards it holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from m2n2_jax.archive import with_seeds, without_seeds


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Where and how often `run` checkpoints.

    Attributes:
      directory: the run's checkpoint directory (created if missing); with several
        processes, one directory that all of them can read and write.
      every: checkpoint when the pass count crosses a multiple of this (and at the end).
      resume: continue from the latest checkpoint in `directory` if there is one. When
        False, a directory that already holds checkpoints is an error (nothing is
        overwritten).
      meta: JSON-serialisable facts that must match on resume (e.g. the command line).
      keep: how many recent checkpoints to keep.
    """

    directory: str
    every: int
    resume: bool = False
    meta: Any = None
    keep: int = 2

    def __post_init__(self):
        if not isinstance(self.every, (int, np.integer)) or self.every < 1:
            raise ValueError(f"checkpoint every must be an int >= 1 passes, got {self.every!r}")
        if not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {self.keep!r}")
        try:
            json.dumps(self.meta)
        except TypeError as e:
            raise ValueError(f"checkpoint meta must be JSON-serialisable: {e}") from e


def _jsonable(x):
    """Round-trip through JSON so that saved and current metas compare equal (tuples -> lists)."""
    return json.loads(json.dumps(x))


def _flat(meta: dict, prefix: str = "") -> dict:
    """Nested dicts flattened to "outer inner" keys, so a mismatch names the innermost
    field (e.g. "params .alpha", "user seed")."""
    flat = {}
    for k, v in meta.items():
        if isinstance(v, dict) and v:
            flat.update(_flat(v, f"{prefix}{k} "))
        else:
            flat[prefix + k] = v
    return flat


def _without_empty(tree):
    """Zero-size leaves (e.g. the cuts of recipes without split points) as None: orbax
    refuses to save an empty array, and there is nothing in one to restore."""
    return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "logs", "meta"))


class Store:
    """The checkpoints of one run: latest step, save, validated restore."""

    def __init__(self, checkpointing: Checkpointing, meta: dict):
        self.config = checkpointing
        self.meta = _jsonable({**meta, "user": checkpointing.meta})
        self._manager = None

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:  # created lazily: a failed validation touches nothing
            self._manager = _manager(self.config.directory, self.config.keep)
        return self._manager

    def latest(self) -> int | None:
        """Pass count of the latest complete checkpoint, or None."""
        if not os.path.isdir(self.config.directory):
            return None
        return self.manager.latest_step()

    def start(self) -> int | None:
        """The pass count to resume from, or None to start fresh; a fresh run must not
        write into a directory holding another run's checkpoints. Called once, before
        anything is saved: every process then sees the same directory, and they all
        create the orbax manager (a collective) or none does."""
        step = self.latest()
        if step is not None and not self.config.resume:
            raise ValueError(f"{self.config.directory} already holds a checkpoint (pass {step}); "
                             "resume it (resume=True / --resume) or choose another directory")
        return step

    def save(self, passes: int, state, keys: jax.Array, metrics: dict, stamps) -> None:
        logs = {"keys": np.asarray(jax.random.key_data(keys)),
                "metrics": {k: np.asarray(v) for k, v in metrics.items()},
                "wall": np.asarray(stamps)}
        self.manager.save(passes, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_without_empty(without_seeds(state))), logs=ocp.args.StandardSave(logs),
            meta=ocp.args.JsonSave(self.meta)))
        self.manager.wait_until_finished()

    def restore(self, passes: int, template_state, keys: jax.Array, metric_names, num_logged: int):
        """(state, metrics, stamps) of checkpoint `passes`, placed like `template_state`;
        metrics maps each name to (R, num_logged).

        Raises ValueError, changing nothing on disk, if the checkpoint is unreadable or
        belongs to another run (different budget, seeds, keys, model shapes, params
        field, training data or score_fn; the message names each).
        """
        where = os.path.join(self.config.directory, str(passes))
        try:
            meta = self.manager.restore(passes, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises various errors for damaged files
            raise ValueError(f"cannot read checkpoint {where} (corrupt or incomplete?): {e}") from e
        saved, now = _flat(meta), _flat(self.meta)
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs this run {now.get(k)!r}" for k in diff)
            raise ValueError(f"checkpoint {where} belongs to a different run ({details})")
        key_data = np.asarray(jax.random.key_data(keys))
        logs_template = {"keys": key_data,
                         "metrics": {k: np.zeros((key_data.shape[0], num_logged), np.float32) for k in metric_names},
                         "wall": np.zeros((num_logged,), np.float64)}
        template = without_seeds(template_state)
        abstract = _without_empty(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template))
        try:
            restored = self.manager.restore(passes, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), logs=ocp.args.StandardRestore(logs_template)))
        except Exception as e:
            raise ValueError(f"cannot restore checkpoint {where} (corrupt, or saved by another version?): {e}") from e
        logs = restored["logs"]
        if not np.array_equal(np.asarray(logs["keys"]), key_data):
            raise ValueError(f"checkpoint {where} was made with other PRNG keys (seeds) than this run")
        metrics = {k: np.asarray(v) for k, v in logs["metrics"].items()}
        state = jax.tree.map(lambda r, t: t if r is None else r, restored["state"], template,
                             is_leaf=lambda x: x is None)  # an empty leaf is its template
        return with_seeds(state, template_state), metrics, np.asarray(logs["wall"])
