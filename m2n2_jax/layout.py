"""How a run lies on the devices, decided once from `run`'s arguments.

A `Layout` holds the mesh, the placement of every model, whether seeds and params are
shared or per run, and the shapes of every argument of the run's compiled programs
(the state, keys, params, data). `run` builds one with `lay_out` and places its
arguments by it; `memory_plan` builds one from shapes alone and compiles the step
program for it (`runner.lower_step`). Its compared fields are the static arguments of
those programs: two runs with equal layouts share their compiled code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m2n2_jax.archive import Archive
from m2n2_jax.base import Algorithm
from m2n2_jax.checks import check_contract
from m2n2_jax.sharding import Placement, check_archive_memory, check_mesh, default_mesh, pad_points


@dataclasses.dataclass(frozen=True)
class Layout:
    """One run's placement and static settings (hashable: a static argument of its programs).

    Attributes:
      algorithm, score_fn, metrics_fn, chunk_size, archive_memory: as `run` takes them.
      mesh: the ("runs", "data", "model") mesh.
      placement: where the models' leaves lie on the "model" axis.
      num_points: M, the training datapoints (before padding to the "data" axis).
      shared: the seeds are shared by every run (else each run's own, leading axis R).
      per_run: the params are per run (leading axis R).
      num_runs: R, before padding to the "runs" axis.
      model: one model's leaves, as shapes.
      state: one run's state, as shapes.
      params, data, test_data: the arguments' shapes as given (params per run: leading axis R).
    The last six are not compared: runs that differ only there share compiled code.
    """

    algorithm: Algorithm
    score_fn: Callable
    metrics_fn: Callable | None
    chunk_size: int | None
    mesh: Mesh
    placement: Placement
    archive_memory: str
    num_points: int
    shared: bool
    per_run: bool
    num_runs: int = dataclasses.field(compare=False)
    model: Any = dataclasses.field(compare=False)
    state: Any = dataclasses.field(compare=False)
    params: Any = dataclasses.field(compare=False)
    data: Any = dataclasses.field(compare=False)
    test_data: Any = dataclasses.field(compare=False)

    @property
    def padded_runs(self) -> int:
        """R rounded up to a multiple of the "runs" axis (the extra runs copy the last)."""
        return pad_size(self.num_runs, self.mesh.shape["runs"])

    @property
    def split_data(self) -> bool:
        """Whether each device scores a slice of the datapoints (gathered after)."""
        return self.mesh.shape["data"] > 1

    def sharding(self, *spec) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def padded_params(self, params):
        """Per-run params padded to `padded_runs` (copies of the last run's); shared ones as they are."""
        return jax.tree.map(lambda x: pad_runs(x, self.padded_runs), params) if self.per_run else params

    def place(self, params, seeds, data, test_data):
        """The host arguments on the devices: params (padded when per run) and seeds
        (per run: split over "runs"; stacked models over "model"), the training data
        padded and split over "data", the test data replicated."""
        params = self.padded_params(params)
        params = jax.device_put(params, self.placement.shardings(params, ("runs",) if self.per_run else ()))
        seeds = jax.device_put(seeds, self.placement.shardings(seeds, () if self.shared else ("runs",)))
        data = jax.device_put(pad_points(data, self.mesh.shape["data"]), self.sharding("data"))
        return params, seeds, data, jax.device_put(test_data, self.sharding())

    def state_shardings(self, states):
        """NamedShardings of the runs' states (arrays or shapes, leading axis R): split
        over "runs", stacked models over "model", an Archive's models (a recipe
        archive's seeds) in `archive_memory`."""
        shardings = self.placement.shardings(states, ("runs",))
        if self.archive_memory == "device":
            return shardings
        host = lambda s: jax.tree.map(lambda x: x.with_memory_kind(self.archive_memory), s)

        def place(s):  # the models of an archive, or the seeds of a recipe archive
            if s.recipes is None:
                return s.replace(models=host(s.models))
            return s.replace(recipes=s.recipes.replace(seeds=host(s.recipes.seeds)))

        return jax.tree.map(lambda s: place(s) if isinstance(s, Archive) else s, shardings,
                            is_leaf=lambda x: isinstance(x, Archive))

    def place_state(self, states):
        """The runs' states as they live between calls (see `state_shardings`)."""
        if not self.placement.sharded and self.archive_memory == "device":
            return states  # as the shard_map leaves them (the programs of a run without a model axis)
        return jax.device_put(states, self.state_shardings(states))

    def abstract_step_arguments(self, steps_per_call: int) -> tuple:
        """Shapes, placed, of the step program's arguments (`runner.lower_step`):
        (states, keys, params, first step, active, logged, data, test data)."""
        runs = self.padded_runs
        states = jax.tree.map(lambda x: jax.ShapeDtypeStruct((runs,) + x.shape, x.dtype), self.state)
        states = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              states, self.state_shardings(states))
        lead = (runs,) if self.per_run else ()
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(lead + x.shape[len(lead):], x.dtype), self.params)
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              params, self.placement.shardings(params, lead and ("runs",)))
        points = lambda x: jax.ShapeDtypeStruct((pad_size(x.shape[0], self.mesh.shape["data"]),) + x.shape[1:],
                                                x.dtype, sharding=self.sharding("data"))
        replicated = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.sharding())
        flags = jax.ShapeDtypeStruct((steps_per_call,), jnp.bool_, sharding=self.sharding())
        keys = jax.ShapeDtypeStruct((runs,), jax.random.key(0).dtype, sharding=self.sharding("runs"))
        return (states, keys, params, jax.ShapeDtypeStruct((), jnp.int32, sharding=self.sharding()), flags, flags,
                jax.tree.map(points, self.data), jax.tree.map(replicated, self.test_data))


def lay_out(algorithm: Algorithm, score_fn: Callable, seeds, data, *, params, per_run: bool = False,
            shared: bool = True, num_runs: int = 1, test_data=None, mesh: Mesh | None = None, model_specs=None,
            archive_memory: str = "device", chunk_size: int | None = None,
            metrics_fn: Callable | None = None) -> Layout:
    """The `Layout` of a run, checked before any work.

    Args:
      seeds: one run's seed models stacked (S, ...), arrays or `jax.ShapeDtypeStruct`s.
      data, test_data: the datapoints (arrays or shapes, leading axis M).
      params: the algorithm's params (per run: a leading axis R on every leaf).
      mesh: default `sharding.default_mesh(num_runs)`.
      The rest as `run` takes them.

    Raises:
      ValueError: a mesh without the axes, an unknown archive memory, a score_fn that
      cannot score a seed on the data, an algorithm that breaks the contract, a host
      archive for a state without an `Archive`.
    """
    check_archive_memory(archive_memory)
    mesh = check_mesh(default_mesh(num_runs) if mesh is None else mesh)
    shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x)), tree)
    seeds, data, test_data, params = shapes(seeds), shapes(data), shapes(test_data), shapes(params)
    model = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), seeds)
    m = jax.tree.leaves(data)[0].shape[0]
    _check_score_fn(score_fn, model, data, m)
    one_run = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params) if per_run else params
    state = check_contract(algorithm, seeds, m, one_run)
    if archive_memory != "device" and not any(isinstance(x, Archive) for x in jax.tree.leaves(
            state, is_leaf=lambda x: isinstance(x, Archive))):
        raise ValueError(f"archive_memory={archive_memory!r} keeps an Archive's models in host memory, and "
                         f"{type(algorithm).__name__}'s state holds no Archive")
    return Layout(algorithm, score_fn, metrics_fn, chunk_size, mesh, Placement.of(mesh, model, model_specs),
                  archive_memory, m, shared, per_run, num_runs, model, state, params, data, test_data)


def _check_score_fn(score_fn, model, data, m: int) -> None:
    """score_fn(model, data) must trace to (m,) scores (checked abstractly)."""
    try:
        out = jax.eval_shape(score_fn, model, data)
    except Exception as e:  # shape errors surface as TypeError, flax errors, ...
        raise ValueError(f"score_fn cannot evaluate a seed model on data (wrong data shape?): {e}") from e
    if out.shape != (m,):
        raise ValueError(f"score_fn must return per-datapoint scores of shape ({m},), got {out.shape}")


def pad_size(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def pad_runs(x, size: int):
    """x (leading axis R) padded to `size` rows with copies of its last (host or device arrays)."""
    extra = size - np.shape(x)[0]
    if extra == 0:
        return x
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)])


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else np.result_type(x)
